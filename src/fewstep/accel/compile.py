"""Compiling the UNet ahead of time, for declared shapes only, so no request waits for a compile.

At start-up each declared (width, height, batch) bucket runs once, which compiles its graph (or
loads it from the on-disk inductor cache, so the next process start is quick). From then on every
pipeline call runs under `torch.compiler.set_stance("eager_on_recompile")`: a shape that has a
compiled graph uses it, and any other shape runs the plain model at once instead of compiling."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

# UNet batch buckets per family at guidance <= 1 (one UNet row per image)
DEFAULT_SHAPES = {
    "sd15": ((512, 512, 1), (512, 512, 4)),
    "sdxl": ((1024, 1024, 1), (1024, 1024, 2)),
    "ssd-1b": ((1024, 1024, 1), (1024, 1024, 2)),
}


def configure_compiling(cache_dir: str | os.PathLike, shapes: int) -> Path:
    """The process-wide settings compiling ahead needs, set once for the process before the
    first compile (the builder calls it; a second engine in the process asks for the same):

    * inductor's kernels and FX graphs are kept in `cache_dir` and reused by the next process
      (inductor reads the folder from the environment when it first compiles, so it is
      process-wide by nature);
    * dynamo keeps a graph per declared shape: its per-function recompile limit (8 by default)
      is raised to hold `shapes` of them, else the later shapes would run uncompiled."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    inductor_config.fx_graph_cache = True
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, shapes + 8)
    return path


class AheadOfTimeCompiler:
    """Compiles each distinct UNet of an engine in place (`dynamic=False`), warms the declared
    shapes, and keeps requests from ever compiling."""

    def __init__(self, shapes, mode: str | None = None):
        self.shapes = tuple(tuple(int(v) for v in shape) for shape in shapes)
        self.mode = mode
        self._compiled: set[int] = set()
        self._warming = False
        self.warm_seconds: dict[str, float] = {}

    def install(self, engine) -> None:
        """Compile each UNet the engine has or makes (`configure_compiling` first)."""
        engine.add_pipeline_hook(self._compile)
        engine.add_call_context(self._stance)

    def _compile(self, pipe) -> None:
        unet = getattr(pipe, "unet", None)
        if unet is None or id(unet) in self._compiled:
            return
        self._compiled.add(id(unet))
        unet.compile(mode=self.mode, dynamic=False)

    def _stance(self):
        if self._warming:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("eager_on_recompile")

    def warm_up(self, run) -> float:
        """Run every declared shape with `run(width, height, batch)` (a short text-to-image
        call), twice: CUDA graph trees record on a later call than the one that compiles. So
        the compiling happens now, not inside a request."""
        start = time.perf_counter()
        self._warming = True
        try:
            for width, height, batch in self.shapes:
                began = time.perf_counter()
                for _ in range(2):
                    run(width, height, batch)
                self.warm_seconds[f"{width}x{height}x{batch}"] = time.perf_counter() - began
        finally:
            self._warming = False
        return time.perf_counter() - start
