"""`fewstep.server.catalog`: the names a service's clients use, what they stand for, and records
that leave the service with names in place of references and come back."""

import pytest

from fewstep.errors import InvalidRequest, NotFound
from fewstep.server.catalog import Catalog


def _catalog():
    return Catalog(model_name="dream", loras={"paper": "/l/paper.safetensors"},
                   controlnets={"edges": "/c/canny"}, hidden={"dream": "/m/dream"})


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "http://x", "a..b", "", ".x",
                                  "x" * 65, 3])
def test_names_are_never_paths_or_urls(name):
    with pytest.raises(InvalidRequest) as info:
        _catalog().resolve("lora", name, "loras.0.name")
    assert info.value.field == "loras.0.name"


def test_names_resolve_to_their_references_and_unknown_ones_list_the_known():
    catalog = _catalog()
    assert catalog.resolve("controlnet", "edges", "controlnet") == "/c/canny"
    with pytest.raises(NotFound) as info:
        catalog.resolve("lora", "ink", "loras.0.name")
    assert "available: paper" in info.value.message and info.value.field == "loras.0.name"


def test_what_an_engine_is_built_with_names_each_entry():
    needs = _catalog().engine_needs()
    assert needs["loras"] == {"lora.paper": "/l/paper.safetensors"}
    assert needs["components"]["controlnet"] == {"controlnet.edges": "/c/canny"}
    assert needs["components"]["adapter"] == {}


def test_references_are_checked_before_anything_loads(tmp_path):
    catalog = Catalog(loras={"evil": str(tmp_path / "x.ckpt")})
    with pytest.raises(InvalidRequest) as info:
        catalog.check_references()
    assert info.value.field == "lora.evil" and "pickle" in info.value.message


def test_catalogue_records_round_trip():
    from types import SimpleNamespace

    from fewstep.config import ServeSettings, load
    from fewstep.records import Record

    settings = load(ServeSettings, {"model": "/m/dream", "tiny_vae": "/m/taesd",
                                    "lora": ["paper=/l/paper.safetensors"],
                                    "controlnet": ["edges=/c/canny"]})
    engine = SimpleNamespace(model_ref="/m/dream", lcm_ref="/m/lcm", speed="fastest")
    catalog = Catalog.from_settings(settings, engine)
    record = Record(request={"task": "controlnet", "prompt": "x", "controlnet": "/c/canny",
                             "loras": [{"ref": "/l/paper.safetensors", "weight": 0.5}]},
                    model="/m/dream", lcm_lora="/m/lcm", family="sd15", fewstep="0.1.0",
                    speed=engine.speed, tiny_vae="/m/taesd")
    redacted = catalog.redact_record(record)
    assert "/m/" not in redacted.to_json() and "/l/" not in redacted.to_json()
    assert redacted.speed == "fastest" and redacted.tiny_vae == "tiny-vae"
    assert sorted(redacted.catalog_names) == ["lcm_lora", "model", "request.controlnet",
                                              "request.loras.0.ref", "tiny_vae"]
    restored = catalog.restore_record(redacted)
    assert restored == record
    with pytest.raises(NotFound, match="--lora paper=REF"):
        Catalog(model_name="dream", hidden={"dream": "/m/dream", "tiny-vae": "/m/taesd"}
                ).restore_record(redacted)
