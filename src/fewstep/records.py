"""The record of a result: how it was made, in one typed and versioned model (`Record`).

The engine writes it (`Engine.record`), every output file carries it (`outputs.py` writes it:
PNG in a `fewstep` text chunk, JPEG and WebP in EXIF ImageDescription, GIF in its comment, MP4
in its `comment` tag), the service's answers hold it with catalogue names in place of
references (`Catalog.redact_record`), and `read_record` reads it back from any of those files
for `fewstep reproduce` (`reproduce.py`).

A record holds the request (seed included), the model and LoRA references, the LCM-LoRA and
its weight, the family, the dtype and the speed preset. It leaves the input images out: it
holds their SHA-256 digests instead (`inputs`), and a reproduction takes the same images again
and checks them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, \
    model_validator

from .errors import InvalidRequest
from .families import TASKS

RECORD_VERSION = 1  # raised when a field changes meaning; older records are still read
RECORD_KEY = "fewstep"  # PNG text chunk holding the record
EXIF_IMAGE_DESCRIPTION = 0x010E  # JPEG and WebP: the record
EXIF_USER_COMMENT = 0x9286  # JPEG and WebP: the A1111 infotext

# the fields that hold references (kind per field; the request's LoRAs are "lora")
REFERENCE_FIELDS = {"model": "model", "lcm_lora": "lcm", "tiny_vae": "tiny_vae"}
COMPONENT_FIELDS = ("controlnet", "adapter", "motion_adapter")
_OPTIONAL = ("tiny_vae", "width", "height", "batch_index", "catalog_names")


class Record(BaseModel):
    """How a result was made. `version` says which fields a reader may expect; a record
    without one is of version 1."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: int = Field(RECORD_VERSION, ge=1)
    request: dict[str, Any]  # the request as plain data (images left out), with its `task`
    inputs: dict[str, str] = Field(default_factory=dict)  # input image digests, by field
    model: str
    family: str
    lcm_lora: str | None = None
    lcm_weight: float = 1.0
    scheduler: str = "LCMScheduler"
    dtype: str = "float32"
    speed: str = "auto"
    tiny_vae: str | None = None
    fewstep: str = ""  # the version that wrote it
    width: int | None = None
    height: int | None = None
    batch_index: int | None = Field(None, ge=0)  # a file's place in its generated batch
    # service records: the fields whose values are catalogue names (dotted paths)
    catalog_names: list[str] | None = None

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value > RECORD_VERSION:
            raise ValueError(f"is {value}: written by a newer fewstep (this one reads up to "
                             f"{RECORD_VERSION})")
        return value

    @field_validator("request")
    @classmethod
    def _has_task(cls, value: dict) -> dict:
        if value.get("task") not in TASKS:
            raise ValueError(f"has no known task (got {str(value.get('task'))[:40]!r})")
        return value

    @model_validator(mode="after")
    def _index_in_batch(self):
        count = self.request.get("num_images", 1)
        if self.batch_index is not None and isinstance(count, int) and self.batch_index >= count:
            raise ValueError(f"batch_index is {self.batch_index}, but the request made {count} "
                             "output(s)")
        return self

    @property
    def task(self) -> str:
        return self.request["task"]

    def to_dict(self) -> dict[str, Any]:
        """The record as plain data (what files and answers carry); optional fields that are
        not set are left out."""
        return self.model_dump(exclude={name for name in _OPTIONAL
                                        if getattr(self, name) is None})

    def to_json(self) -> str:
        """ASCII JSON, so every container (EXIF, GIF comments) can hold it."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def at(self, batch_index: int) -> "Record":
        """The record of the output at `batch_index` of its batch."""
        return self.model_copy(update={"batch_index": batch_index})

    # -- references ----------------------------------------------------------------------

    def references(self) -> list[tuple[str, str]]:
        """(dotted path, kind) of every reference the record holds: the model, the LCM-LoRA,
        the tiny VAE, each LoRA ("lora") and the request's component."""
        refs = [(name, kind) for name, kind in REFERENCE_FIELDS.items() if getattr(self, name)]
        refs += [(f"request.loras.{i}.ref", "lora")
                 for i, _ in enumerate(self.request.get("loras") or [])]
        refs += [(f"request.{kind}", kind) for kind in COMPONENT_FIELDS
                 if self.request.get(kind)]
        return refs

    def value(self, dotted: str):
        """The value at a dotted path (`request.loras.0.ref`); None when absent."""
        value: Any = self.to_dict()
        for key in dotted.split("."):
            try:
                value = value[int(key)] if isinstance(value, list) else value[key]
            except (KeyError, IndexError, TypeError, ValueError):
                return None
        return value

    def with_values(self, values: dict[str, Any], **fields) -> "Record":
        """A copy with the values at dotted paths replaced (and top-level `fields` set)."""
        data = json.loads(json.dumps(self.to_dict()))
        for dotted, new in values.items():
            target = data
            keys = dotted.split(".")
            for key in keys[:-1]:
                target = target[int(key)] if isinstance(target, list) else target[key]
            last = keys[-1]
            target[int(last) if isinstance(target, list) else last] = new
        data.update(fields)
        return parse_record(data)


def parse_record(data: Any, source: str = "record") -> Record:
    """A Record from plain data (a dict, or JSON text); a bad one is one InvalidRequest naming
    the field at fault."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError):
            raise InvalidRequest(f"{source}: its fewstep record is not valid JSON",
                                 field="path") from None
    if not isinstance(data, dict) or not isinstance(data.get("request"), dict):
        raise InvalidRequest(f"{source}: its fewstep record has no request", field="path")
    try:
        return Record.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "batch_index"
        message = first["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"{source}: the record's {field} {message}",
                             field=field) from None


# -- reading records from files ------------------------------------------------------------------

def read_record(path: str | Path) -> Record:
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
    return parse_record(text, repr(str(path)))


def _image_record_text(file: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

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


def same_pixels(a: str | Path, b: str | Path) -> tuple[bool, int]:
    """(equal, largest difference in 0..255) between the pixels of two output files."""
    import numpy as np

    first, second = read_pixels(a), read_pixels(b)
    if first.shape != second.shape:
        return False, 255
    diff = int(np.abs(first.astype(np.int16) - second.astype(np.int16)).max())
    return diff == 0, diff
