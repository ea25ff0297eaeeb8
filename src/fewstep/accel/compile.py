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


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fewstep" / "compile"


def use_cache_dir(folder: str | os.PathLike) -> Path:
    """Keep inductor's compiled kernels and graphs in `folder` (reused by the next process)."""
    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
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
        import torch._dynamo.config as dynamo_config

        # every declared shape keeps its graph (dynamo's default keeps 8 per function)
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit,
                                             len(self.shapes) + 8)
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

    def warm_up(self, engine) -> float:
        """Run every declared shape (text-to-image, twice two steps: CUDA graph trees record on
        a later call than the one that compiles): compiles now, not inside a request."""
        from ..tasks import Txt2ImgRequest

        start = time.perf_counter()
        self._warming = True
        try:
            for width, height, batch in self.shapes:
                began = time.perf_counter()
                for _ in range(2):
                    engine.generate(Txt2ImgRequest(prompt="warm-up", steps=2, seed=0,
                                                   width=width, height=height,
                                                   num_images=batch))
                self.warm_seconds[f"{width}x{height}x{batch}"] = time.perf_counter() - began
        finally:
            self._warming = False
        return time.perf_counter() - start


def parse_shapes(text: str, field: str = "compile_shapes") -> tuple[tuple[int, int, int], ...]:
    """`512x512x1,512x512x4` -> ((512, 512, 1), (512, 512, 4)); the batch defaults to 1."""
    from ..errors import InvalidRequest

    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        pieces = part.lower().split("x")
        try:
            values = [int(p) for p in pieces]
        except ValueError:
            values = []
        if len(values) == 2:
            values.append(1)
        if len(values) != 3 or min(values) < 1 or values[0] % 8 or values[1] % 8:
            raise InvalidRequest(
                f"{field}: {part!r} is not WIDTHxHEIGHT[xBATCH] with sizes multiples of 8",
                field=field)
        shapes.append(tuple(values))
    return tuple(shapes)
