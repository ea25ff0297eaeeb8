"""Preparing the fast path, as commands tell it: what a command runs on, what is prepared after
its work (once, kept in the cache) and how long that takes, and `fewstep prepare`, which builds
ahead for a model and sizes before any image is asked for.

On a CPU a one-shot command converts nothing before its image: the conversion (a minute or
more) would not pay back within one call. It runs on torch when the cache does not hold the
converted models, writes its output, and then prepares them for the next run (Ctrl-C skips
that; the output is already written)."""

from __future__ import annotations

import os
import time

# seconds per million parameters to convert, save, compile and warm a part, on two cores
# (measured on SD1.5: UNet about 50 s, VAE decoder about 30 s, text encoder about 10 s)
_SECONDS_PER_MILLION = {"unet": 0.06, "decoder": 0.6, "text_encoder": 0.08,
                        "text_encoder_2": 0.08}


def speed_line(engine) -> str | None:
    """What the engine runs on, in one line (None when there is nothing to say)."""
    parts = getattr(engine.fast_path, "openvino", None)
    report = engine.fast_report.applied if engine.fast_report is not None else {}
    if parts is None:
        why = report.get("openvino", "off")
        compiled = report.get("compile_unet", "off")
        if compiled != "off":
            return f"speed {engine.speed}: compiled UNet {compiled}"
        if why.startswith("skipped"):
            return f"speed {engine.speed}: OpenVINO {why}"
        return None
    ready = sorted(label for label in parts.cached)
    missing = [wanted.label for wanted in parts.missing]
    if not missing:
        return f"speed {engine.speed}: OpenVINO {parts.precision} ({', '.join(ready)}), " \
               "from the cache"
    return (f"speed {engine.speed}: this run on torch; OpenVINO ({', '.join(missing)}) is "
            f"prepared after it for the next runs (once, {estimate(engine, parts.missing)})")


def estimate(engine, missing) -> str:
    """How long converting `missing` takes, roughly, on this machine."""
    seconds = 0.0
    for wanted in missing:
        module = {"unet": engine.base.unet, "decoder": engine.base.vae.decoder}.get(
            wanted.part) or getattr(engine.base, wanted.part)
        millions = sum(p.numel() for p in module.parameters()) / 1e6
        seconds += millions * _SECONDS_PER_MILLION.get(wanted.part, 0.1)
    seconds *= 2 / max(1, min(os.cpu_count() or 2, 16))
    if seconds < 90:
        return f"about {max(5, round(seconds, -1)):.0f} s"
    return f"about {seconds / 60:.0f} min"


def prepare_after(engine, say, ask_skip: bool = True) -> None:
    """Convert what the run found missing into the cache, telling each part, as the command's
    last step (nothing is loaded: the engine runs nothing more); Ctrl-C stops it cleanly (what
    is half written is never read: files are renamed into place when complete)."""
    from .build import missing_parts, prepare_next

    missing = missing_parts(engine)
    if not missing:
        return
    parts = engine.fast_path.openvino
    skip = "; Ctrl-C skips it" if ask_skip else ""
    say(f"preparing the fast path for the next runs: {', '.join(missing)} "
        f"(once, {estimate(engine, parts.missing)}{skip})")
    began = time.perf_counter()
    try:
        prepare_next(engine, progress=say, load=False)
    except KeyboardInterrupt:
        say("skipped: a later run prepares it (or `fewstep prepare`)")
        return
    say(f"fast path ready in {time.perf_counter() - began:.0f} s: the next run starts from "
        "the cache")


def compile_ahead(options, task: str, asked: dict) -> str:
    """Start compiling, beside the command's imports, what the same command's last run compiled
    at its calls (`fewstep.ahead`); `asked`: the request's values that choose the shapes.
    Returns the command's digest, for `remember_compiled`."""
    from . import ahead
    from .config import openvino_cache_dir

    # the folder too: references may be relative to it
    digest = ahead.command_digest(task, {"options": options.model_dump(mode="json"),
                                         "folder": os.getcwd(), **asked})
    ahead.start(openvino_cache_dir(options.compile_cache), digest)
    return digest


def remember_compiled(engine, options, digest: str, call) -> None:
    """Note what this command compiled at its calls, for its next start (`compile_ahead`),
    and how `fewstep.direct` repeats `call` on the converted models alone."""
    from . import ahead, direct
    from .config import openvino_cache_dir

    parts = getattr(engine.fast_path, "openvino", None)
    if parts is not None and parts.compiled_static:
        ahead.remember(openvino_cache_dir(options.compile_cache), digest,
                       parts.compiled_static,
                       direct=direct.plan(engine, call, options, parts.compiled_static))
