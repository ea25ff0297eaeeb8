"""Device check of the whole-loop CUDA graph (`build_engine(cuda_graph_loop="on")`): on one engine,
the same requests through the captured graph and through the plain pipeline (the runner taken
off), their largest pixel difference, and the latency of each. Prints one JSON object.

    PYTHONPATH=src python scripts/graph_loop_check.py --family sd15 --size 512     # real sizes
    PYTHONPATH=src python scripts/graph_loop_check.py --tiny                        # seconds
    PYTHONPATH=src python scripts/graph_loop_check.py --speed auto   # over the compiled UNet

On a machine without CUDA it says so and exits 2 (the runner captures nothing there);
`--cpu-eager --tiny` runs the same check with the loop run eagerly on the CPU (this script's own
check, not the graph's)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="sd15", choices=("sd15", "sdxl", "ssd-1b"))
    parser.add_argument("--size", type=int, default=None, help="default 512 (sd15), 1024")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="the tiny test models, 64x64")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--cpu-eager", action="store_true", help="no graph: the loop, eagerly")
    parser.add_argument("--speed", default="default", choices=("default", "auto", "fastest"),
                        help="the preset under the graph (auto, fastest: the compiled UNet)")
    args = parser.parse_args()

    import numpy as np
    import torch

    if not torch.cuda.is_available() and not args.cpu_eager:
        print(json.dumps({"error": "no CUDA device: the graph loop only runs on CUDA"}))
        return 2
    from fewstep.accel import FastPath
    from fewstep.accel.graphs import GraphedTxt2ImgRunner
    from fewstep.bench.models import build_real, build_tiny
    from fewstep.build import build_engine
    from fewstep.tasks import Txt2ImgRequest

    work = Path(args.workdir or tempfile.mkdtemp(prefix="graph-loop-"))
    if args.tiny:
        model, lora, taesd = build_tiny(work / "tiny", args.family)
        size = 64
    else:
        model, lora, taesd = build_real(args.family, work / args.family, torch.float16, "cuda")
        size = args.size or (512 if args.family == "sd15" else 1024)
    shape = (size, size, args.batch)
    device, dtype = ("cpu", "fp32") if args.cpu_eager else ("cuda", "fp16")
    began = time.perf_counter()
    # the preset plus the graph loop for this shape and step count
    path = FastPath.preset(args.speed, device, args.family, compile_shapes=(shape,),
                           graph_steps=(args.steps,), cuda_graph_loop=not args.cpu_eager,
                           **({"tiny_vae": str(taesd)} if args.speed == "fastest" else {}))
    engine = build_engine(model=str(model), lcm_lora=str(lora), device=device, dtype=dtype,
                          fast_path=path)
    runner = path.graph_runner
    if args.cpu_eager:
        runner = GraphedTxt2ImgRunner((shape,), (args.steps,), eager=True)
        runner.install(engine)
    load_s = time.perf_counter() - began
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def request(seed: int):
        return Txt2ImgRequest(prompt="a lighthouse at dusk", seed=seed, steps=args.steps,
                              width=size, height=size, num_images=args.batch)

    def timed(seeds):
        images, seconds = [], []
        for seed in seeds:
            sync()
            start = time.perf_counter()
            images.append(engine.generate(request(seed)).images)
            seconds.append(time.perf_counter() - start)
        return images, seconds

    seeds = list(range(args.repeats))
    timed(seeds[:2])  # warm
    replays = runner.replays
    graphed, graphed_s = timed(seeds)
    graphed_calls = runner.replays - replays
    runner.remove()  # the same engine, every call on the pipeline
    timed(seeds[:2])
    plain, plain_s = timed(seeds)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(graphed, plain))
    print(json.dumps({
        "family": args.family, "speed": args.speed, "shape": shape, "steps": args.steps,
        "tiny": args.tiny,
        "applied": path.report.applied.get("cuda_graph_loop"),
        "capture_s": runner.capture_seconds, "engine_load_s": round(load_s, 2),
        "graphed_calls": graphed_calls, "last_declined": runner.declined,
        "max_abs_diff_vs_pipeline": diff,
        "bitwise_equal": all(np.array_equal(a, b) for a, b in zip(graphed, plain)),
        "p50_ms": {"graphed": 1000 * float(np.median(graphed_s)),
                   "pipeline": 1000 * float(np.median(plain_s))},
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (eager loop)",
    }, indent=1))
    return 0 if graphed_calls == len(seeds) and diff <= 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
