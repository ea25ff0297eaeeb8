"""What clients may name: the model, the workflows, and the catalogue's LoRAs and components
(names only, never paths)."""

from __future__ import annotations

from fastapi import APIRouter

from ..catalog import KINDS
from ..protocol.native import WORKFLOWS


def router(service) -> APIRouter:
    api = APIRouter(tags=["catalogue"])
    catalog = service.catalog

    @api.get("/v1/models")
    async def models():
        """The model, and the components requests may name (OpenAI list format, plus the
        catalogue by kind)."""
        model = service.backend.describe()
        # what this model runs, and of that what the catalogue has the components for
        needs = {"controlnet": catalog.controlnets, "t2i-adapter": catalog.adapters,
                 "animate": catalog.motion_adapters}
        workflows = [w for w in WORKFLOWS if w in model.get("workflows", WORKFLOWS)
                     and (w not in needs or needs[w])]
        return {
            "object": "list",
            "data": [{"id": catalog.model_name, "object": "model", "created": 0,
                      "owned_by": "fewstep", "family": model["family"],
                      "native_size": model["native_size"],
                      "inpaint_only": model["inpaint_only"]}],
            "workflows": workflows,
            "controlnets": sorted(catalog.controlnets),
            "adapters": sorted(catalog.adapters),
            "motion_adapters": sorted(catalog.motion_adapters),
            "loras": sorted(catalog.loras),
        }

    @api.get("/v1/loras")
    async def loras():
        """LoRA names requests may use, in `loras: [{name, weight}]`."""
        return {"data": [{"name": name, "kind": KINDS["lora"]} for name in sorted(catalog.loras)]}

    return api
