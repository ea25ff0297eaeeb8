"""Reading input images safely: only PNG, JPEG, WebP and GIF (its first frame) are decoded;
other formats, unreadable, truncated and decompression-bomb files are refused with an error
naming the field.

An image is read as a browser shows it (what the studio page sizes masks from, and what people
see): the EXIF orientation of a JPEG or PNG applied (Chromium leaves WebP's as stored), and
16-bit greyscale scaled to 8 bits as libpng does (Pillow's conversions clip it: a mid grey
became white)."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import InvalidRequest

# Pillow can read dozens of formats, each parser a surface for malformed input: these suffice
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


def load_image(source: str | Path | bytes, field: str, max_pixels: int = 4096 * 4096,
               mode: str = "RGB") -> Image.Image:
    """Open and fully decode an image from a path or bytes; `field` names it in errors."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InvalidRequest(f"{field}: no such file {str(source)!r}", field=field)
        data = path.read_bytes()
    else:
        data = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
                width, height = probe.size
                if width * height > max_pixels:
                    raise InvalidRequest(
                        f"{field} is {width}x{height}, over the limit of {max_pixels} pixels",
                        field=field,
                    )
                probe.seek(0)  # an animation: its first frame
                probe.load()  # decodes everything: truncation shows here
                image = as_shown(probe, probe.format).convert(mode)
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(f"{field} is too large to decode safely", field=field) from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for bad files
        raise InvalidRequest(f"{field} is not a readable PNG, JPEG, WebP or GIF image (or is "
                             "truncated)", field=field) from exc
    return image


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale PNGs open as these
ORIENTED_FORMATS = ("JPEG", "PNG")  # whose EXIF orientation browsers apply


def as_shown(image: Image.Image, format: str | None) -> Image.Image:
    """A decoded image as a browser shows it: upright, and in 8 bits."""
    if format in ORIENTED_FORMATS:
        image = _upright(image)
    if image.mode in WIDE_MODES:
        # the high byte, as libpng's strip_16 (browsers) and Pillow's 16-bit colour reading
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray((wide >> 8).astype(np.uint8), "L")
    return image


def _upright(image: Image.Image) -> Image.Image:
    """EXIF orientation applied. A broken EXIF block is ignored, as browsers do: the image is
    shown as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - Pillow's EXIF parsing raises many kinds for bad blocks
        return image


def image_digest(image) -> str:
    """`sha256:<hex>` of an input image as the model saw it: RGB pixels and size (the same
    picture re-encoded, e.g. PNG -> PNG with other compression, has the same digest)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return f"sha256:{digest.hexdigest()}"


def input_digests(request) -> dict[str, str]:
    """Digests of a request's input images, by field."""
    return {name: image_digest(getattr(request, name)) for name in request.image_fields()
            if getattr(request, name, None) is not None}
