"""LoRA changes on a compiled UNet: an engine compiles its UNet ahead (two style LoRAs preloaded, as
`build_engine(loras=...)` does for a service), then requests change the LoRA stack and weights.
Each call is timed and the graphs dynamo compiled for it are counted: a stack fused into the same
weight tensors must compile nothing (0 new graphs), and the switch costs only the weight writes.

Tiny models with `--tiny` (a CPU check), else the family's real architecture at `--resolution`
with rank-16 style LoRAs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .measure import compiled_graphs, sync
from .modes import make_engine


def lora_switch(args, workdir: Path) -> dict[str, Any]:
    import os

    import torch

    from ..tasks import LoraRequest, Txt2ImgRequest

    if args.tiny:
        from ..testing import build_tiny_models

        tiny = build_tiny_models(workdir / "tiny-lora-switch")
        model, lcm = tiny.sd15, tiny.lcm_sd15
        styles = [str(tiny.style_sd15), str(tiny.style_sd15_peft)]
        size, taesd = 64, None
    else:
        from ..config import pick_dtype
        from .models import build_real, build_style_loras

        model, lcm, taesd = build_real(args.family, workdir / args.family,
                                       pick_dtype(args.dtype, args.device), args.device)
        styles = [str(p) for p in build_style_loras(args.family, workdir / "style-loras")]
        size = args.resolution
    # the auto preset compiles on CUDA only: here the UNet is always compiled (the point)
    if args.compile is None:
        args.compile = True
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    engine, path, report, built = make_engine(args, "auto", model, lcm, taesd,
                                              ((size, size, 1),), args.compile_cache_dir,
                                              loras=tuple(styles))
    load_s = time.perf_counter() - start
    first, second = styles
    plan = [("no LoRA (after warm-up)", []),
            ("style A 0.5 (first use)", [(first, 0.5)]),
            ("style A 0.8 (weight change)", [(first, 0.8)]),
            ("style A 0.8 (same again)", [(first, 0.8)]),
            ("style A 0.3 (weight change)", [(first, 0.3)]),
            ("style A 0.8 + style B 0.5 (second LoRA added)", [(first, 0.8), (second, 0.5)]),
            ("style A 0.4 + style B 0.9 (both weights changed)", [(first, 0.4), (second, 0.9)]),
            ("no LoRA again", [])]
    rows = []
    for label, stack in plan:
        graphs = compiled_graphs()
        sync(args.device)
        began = time.perf_counter()
        engine.generate(Txt2ImgRequest(prompt="switch", steps=args.steps, width=size,
                                       height=size, seed=1,
                                       loras=[LoraRequest(ref=r, weight=w) for r, w in stack]))
        sync(args.device)
        rows.append({"call": label, "seconds": round(time.perf_counter() - began, 3),
                     "new_graphs": compiled_graphs() - graphs})
    from .report import device_name

    return {"family": "sd15 (tiny)" if args.tiny else args.family, "resolution": size,
            "steps": args.steps, "device": device_name(args.device), "built_with": built,
            "applied": report.applied, "load_s": round(load_s, 2),
            "warmup_compile_s": round(report.seconds.get("warmup", 0.0), 2),
            "calls": rows, "torch": torch.__version__,
            "load_average_1min": {"start": round(load_start, 2),
                                  "end": round(os.getloadavg()[0], 2)},
            "cpu_cores": os.cpu_count()}
