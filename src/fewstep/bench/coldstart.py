"""Cold start: a fresh process, from its start to its first decoded image (imports, loading, LoRA
fusing, compiling ahead, one image). A mode that compiles runs twice with the same compile cache
folder: first empty (`cold`), then with what the first run left in it (`warm`), as a service's
next start would find it. Engines compile the batch-1 shape only here.

One-shot commands: what a user of the command line waits, from the process start to the output
file written, for the recipe as a script that saves its image and for `fewstep txt2img` itself
(with an empty cache, then with the one its first run prepared after writing its image)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .measure import PROMPT, sync
from .modes import SEED, make_engine

MARK = "FEWSTEP-BENCH-CHILD "


def child(args) -> None:
    """In the fresh process: load `args.child`'s mode, make one image, print the timings."""
    imported = time.time()
    model, lora, taesd = Path(args.model), Path(args.lora), Path(args.taesd)
    compiles = False
    if args.child == "recipe":
        from ..config import pick_dtype
        from ..reference import recipe_call, recipe_pipeline

        pipe = recipe_pipeline("txt2img", str(model), str(lora),
                               torch_dtype=pick_dtype(args.dtype, args.device),
                               device=args.device, sdxl=args.family != "sd15")
        pipe.set_progress_bar_config(disable=True)
        loaded = time.time()
        images = recipe_call(pipe, PROMPT, SEED, num_inference_steps=args.steps,
                             guidance_scale=1.0, height=args.resolution, width=args.resolution)
        if args.save:  # the recipe as a script: its image saved as a PNG
            from PIL import Image

            Image.fromarray((np.clip(images[0], 0, 1) * 255).round().astype(np.uint8)).save(
                args.save)
    else:
        from ..tasks import Txt2ImgRequest

        shapes = ((args.resolution, args.resolution, 1),)
        engine, path, _, _ = make_engine(args, args.child, model, lora, taesd, shapes,
                                         args.compile_cache_dir)
        # both build ahead into the cache folder: the second start finds the first's work
        compiles = bool(path.options.compile_unet or path.openvino is not None)
        loaded = time.time()
        images = engine.generate(Txt2ImgRequest(
            prompt=PROMPT, steps=args.steps, width=args.resolution, height=args.resolution,
            seed=SEED)).images
    sync(args.device)
    done = time.time()
    print(MARK + json.dumps({"imported_at": imported, "loaded_at": loaded, "first_image_at": done,
                             "compiles": compiles,
                             "finite": bool(np.isfinite(images).all())}), flush=True)


def _spawn(args, mode: str, model, lora, taesd, cache_dir: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fewstep.bench", "--child", mode, "--model", str(model),
           "--lora", str(lora), "--taesd", str(taesd), "--family", args.family,
           "--resolution", str(args.resolution), "--steps", str(args.steps),
           "--device", args.device, "--dtype", args.dtype, "--compile-cache-dir", cache_dir]
    if args.compile is not None:
        cmd.append("--compile" if args.compile else "--no-compile")
    if args.half is not None:
        cmd += ["--half", args.half]
    cmd += ["--openvino", getattr(args, "openvino", "auto")]
    src = str(Path(__file__).resolve().parents[2])  # this checkout's fewstep first
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir,
               PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    start = time.time()
    run = _watched(cmd, env)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith(MARK)), None)
    if run.returncode or line is None:
        return {"error": (run.stderr or run.stdout)[-800:]}
    info = json.loads(line[len(MARK):])
    return {"process_start_to_first_image_s": round(info["first_image_at"] - start, 2),
            "import_s": round(info["imported_at"] - start, 2),
            "load_s": round(info["loaded_at"] - info["imported_at"], 2),
            "first_image_s": round(info["first_image_at"] - info["loaded_at"], 2),
            "compiles": info["compiles"], "finite": info["finite"],
            "peak_rss_mb": run.peak_mb}


def _scratch_cache(prefix: str, workdir: Path) -> tempfile.TemporaryDirectory:
    """A compile cache folder in `workdir` for one mode's runs, deleted when they are done."""
    return tempfile.TemporaryDirectory(prefix=prefix, dir=workdir, ignore_cleanup_errors=True)


def cold_starts(args, modes: list[str], model, lora, taesd, workdir: Path) -> dict[str, Any]:
    """{mode: timings} for the recipe and engines that do not compile; {mode: {"cold": timings,
    "warm": timings}} for an engine that compiles."""
    out: dict[str, Any] = {}
    for mode in modes:
        # deleted after its runs: GBs per mode (converted models, compiled graphs), and a few
        # runs fill a disk
        with _scratch_cache(f"compile-cache-{mode}-", workdir) as cache:
            first = _spawn(args, mode, model, lora, taesd, cache)
            if first.get("compiles"):
                out[mode] = {"cold": first, "warm": _spawn(args, mode, model, lora, taesd,
                                                           cache)}
            else:
                out[mode] = first
    return out


def one_shot_commands(args, model, lora, taesd, modes: list[str],
                      workdir: Path) -> dict[str, Any]:
    """Process start to output file written, for the recipe as a script and for
    `fewstep txt2img` per preset in `modes` (an empty cache, then the cache its first run
    prepared after writing); also when each process ended (the first run of a preset goes on
    preparing the fast path after its file is written)."""
    out: dict[str, Any] = {"recipe": _timed_command(_recipe_command(args, model, lora, taesd),
                                                    workdir / "one-shot-recipe.png")}
    for mode in modes:
        runs = {}
        with _scratch_cache(f"one-shot-cache-{mode}-", workdir) as cache:
            for run in ("cold", "warm"):
                target = workdir / f"one-shot-{mode}-{run}.png"
                runs[run] = _timed_command(_fewstep_command(args, mode, model, lora, taesd,
                                                            cache, target), target)
        out[mode] = runs
    return out


def _recipe_command(args, model, lora, taesd) -> list[str]:
    return [sys.executable, "-m", "fewstep.bench", "--child", "recipe", "--model", str(model),
            "--lora", str(lora), "--taesd", str(taesd), "--family", args.family,
            "--resolution", str(args.resolution), "--steps", str(args.steps),
            "--device", args.device, "--dtype", args.dtype, "--save"]


def _fewstep_command(args, mode, model, lora, taesd, cache: str, target: Path) -> list[str]:
    cmd = [sys.executable, "-m", "fewstep.cli", "txt2img", PROMPT, "--model", str(model),
           "--lcm-lora", str(lora), "--width", str(args.resolution), "--height",
           str(args.resolution), "--steps", str(args.steps), "--seed", str(SEED), "--device",
           args.device, "--dtype", args.dtype, "--speed", mode, "--compile-cache", cache,
           "--openvino", getattr(args, "openvino", "auto"), "--out", str(target),
           "--overwrite", "--quiet"]
    if mode == "fastest":
        cmd += ["--tiny-vae", str(taesd)]
    return cmd


def _timed_command(cmd: list[str], target: Path) -> dict[str, Any]:
    """Runs `cmd` (which writes `target`), timing when the file appears and when it ends."""
    if cmd[-1] == "--save":
        cmd = [*cmd, str(target)]
    target.unlink(missing_ok=True)
    src = str(Path(__file__).resolve().parents[2])  # this checkout's fewstep first
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    env.pop("FEWSTEP_OPENVINO", None)  # as a user has it
    # the files the last command wrote (GBs for a cold one) go to disk before this one starts,
    # as they have for a user's next command: not written out while this one is timed
    if hasattr(os, "sync"):
        os.sync()
    start = time.time()
    run = _watched(cmd, env, target)
    if run.returncode or run.written is None:
        return {"error": (run.stderr or run.stdout)[-800:]}
    return {"process_start_to_file_s": round(run.written - start, 2),
            "process_end_s": round(run.ended - start, 2), "peak_rss_mb": run.peak_mb,
            "said": [line for line in run.stderr.splitlines() if line.startswith("speed ")][:1]}


@dataclass
class _Run:
    returncode: int
    stdout: str
    stderr: str
    ended: float
    written: float | None  # when `target` appeared
    peak_mb: float | None  # the process's own peak resident memory


def _watched(cmd: list[str], env: dict, target: Path | None = None) -> _Run:
    """Runs `cmd`, watching for `target` to appear and reading its peak memory as it runs."""
    # its output goes to files: a pipe nobody reads while it runs could fill and stall it
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        written, peak_kib = None, 0
        while proc.poll() is None:
            if written is None and target is not None and target.exists():
                written = time.time()
            # the child's own high-water mark, read while it runs: wait4's ru_maxrss would
            # carry this (forked) process's peak over the exec
            peak_kib = max(peak_kib, _high_water_kib(proc.pid))
            time.sleep(0.05)
        ended = time.time()
        if written is None and target is not None and target.exists():
            written = ended
        out.seek(0), err.seek(0)
        return _Run(proc.returncode, out.read(), err.read(), ended, written,
                    round(peak_kib / 1024, 1) if peak_kib else None)


def _high_water_kib(pid: int) -> int:
    """A live process's peak resident memory (VmHWM, KiB); 0 where unknown (not Linux, or the
    process is ending)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0
