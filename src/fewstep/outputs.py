"""Writing results: PNG (with generation parameters), JPEG/WebP, GIF and MP4. Atomic: every
file is written under a temporary name beside its target and renamed only when all are done, so
an error leaves no partial or half-numbered output."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from .errors import InvalidRequest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ANIMATION_SUFFIXES = (".gif", ".mp4")


def check_output_path(out: str | Path, animation: bool) -> Path:
    """Validate an output path before any work is done."""
    path = Path(out).expanduser()
    allowed = ANIMATION_SUFFIXES if animation else IMAGE_SUFFIXES
    if path.suffix.lower() not in allowed:
        raise InvalidRequest(
            f"out {str(out)!r}: the suffix must be one of {', '.join(allowed)}", field="out")
    if path.exists() and path.is_dir():
        raise InvalidRequest(f"out {str(out)!r} is a folder", field="out")
    if not path.parent.exists():
        raise InvalidRequest(f"out {str(out)!r}: folder {str(path.parent)!r} does not exist",
                             field="out")
    return path


def numbered_paths(path: Path, count: int) -> list[Path]:
    """`out.png` for one result; `out-1.png` ... `out-N.png` for several."""
    if count == 1:
        return [path]
    width = len(str(count))
    return [path.with_name(f"{path.stem}-{i:0{width}d}{path.suffix}") for i in range(1, count + 1)]


def a1111_parameters(params: dict, index: int = 0) -> str:
    """The `parameters` text that AUTOMATIC1111-style tools read from a PNG."""
    req = params["request"]
    lines = [req["prompt"]]
    if req.get("negative_prompt"):
        lines.append(f"Negative prompt: {req['negative_prompt']}")
    fields = [
        ("Steps", req["steps"]),
        ("Sampler", "LCM"),
        ("CFG scale", req["guidance"]),
        ("Seed", req["seed"]),
        ("Size", f"{params.get('width', '?')}x{params.get('height', '?')}"),
        ("Model", Path(str(params["model"])).name),
    ]
    if req.get("num_images", 1) > 1:
        fields.append(("Batch size", req["num_images"]))
        fields.append(("Batch pos", index))
    if req.get("strength") is not None:
        fields.append(("Denoising strength", req["strength"]))
    if params.get("lcm_lora"):
        fields.append(("LCM-LoRA", f"{Path(params['lcm_lora']).name}:{params['lcm_weight']}"))
    if req.get("loras"):
        fields.append(("Lora", ", ".join(f"{Path(lo['ref']).name}:{lo['weight']}"
                                          for lo in req["loras"])))
    fields.append(("Version", f"fewstep {params['fewstep']}"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def png_info(params: dict, index: int) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(params, index))
    info.add_text("fewstep", json.dumps({**params, "batch_index": index}, sort_keys=True))
    return info


def encode_image(image: Image.Image, suffix: str, params: dict | None = None,
                 index: int = 0) -> bytes:
    import io

    buffer = io.BytesIO()
    suffix = suffix.lower()
    if suffix == ".png":
        image.save(buffer, format="PNG", pnginfo=png_info(params, index) if params else None)
    elif suffix in (".jpg", ".jpeg"):
        image.save(buffer, format="JPEG", quality=95)
    elif suffix == ".webp":
        image.save(buffer, format="WEBP", quality=95)
    else:
        raise InvalidRequest(f"unsupported image format {suffix!r}", field="out")
    return buffer.getvalue()


def encode_animation(frames: list[Image.Image], suffix: str, fps: int) -> bytes:
    suffix = suffix.lower()
    if suffix == ".gif":
        import io

        buffer = io.BytesIO()
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:],
                       duration=round(1000 / fps), loop=0)
        return buffer.getvalue()
    if suffix == ".mp4":
        import imageio.v2 as imageio
        import numpy as np

        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "video.mp4"
            # yuv420p needs even sizes; the image sizes fewstep allows are multiples of 8
            with imageio.get_writer(str(target), fps=fps, codec="libx264", quality=8,
                                    macro_block_size=1, pixelformat="yuv420p") as writer:
                for frame in frames:
                    writer.append_data(np.asarray(frame))
            return target.read_bytes()
    raise InvalidRequest(f"unsupported animation format {suffix!r}", field="out")


def write_atomically(payloads: list[tuple[Path, bytes]]) -> list[Path]:
    """Write every payload to a temp file beside its target, then rename them all."""
    temps: list[tuple[Path, Path]] = []
    try:
        for target, data in payloads:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part",
                                       dir=target.parent)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            temps.append((Path(tmp), target))
        for tmp, target in temps:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    return [target for _, target in temps]


def save_result(result, out: str | Path) -> list[Path]:
    """Write a Result to `out` (numbered files for several images). Returns the paths."""
    path = check_output_path(out, result.is_animation)
    count = result.images.shape[0]
    targets = numbered_paths(path, count)
    if result.is_animation:
        fps = result.params["request"].get("fps", 8)
        payloads = [(t, encode_animation(result.pil_frames(i), path.suffix, fps))
                    for i, t in enumerate(targets)]
    else:
        payloads = [(t, encode_image(img, path.suffix, result.params, i))
                    for i, (t, img) in enumerate(zip(targets, result.pil_images()))]
    return write_atomically(payloads)
