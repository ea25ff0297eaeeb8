"""The AUTOMATIC1111 API subset: payloads -> core values and images (`<lora:name:weight>` tags
in prompts become the LoRA stack); finished jobs -> A1111's response with its `info` text."""

from __future__ import annotations

import json
import math
import re

from ...errors import InvalidRequest
from ...lora import MAX_LORA_WEIGHT
from ..backend import JobView
from ...names import check_name
from ..protocol.a1111 import Img2ImgPayload, A1111Payload
from .common import b64, check_prompt_length, decode_image

_TAG_START = re.compile(r"<lora:", re.I)
SAMPLERS = ("LCM",)

# core field -> the A1111 field a client sent it in
FIELDS = {"image": "init_images.0", "num_images": "batch_size", "guidance": "cfg_scale",
          "strength": "denoising_strength"}


def rename_field(field: str) -> str:
    if field == "loras" or field.startswith("loras."):
        return "prompt"  # the stack came from the prompt's tags
    return FIELDS.get(field, field)


def split_loras(prompt: str, catalog, field: str = "prompt", max_loras: int | None = None,
                warnings: list[str] | None = None) -> tuple[str, list[dict]]:
    """`<lora:name:weight>` tags -> a LoRA stack; the tags leave the prompt. One pass over the
    text: each character is looked at a bounded number of times, whatever the tags. What a
    tag asks for that cannot be done here is said in `warnings`."""
    loras, kept, pos = [], [], 0
    while True:
        start = _TAG_START.search(prompt, pos)
        if start is None:
            break
        end = prompt.find(">", start.end())
        if end < 0:  # nothing closes a tag from here on
            break
        kept.append(prompt[pos:start.start()])
        name, *args = prompt[start.end():end].split(":")
        name = check_name(name.strip(), field)
        weight, problem = _tag_weight(name, args, field)
        if problem and warnings is not None:
            warnings.append(problem)
        catalog.resolve("lora", name, field)
        loras.append({"name": name, "weight": weight})
        if max_loras is not None and len(loras) > max_loras:
            raise InvalidRequest(f"{field}: at most {max_loras} <lora:...> tags", field=field)
        pos = end + 1
    kept.append(prompt[pos:])
    return " ".join("".join(kept).split()), loras


def _tag_weight(name: str, args: list[str], field: str) -> tuple[float, str | None]:
    """A tag's arguments, as A1111 reads them (`te:unet:dyn`, or `te=`, `unet=`, `dyn=`) ->
    (the weight used, a warning or None). A LoRA has one weight here, for the text encoder and
    the UNet alike: the UNet's, which shapes the picture."""
    positional, named = [], {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq:
            named[key.strip().lower()] = value
        else:
            positional.append(arg)
    te = _weight(named.get("te", positional[0] if positional else "1"), name, field)
    unet = _weight(named.get("unet", positional[1] if len(positional) > 1 else str(te)),
                   name, field)
    ignored = [a.strip()[:20] for a in positional[2:]] + [
        f"{k[:20]}=" for k in named if k not in ("te", "unet")]
    notes = []
    if te != unet:
        notes.append(f"text encoder {te:g} and UNet {unet:g}: one weight per LoRA here, the "
                     f"UNet's {unet:g} was used for both")
    if ignored:
        notes.append(f"{', '.join(ignored)} ignored")
    return unet, (f"<lora:{name}:...>: {'; '.join(notes)}" if notes else None)


def _weight(text: str, name: str, field: str) -> float:
    text = text.strip()
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight) or abs(weight) > MAX_LORA_WEIGHT:
        raise InvalidRequest(
            f"{field}: <lora:{name}:{text[:20]}> needs a weight within "
            f"±{MAX_LORA_WEIGHT:g}", field=field)
    return weight


def values_from(body: A1111Payload, catalog, settings) -> tuple[dict, list[str]]:
    """(core values, warnings for the client)."""
    check_prompt_length(body.prompt, "prompt", settings)  # before the tags are parsed
    check_prompt_length(body.negative_prompt, "negative_prompt", settings)
    if body.batch_size * body.n_iter > settings.max_num_images:
        raise InvalidRequest(f"batch_size x n_iter must be at most {settings.max_num_images}",
                             field="batch_size")
    warnings: list[str] = []
    prompt, loras = split_loras(body.prompt, catalog, "prompt", settings.max_loras, warnings)
    negative, _ = split_loras(body.negative_prompt or "", catalog, "negative_prompt",
                              settings.max_loras)
    checkpoint = (body.override_settings or {}).get("sd_model_checkpoint")
    if checkpoint is not None:
        catalog.check_model(checkpoint, "override_settings.sd_model_checkpoint")
    if body.sampler_name is not None and body.sampler_name.upper() not in SAMPLERS:
        warnings.append(f"sampler_name {body.sampler_name[:64]!r} is not available here: "
                        "LCM ran instead")
    values = {"prompt": prompt, "negative_prompt": negative or None,
              "seed": None if body.seed == -1 else body.seed, "steps": body.steps,
              "guidance": body.cfg_scale, "width": body.width, "height": body.height,
              "num_images": body.batch_size * body.n_iter, "loras": loras}
    return values, warnings


def img2img_inputs(body: Img2ImgPayload, settings) -> tuple[str, dict]:
    """(workflow, decoded images): with `mask`, inpainting (white repaints)."""
    images = {"image": decode_image(body.init_images[0], "init_images.0", settings)}
    if body.mask is None:
        return "img2img", images
    mask = decode_image(body.mask, "mask", settings, mode="L")
    if body.inpainting_mask_invert:
        mask = mask.point(lambda v: 255 - v)
    images["mask"] = mask.convert("RGB")
    return "inpaint", images


def response(view: JobView, body: A1111Payload, warnings: list[str], model_name: str) -> dict:
    from ...outputs import a1111_parameters

    output = view.output
    record = output.record
    request = record.request
    count = len(output.files)
    info = {
        "prompt": request["prompt"], "all_prompts": [request["prompt"]] * count,
        "negative_prompt": request.get("negative_prompt") or "",
        "seed": request["seed"], "all_seeds": [request["seed"]] * count,
        "steps": request["steps"], "cfg_scale": request["guidance"],
        "width": record.width, "height": record.height,
        "sampler_name": "LCM", "batch_size": count,
        "sd_model_name": model_name, "loras": request.get("loras", []),
        "infotexts": [a1111_parameters(record, i) for i in range(count)],
        "job_id": view.id, "warnings": [*warnings, *output.warnings],
        "fewstep": record.to_dict(),
    }
    parameters = body.model_dump(exclude={"init_images", "mask"})
    return {"images": [b64(data) for data, _ in output.files], "parameters": parameters,
            "info": json.dumps(info)}
