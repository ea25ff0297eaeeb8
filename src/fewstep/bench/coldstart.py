"""Cold start: a fresh process, from its start to its first decoded image (imports, loading, LoRA
fusing, compiling ahead, one image). A mode that compiles runs twice with the same compile cache
folder: first empty (`cold`), then with what the first run left in it (`warm`), as a service's
next start would find it. Engines compile the batch-1 shape only here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
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
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
    if proc.returncode or line is None:
        return {"error": (proc.stderr or proc.stdout)[-800:]}
    info = json.loads(line[len(MARK):])
    return {"process_start_to_first_image_s": round(info["first_image_at"] - start, 2),
            "import_s": round(info["imported_at"] - start, 2),
            "load_s": round(info["loaded_at"] - info["imported_at"], 2),
            "first_image_s": round(info["first_image_at"] - info["loaded_at"], 2),
            "compiles": info["compiles"], "finite": info["finite"]}


def cold_starts(args, modes: list[str], model, lora, taesd, workdir: Path) -> dict[str, Any]:
    """{mode: timings} for the recipe and engines that do not compile; {mode: {"cold": timings,
    "warm": timings}} for an engine that compiles."""
    out: dict[str, Any] = {}
    for mode in modes:
        cache = tempfile.mkdtemp(prefix=f"compile-cache-{mode}-", dir=workdir)
        first = _spawn(args, mode, model, lora, taesd, cache)
        if first.get("compiles"):
            out[mode] = {"cold": first, "warm": _spawn(args, mode, model, lora, taesd, cache)}
        else:
            out[mode] = first
    return out
