"""Writing results: PNG, JPEG, WebP, GIF and MP4, each carrying its record (what
`fewstep reproduce` reads back, see `records.py`) and, for images, A1111-style infotext.

Where the record goes: PNG a `fewstep` text chunk (infotext in `parameters`); JPEG and WebP
EXIF ImageDescription (infotext in UserComment); GIF the comment extension; MP4 the `comment`
metadata tag. Atomic: every file is written under a temporary name beside its target and
renamed only when all are done, so an error leaves no partial or half-numbered output."""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import tempfile
from pathlib import Path

from PIL import ExifTags, Image, PngImagePlugin

from .errors import InvalidRequest
from .records import EXIF_IMAGE_DESCRIPTION, EXIF_USER_COMMENT, RECORD_KEY, Record

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ANIMATION_SUFFIXES = (".gif", ".mp4")
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
JPEG_EXIF_LIMIT = 65533  # one APP1 segment: 65,535 bytes less its length field
RECORD_MARGIN = 1024  # a record's fields beyond the request and references (digests, sizes)


def check_output_path(out: str | Path, animation: bool, count: int = 1) -> Path:
    """Validate an output path before any work is done: the suffix, the folder, and that a
    file can be created there (`count` numbered files for several results)."""
    try:
        if "\0" in str(out):
            raise ValueError("a NUL character")
        path = Path(out).expanduser()
        allowed = ANIMATION_SUFFIXES if animation else IMAGE_SUFFIXES
        if path.suffix.lower() not in allowed:
            raise InvalidRequest(
                f"out {str(out)!r}: the suffix must be one of {', '.join(allowed)}", field="out")
        folder = path.parent
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise InvalidRequest(f"out {str(out)!r}: folder {str(folder)!r} {what}",
                                 field="out")
        for target in numbered_paths(path, count):
            if target.is_dir():
                raise InvalidRequest(f"out {str(target)!r} is a folder", field="out")
    except ValueError as exc:  # NUL bytes and the like
        raise InvalidRequest(f"out {str(out)[:80]!r} is not a usable path ({exc})",
                             field="out") from None
    _check_writable(folder, out)
    return path


def _check_writable(folder: Path, out) -> None:
    """Create and remove a file where the outputs will go: permissions, read-only file
    systems and special folders all show here, before the work rather than after it."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".fewstep-", suffix=".probe", dir=folder)
    except OSError as exc:
        raise InvalidRequest(f"out {str(out)!r}: cannot write in {str(folder)!r} "
                             f"({exc.strerror or exc})", field="out") from None
    os.close(fd)
    os.unlink(probe)


def free_name(path: Path, count: int = 1) -> Path:
    """`path`, or the first of `stem-2`, `stem-3`, ... whose output files (`count` of them, as
    `numbered_paths` names them) do not exist yet: a default name never overwrites."""
    candidate, number = path, 1
    while any(p.exists() for p in numbered_paths(candidate, count)):
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def refuse_existing(path: Path, count: int = 1) -> None:
    """An output the user named that exists already is not replaced without --overwrite."""
    existing = [p for p in numbered_paths(path, count) if p.exists()]
    if existing:
        raise InvalidRequest(f"out {str(existing[0])!r} exists; give --overwrite to replace it, "
                             "or another name", field="out")


def numbered_paths(path: Path, count: int) -> list[Path]:
    """`out.png` for one result; `out-1.png` ... `out-N.png` for several."""
    if count == 1:
        return [path]
    width = len(str(count))
    return [path.with_name(f"{path.stem}-{i:0{width}d}{path.suffix}") for i in range(1, count + 1)]


def quote(value) -> str:
    """A value as A1111 writes it into infotext: JSON-quoted when it holds a comma, a colon
    or a line break (its parser splits fields on commas and keys on colons)."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def lora_name(ref: str) -> str:
    """The name a `<lora:NAME:WEIGHT>` tag uses: the file's stem, or the catalogue name."""
    name = Path(str(ref).rstrip("/\\")).name
    name = re.sub(r"\.safetensors$", "", name)
    return re.sub(r"[<>:\s]+", "_", name) or "lora"


def _tag_weight(weight: float) -> str:
    return f"{float(weight):g}"


def a1111_parameters(record: Record, index: int = 0) -> str:
    """The `parameters` text that AUTOMATIC1111-style tools read from a PNG. The prompt
    carries the LoRA stack as `<lora:name:weight>` tags, as A1111's own prompts do, so
    "send to txt2img" keeps it."""
    req = record.request
    tags = [f"<lora:{lora_name(lo['ref'])}:{_tag_weight(lo['weight'])}>"
            for lo in req.get("loras") or []]
    lines = [" ".join([req["prompt"], *tags]) if tags else req["prompt"]]
    if req.get("negative_prompt"):
        lines.append(f"Negative prompt: {req['negative_prompt']}")
    width, height = record.width or "?", record.height or "?"
    fields = [
        ("Steps", req["steps"]),
        ("Sampler", "LCM"),
        ("CFG scale", req["guidance"]),
        ("Seed", req["seed"]),
        ("Size", f"{width}x{height}"),
        ("Model", Path(str(record.model)).name),
    ]
    if req.get("num_images", 1) > 1:
        fields.append(("Batch size", req["num_images"]))
        fields.append(("Batch pos", index))
    if req.get("strength") is not None:
        fields.append(("Denoising strength", req["strength"]))
    if record.lcm_lora:
        fields.append(("LCM-LoRA", f"{lora_name(record.lcm_lora)}: "
                                   f"{_tag_weight(record.lcm_weight)}"))
    fields.append(("Version", f"fewstep {record.fewstep}"))
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields))
    return "\n".join(lines)


def record_text(record: Record, index: int = 0) -> str:
    """The record of one output (the one at `index` of its batch), as ASCII JSON."""
    return record.at(index).to_json()


def png_info(record: Record, index: int) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(record, index))
    info.add_text(RECORD_KEY, record_text(record, index))
    return info


def exif_info(record: Record, index: int, limit: int | None = None):
    """JPEG and WebP: the record in ImageDescription, the infotext in UserComment (where
    A1111 puts it). Within `limit` bytes (JPEG's one segment) what fits is written: the
    infotext, a copy for other tools, gives way to the record `reproduce` reads."""
    exif = _text_exif(record_text(record, index))
    exif.get_ifd(ExifTags.IFD.Exif)[EXIF_USER_COMMENT] = (
        b"UNICODE\0" + a1111_parameters(record, index).encode("utf-16-be"))
    if limit is not None and len(exif.tobytes()) > limit:
        exif = _text_exif(record_text(record, index))
        check_exif_fits(exif, limit)
    return exif


def _text_exif(text: str):
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = text
    return exif


def check_exif_fits(exif, limit: int = JPEG_EXIF_LIMIT, margin: int = 0,
                    what: str = "out") -> None:
    size = len(exif.tobytes()) + margin
    if size > limit:
        raise InvalidRequest(
            f"{what}: the record of this request ({size} bytes, mostly its prompts) does not "
            f"fit a JPEG's EXIF segment ({limit} bytes): write .png or .webp, or use shorter "
            "prompts", field="out")


def draft_record(request, **refs) -> dict:
    """The bulk of what the record of `request`'s outputs will hold, before the work: the
    request and the references (`model=`, `lcm_lora=`...), to size it; the engine's other
    fields are short, allowed for by RECORD_MARGIN."""
    return {"request": request.record(), **{k: v for k, v in refs.items() if v}}


def check_record_fits(out: str | Path, record: Record | dict,
                      margin: int = RECORD_MARGIN) -> None:
    """A JPEG output whose record cannot fit is refused before any work (PNG, WebP, GIF and
    MP4 hold any record)."""
    if Path(out).suffix.lower() in (".jpg", ".jpeg"):
        text = record.at(0).to_json() if isinstance(record, Record) else \
            json.dumps(record, sort_keys=True)
        check_exif_fits(_text_exif(text), JPEG_EXIF_LIMIT, margin, what=f"out {str(out)!r}")


def encode_image(image: Image.Image, suffix: str, record: Record | None = None,
                 index: int = 0) -> bytes:
    import io

    buffer = io.BytesIO()
    suffix = suffix.lower()
    if suffix == ".png":
        image.save(buffer, format="PNG", pnginfo=png_info(record, index) if record else None)
    elif suffix in (".jpg", ".jpeg"):
        extra = {"exif": exif_info(record, index, JPEG_EXIF_LIMIT)} if record else {}
        image.save(buffer, format="JPEG", quality=95, **extra)
    elif suffix == ".webp":
        extra = {"exif": exif_info(record, index)} if record else {}
        image.save(buffer, format="WEBP", quality=95, **extra)
    else:
        raise InvalidRequest(f"unsupported image format {suffix!r}", field="out")
    return buffer.getvalue()


def encode_animation(frames: list[Image.Image], suffix: str, fps: int,
                     record: Record | None = None, index: int = 0) -> bytes:
    suffix = suffix.lower()
    text = record_text(record, index) if record else None
    if suffix == ".gif":
        import io

        buffer = io.BytesIO()
        extra = {"comment": text.encode("ascii")} if text else {}
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:],
                       duration=round(1000 / fps), loop=0, **extra)
        return buffer.getvalue()
    if suffix == ".mp4":
        import imageio.v2 as imageio
        import numpy as np

        metadata = ["-metadata", f"comment={text}"] if text else []
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "video.mp4"
            # yuv420p needs even sizes; the image sizes fewstep allows are multiples of 8
            with imageio.get_writer(str(target), fps=fps, codec="libx264", quality=8,
                                    macro_block_size=1, pixelformat="yuv420p",
                                    output_params=metadata) as writer:
                for frame in frames:
                    writer.append_data(np.asarray(frame))
            return target.read_bytes()
    raise InvalidRequest(f"unsupported animation format {suffix!r}", field="out")


def encode_output(result, index: int, suffix: str, batch_index: int | None = None) -> bytes:
    """Output number `index` of a Result (an image or an animation) in the format of `suffix`;
    its record says `batch_index` (default `index`): its position in the generated batch."""
    position = index if batch_index is None else batch_index
    if result.is_animation:
        fps = result.record.request.get("fps", 8)
        return encode_animation(result.pil_frames(index), suffix, fps, result.record, position)
    return encode_image(result.pil_images()[index], suffix, result.record, position)


def write_atomically(payloads: list[tuple[Path, bytes]]) -> list[Path]:
    """Write every payload to a temp file beside its target, then rename them all. A new file
    gets the permissions the umask gives (as any tool's); an overwritten one keeps its own."""
    temps: list[tuple[Path, Path]] = []
    try:
        for target, data in payloads:
            fd, tmp = _create_beside(target)
            temps.append((tmp, target))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            try:
                os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
            except FileNotFoundError:
                pass
        for tmp, target in temps:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    return [target for _, target in temps]


def _create_beside(target: Path) -> tuple[int, Path]:
    """A new, exclusive temporary file next to `target`, created with mode 0666 so the umask
    applies (mkstemp's files are 0600 whatever the umask)."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


def save_result(result, out: str | Path) -> list[Path]:
    """Write a Result to `out` (numbered files for several images). Returns the paths."""
    count = result.images.shape[0]
    path = check_output_path(out, result.is_animation, count)
    targets = numbered_paths(path, count)
    return write_atomically([(t, encode_output(result, i, path.suffix))
                             for i, t in enumerate(targets)])
