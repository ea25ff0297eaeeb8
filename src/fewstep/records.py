"""Reproduction: every output carries its record (see `outputs.py` for where), and
`reproduce(path)` regenerates the output from it, pixel for pixel on the same device and
library versions.

A record holds the request (seed included), the model and LoRA references, the LCM-LoRA and
its weight, the family, the dtype and the speed preset. It leaves the input images out: it
holds their SHA-256 digests instead (`inputs`), and a reproduction takes the same images again
and checks them. Outputs of the service name the model, LoRAs and components by catalogue name
(`catalog_names` lists those fields); a reproduction resolves them with the same catalogue
(`catalog=`: a `Catalog`, or the service's config file)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from .errors import InvalidRequest
from .images import image_digest


def complete_record(params: dict, request, engine, tiny_vae: str | None = None) -> dict:
    """What a record needs beyond `Engine.describe`: the input digests, the speed preset and
    the tiny VAE it was given. Fields the engine already records are kept."""
    extra = {"inputs": input_digests(request), "speed": getattr(engine, "speed", "auto")}
    if tiny_vae and extra["speed"] != "off":
        extra["tiny_vae"] = tiny_vae
    return {**extra, **params}


# -- reading records ---------------------------------------------------------------------------

def read_record(path: str | Path) -> dict[str, Any]:
    """The record of an output file (PNG, JPEG, WebP, GIF or MP4)."""
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "no such file"
        raise InvalidRequest(f"{str(path)!r}: {what}", field="path")
    if file.suffix.lower() == ".mp4":
        text = _mp4_comment(file)
    else:
        text = _image_record_text(file)
    if not text:
        raise InvalidRequest(f"{str(path)!r} carries no fewstep record (was it written by "
                             "fewstep, and not converted since?)", field="path")
    try:
        record = json.loads(text)
    except ValueError:
        raise InvalidRequest(f"{str(path)!r}: its fewstep record is not valid JSON",
                             field="path") from None
    if not (isinstance(record, dict) and isinstance(record.get("request"), dict)
            and record["request"].get("task")):
        raise InvalidRequest(f"{str(path)!r}: its fewstep record has no request", field="path")
    return record


def _image_record_text(file: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    from .outputs import EXIF_IMAGE_DESCRIPTION, RECORD_KEY

    try:
        with Image.open(file) as image:
            if image.format == "PNG":
                return image.text.get(RECORD_KEY)
            if image.format == "GIF":
                comment = image.info.get("comment")
                return comment.decode("utf-8", "replace") if comment else None
            if image.format in ("JPEG", "WEBP"):
                return image.getexif().get(EXIF_IMAGE_DESCRIPTION)
    except (UnidentifiedImageError, OSError):
        raise InvalidRequest(f"{str(file)!r} is not a readable image", field="path") from None
    return None


def _mp4_comment(file: Path) -> str | None:
    import imageio_ffmpeg

    done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(file),
                           "-f", "ffmetadata", "-"], capture_output=True, text=True,
                          timeout=60)
    for line in done.stdout.splitlines():
        if line.startswith("comment="):
            # ffmetadata escapes '=', ';', '#', '\' and line breaks with a backslash
            return re.sub(r"\\(.)", r"\1", line[len("comment="):])
    return None


def read_pixels(path: str | Path):
    """The decoded pixels of an output (N frames for an animation), uint8."""
    import numpy as np

    file = Path(path)
    if file.suffix.lower() == ".mp4":
        import imageio.v3 as iio

        return np.asarray(iio.imread(file, index=None))
    from PIL import Image, ImageSequence

    with Image.open(file) as image:
        return np.stack([np.asarray(frame.convert("RGB"))
                         for frame in ImageSequence.Iterator(image)])


# -- reproducing -------------------------------------------------------------------------------

def reproduce(path: str | Path, *, images: dict[str, Any] | None = None, catalog=None,
              out: str | Path | None = None, engine=None, model: str | None = None,
              model_config: str | None = None, device: str | None = None,
              dtype: str | None = None, progress=None):
    """Regenerate the output `path` from its record. Returns the Result (the one output), and
    writes it to `out` when given (any suffix of the same kind; the record goes with it).

    * `images`: the input images of img2img, inpaint, ControlNet and T2I-Adapter outputs, by
      field (`image`, `mask`, `control_image`): PIL images, encoded bytes or file paths. Each
      is checked against the digest in the record.
    * `catalog`: for service outputs, the service's catalogue: a `Catalog`, or the path of the
      config file it was started with.
    * `engine`: an Engine to run on (it must hold the record's model); else one is made from
      the record (`model`, `model_config`, `device`, `dtype` override it)."""
    from .outputs import check_output_path, encode_output, write_atomically

    record = resolve_names(read_record(path), catalog, model_given=model is not None)
    request = build_request(record, images or {})
    index = int(record.get("batch_index") or 0)
    if out is not None:
        target = check_output_path(out, record["request"]["task"] == "animate")
    if engine is None:
        engine = engine_for(record, model=model, model_config=model_config, device=device,
                            dtype=dtype)
    else:
        check_engine(engine, record, model)
    result = engine.generate(request, progress=progress)
    result.images = result.images[index:index + 1]
    if out is not None:
        # written at its batch position, so its record says what the original's says
        write_atomically([(target, encode_output(result, 0, target.suffix, batch_index=index))])
    return result


def resolve_names(record: dict, catalog, model_given: bool = False) -> dict:
    """A record whose catalogue names are turned back into references. With `model_given`,
    the model's name is left alone (the caller names the model itself)."""
    names = [n for n in record.get("catalog_names") or [] if not (model_given and n == "model")]
    record = {**record, "catalog_names": names}
    if not names:
        return record
    if catalog is None:
        listed = ", ".join(f"{n} = {_lookup(record, n)!r}" for n in names)
        raise InvalidRequest(
            f"this output came from the service and names catalogue entries ({listed}): pass "
            "the service's config (--config FILE) or the entries (--lora NAME=REF, "
            "--controlnet NAME=REF, --adapter NAME=REF, --motion-adapter NAME=REF, --model "
            "REF)", field="catalog")
    if isinstance(catalog, (str, Path)):
        from .config import ServeSettings, load
        from .server.catalog import Catalog

        catalog = Catalog.from_settings(load(ServeSettings, {"config": str(catalog)}))
    return catalog.restore_record(record)


def _lookup(record: dict, dotted: str):
    value: Any = record
    for key in dotted.split("."):
        value = value[int(key)] if isinstance(value, list) else value.get(key)
    return value


def build_request(record: dict, images: dict[str, Any]):
    """The request of a record, with its input images given again and checked."""
    from .images import load_image
    from .tasks import REQUESTS

    values = dict(record["request"])
    task = values.pop("task")
    if task not in REQUESTS:
        raise InvalidRequest(f"record: unknown task {task!r}", field="task")
    cls = REQUESTS[task]
    digests = record.get("inputs") or {}
    unknown = sorted(set(images) - set(cls.image_fields()))
    if unknown:
        raise InvalidRequest(f"this {task} output takes no {unknown[0]} image", field=unknown[0])
    for name in cls.image_fields():
        option = "--" + name.replace("_", "-")
        if images.get(name) is None:
            expected = f" (sha256 {digests[name][7:19]}...)" if name in digests else ""
            raise InvalidRequest(f"this {task} output needs its input image again: {option} "
                                 f"FILE{expected}", field=name)
        image = images[name]
        if not hasattr(image, "mode"):  # a path or encoded bytes
            image = load_image(image, name)
        if name in digests and image_digest(image) != digests[name]:
            raise InvalidRequest(
                f"{option}: not the image this output was made from (sha256 "
                f"{image_digest(image)[7:19]}..., recorded {digests[name][7:19]}...)",
                field=name)
        values[name] = image
    return cls.build(**values)


def engine_for(record: dict, *, model=None, model_config=None, device=None, dtype=None):
    """An Engine set up as the record says."""
    from .build import build_engine

    lcm = record.get("lcm_lora")
    weight = float(record.get("lcm_weight") or 1.0)
    weights = {"animate_lcm_weight": weight} if record["request"]["task"] == "animate" else {}
    return build_engine(model=model or record.get("model"),
                        lcm_lora=f"{lcm}:{weight}" if lcm else "none",
                        model_config_dir=model_config, family=record.get("family"),
                        device=device, dtype=dtype or record.get("dtype"),
                        speed=record.get("speed", "auto"), tiny_vae=record.get("tiny_vae"),
                        **weights)


def check_engine(engine, record: dict, model: str | None = None) -> None:
    """An engine handed to `reproduce` must hold the record's model and LCM-LoRA."""
    wanted = {"model": model or record.get("model"), "lcm_lora": record.get("lcm_lora")}
    held = {"model": engine.model_ref, "lcm_lora": engine.lcm_ref}
    for field, ref in wanted.items():
        if ref not in (None, "auto") and not _same_ref(ref, held[field]):
            raise InvalidRequest(f"the engine holds {field} {held[field]!r}, the record says "
                                 f"{ref!r}", field=field)


def _same_ref(a, b) -> bool:
    if a == b:
        return True
    try:
        return a is not None and b is not None and \
            Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, ValueError):
        return False


def same_pixels(a: str | Path, b: str | Path) -> tuple[bool, int]:
    """(equal, largest difference in 0..255) between the pixels of two output files."""
    import numpy as np

    first, second = read_pixels(a), read_pixels(b)
    if first.shape != second.shape:
        return False, 255
    diff = int(np.abs(first.astype(np.int16) - second.astype(np.int16)).max())
    return diff == 0, diff

