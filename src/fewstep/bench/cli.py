"""`fewstep bench` / `python -m fewstep.bench`: the options, and the run that ties the parts
together (build the models, measure each mode, cold starts, write the results)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .models import LCM_ALPHA, LCM_RANK
from .modes import MODES


def _batches(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of batch sizes like 1,4")
    return values


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode {unknown[0]!r}; known: {', '.join(MODES)}")
    return modes


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fewstep bench",
        description="The reference recipe against fewstep's speed presets (default, auto, "
                    "fastest) on the same random weights of the real architectures.")
    p.add_argument("--family", choices=("sd15", "sdxl", "ssd-1b"), default="sd15")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels (default: 512 for sd15, 1024 for sdxl/ssd-1b)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=_batches, default=None,
                   help="batch sizes for throughput, e.g. 1,4 (default: 1,2 on CPU, 4,8,16 on "
                        "CUDA); batch 1 latency is always measured")
    p.add_argument("--modes", type=_modes, default=list(MODES),
                   help=f"modes to measure, the recipe among them (default: {','.join(MODES)})")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto",
                   help="model dtype (auto: fp16 on GPU, fp32 on CPU); fastest may change it")
    p.add_argument("--repeats", type=int, default=5, help="timed batch-1 calls per mode")
    p.add_argument("--throughput-repeats", type=int, default=1,
                   help="timed calls per throughput batch size")
    p.add_argument("--breakdown-repeats", type=int, default=3,
                   help="CUDA: extra batch-1 calls split into stages (each stage boundary "
                        "synchronizes, so not the timed calls; on a CPU the timed calls are "
                        "split)")
    p.add_argument("--json", type=Path, default=None, help="JSON file (default: in --out)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default=None,
                   help="result file stem (default: <device>-<family>-<resolution>)")
    p.add_argument("--note", action="append", default=[],
                   help="a line for the results' notes (repeatable)")
    p.add_argument("--tiny", action="store_true", help="tiny test models: a smoke run")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the generated models here and reuse them (default: a temp dir)")
    p.add_argument("--cold-start", default="recipe,auto",
                   help="modes to time from process start in subprocesses ('' for none); a "
                        "mode that compiles runs twice: empty, then warm compile cache")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="compile the UNet ahead in auto and fastest (default: the preset's "
                        "choice, on CUDA only)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--half", default=None, choices=("bf16", "fp16", "none"),
                   help="fastest mode precision (default: the preset's: fp16 on GPU, bf16 on "
                        "a CPU with AMX or AVX512-BF16)")
    p.add_argument("--openvino", default="auto", choices=("auto", "on", "off", "int8"),
                   help="CPU: the UNet, VAE decoder and text encoders in OpenVINO (auto: in "
                        "auto and fastest when the package is installed; int8: with 8-bit "
                        "weights, needs fewstep[int8])")
    p.add_argument("--compile-cache-dir", default=None,
                   help="compile cache of the main run (default: in --workdir)")
    p.add_argument("--cold-start-only", action="store_true",
                   help="only the cold starts of --cold-start (no timed modes)")
    p.add_argument("--lora-switch", action="store_true",
                   help="only measure LoRA changes on a compiled UNet (with --tiny: the tiny "
                        "models; else the real architecture at --resolution)")
    # internal: the cold-start subprocess
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--lora", help=argparse.SUPPRESS)
    p.add_argument("--taesd", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--one-shot", default="",
                   help="presets whose one-shot command (`fewstep txt2img`, process start to "
                   "file written, empty then warm cache) is timed against the recipe as a "
                   "script, e.g. auto,fastest")
    args = p.parse_args(argv)
    if "recipe" not in args.modes and not (args.child or args.lora_switch
                                           or args.cold_start_only):
        p.error("--modes: the recipe is the baseline every mode is compared with; include it")
    for name in ("repeats", "throughput_repeats", "breakdown_repeats", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    from ..config import pick_device, pick_dtype

    args.device = pick_device(args.device)
    if args.resolution is None:
        args.resolution = 512 if args.family == "sd15" else 1024
    if args.resolution % 8:
        p.error(f"--resolution {args.resolution} is not a multiple of 8")
    if args.batch is None:
        args.batch = [1, 2] if args.device == "cpu" else [4, 8, 16]
    args.cold_start = _modes(args.cold_start) if args.cold_start.strip() else []
    args.one_shot = [m for m in _modes(args.one_shot) if m != "recipe"] \
        if args.one_shot.strip() else []
    if args.cold_start_only:
        if not args.cold_start:
            p.error("--cold-start-only: name the modes with --cold-start")
        args.modes = []
    args.dtype = str(pick_dtype(args.dtype, args.device)).removeprefix("torch.")
    return args


def _quiet() -> None:
    """Keep the libraries' progress bars and advice out of the benchmark's output."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components"


def main(argv: list[str] | None = None) -> int:
    _quiet()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        from .coldstart import child

        child(args)
        return 0
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fewstep-bench-")
        workdir = Path(tmp.name)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.compile_cache_dir is None:
        args.compile_cache_dir = str(workdir / "compile-cache")
    from .report import device_slug, markdown, write

    name = args.name or f"{device_slug(args.device)}-{args.family}-{args.resolution}" \
        + ("-tiny" if args.tiny else "") + ("-cold-start" if args.cold_start_only else "")

    def save(data: dict) -> None:  # after each mode too: a run cut short keeps what it measured
        write(data, args.out, name, args.json)

    try:
        if args.lora_switch:
            return _lora_switch(args, workdir)
        data = run(args, workdir, save)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(markdown(data))
    return 0


def _lora_switch(args, workdir: Path) -> int:
    import json

    from .lora_switch import lora_switch

    text = json.dumps(lora_switch(args, workdir), indent=2) + "\n"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)
    return 0


def run(args, workdir: Path, save) -> dict[str, Any]:
    import diffusers
    import torch

    from .report import device_name, device_slug, ratios
    from .coldstart import cold_starts
    from .models import build_real, build_tiny
    from .modes import engine_mode, recipe_mode, timed_shapes

    started = time.time()
    load_start = os.getloadavg()
    dtype = getattr(torch, args.dtype)
    build_start = time.perf_counter()
    if args.tiny:
        model, lora, taesd = build_tiny(workdir / "tiny", args.family)
    else:
        model, lora, taesd = build_real(args.family, workdir / args.family, dtype,
                                        args.device)
    build_s = time.perf_counter() - build_start

    results: dict[str, Any] = {}
    first: dict[str, np.ndarray] = {}
    data: dict[str, Any] = {
        "device": device_name(args.device),
        "device_slug": device_slug(args.device),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
        "config": {"family": args.family, "resolution": args.resolution, "steps": args.steps,
                   "batch": args.batch, "modes": args.modes, "device": args.device,
                   "dtype": args.dtype, "repeats": args.repeats,
                   "throughput_repeats": args.throughput_repeats,
                   "breakdown_repeats": args.breakdown_repeats, "guidance": 1.0,
                   "tiny": args.tiny, "timed_shapes": [f"{w}x{h}x{b}" for w, h, b in
                                                       timed_shapes(args)],
                   "lcm_lora": {"rank": LCM_RANK, "alpha": LCM_ALPHA}},
        "results": results,
        "ratios": {},
        "agreement": {},
        "cold_start": {},
        "memory_note": ("CUDA max_memory_allocated during the timed calls" if
                        args.device.startswith("cuda") else
                        "peak process RSS during the timed calls (the mode's weights included; "
                        "each mode is freed before the next loads, but memory the allocator "
                        "kept from an earlier mode still counts)"),
        "build_models_s": round(build_s, 1),
    }

    def update(final: bool = False) -> None:
        load_now = os.getloadavg()
        if "recipe" in results:
            data["ratios"] = ratios(results)
            data["agreement"] = {
                m: round(float(np.abs(first[m] - first["recipe"]).max()), 6)
                for m in results if m != "recipe" and first[m].shape == first["recipe"].shape}
        data["load_average"] = {"start": [round(v, 2) for v in load_start],
                                "end": [round(v, 2) for v in load_now]}
        data["notes"] = list(args.note) + [
            f"1-minute load average: {load_start[0]:.2f} at the start, {load_now[0]:.2f} at the "
            f"{'end' if final else 'last save (unfinished run)'} ({os.cpu_count()} cores)."]
        data["wall_s"] = round(time.time() - started, 1)
        save(data)

    for mode in args.modes:
        print(f"[bench] {mode} ...", file=sys.stderr, flush=True)
        results[mode] = (recipe_mode(args, model, lora, dtype) if mode == "recipe" else
                         engine_mode(args, mode, model, lora, taesd))
        first[mode] = results[mode].pop("_first_image")
        update()
    if args.cold_start:
        print(f"[bench] cold start: {', '.join(args.cold_start)} ...", file=sys.stderr,
              flush=True)
        data["cold_start"] = cold_starts(args, args.cold_start, model, lora, taesd, workdir)
    if args.one_shot:
        from .coldstart import one_shot_commands

        print(f"[bench] one-shot commands: {', '.join(args.one_shot)} ...", file=sys.stderr,
              flush=True)
        data["one_shot"] = one_shot_commands(args, model, lora, taesd, args.one_shot, workdir)
    update(final=True)
    return data
