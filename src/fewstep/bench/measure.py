"""Measuring one mode: latency, throughput, peak memory, where the time goes, host syncs, and the
graphs compiled while timed calls ran (there must be none: a request never waits for a compile).

A mode is a `run(batch, steps, prompt_index) -> images` function plus the pipeline it drives."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

Run = Callable[..., np.ndarray]
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def prompt(i: int) -> str:
    # a different prompt per call, so the prompt cache does not flatter fewstep's latency
    return PROMPT if i == 0 else f"{PROMPT}, variant {i}"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_reader() -> Callable[[], int]:
    """The process's resident memory in bytes: psutil when installed, else /proc (Linux)."""
    try:
        import psutil

        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return read


class MemoryPeak:
    """Peak memory while running: CUDA `max_memory_allocated`, else the process RSS sampled
    every 10 ms (everything the process holds, loaded weights included)."""

    def __init__(self, device: str):
        self.device = device
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rss: Callable[[], int] | None = None

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        rss = self._rss = _rss_reader()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, rss())
                self._stop.wait(0.01)

        self.peak = self.start = rss()
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


@dataclass
class _Span:
    kind: str
    start: float
    end: float


class StageTimer:
    """Splits pipeline calls into text encoding, the denoising loop (the UNet steps) and the VAE
    decode, by timing two methods on the pipeline's instances: `encode_prompt` (the engine calls
    it before the pipeline; the pipeline calls it once more with the embeddings given) and
    `vae.decode`. The UNet itself is not touched, so a compiled UNet sees no change and compiles
    nothing: the loop is the time from the last text encoding to the decode. On CUDA each
    boundary synchronizes, so these calls are not the timed ones."""

    def __init__(self, pipe, device: str):
        self.pipe, self.device = pipe, device
        self.calls: list[dict[str, float]] = []
        self._spans: list[_Span] | None = None
        self._undo: list[Callable[[], None]] = []

    def _wrap(self, obj, attr: str, kind: str) -> None:
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            if self._spans is None:
                return original(*args, **kwargs)
            sync(self.device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            sync(self.device)
            self._spans.append(_Span(kind, start, time.perf_counter()))
            return out

        had, previous = attr in obj.__dict__, obj.__dict__.get(attr)  # e.g. a wrapped method
        setattr(obj, attr, timed)
        self._undo.append(lambda: setattr(obj, attr, previous) if had
                          else obj.__dict__.pop(attr, None))

    def __enter__(self):
        self._wrap(self.pipe, "encode_prompt", "text")
        self._wrap(self.pipe.vae, "decode", "vae")
        return self

    def __exit__(self, *exc):
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def timed(self, fn: Callable[[], Any]) -> Any:
        """Run one pipeline call and record its stages."""
        self._spans = []
        sync(self.device)
        start = time.perf_counter()
        try:
            out = fn()
            sync(self.device)
        finally:
            spans, self._spans = self._spans, None
        end = time.perf_counter()
        text = [s for s in spans if s.kind == "text"]
        vae = [s for s in spans if s.kind == "vae"]
        decode_start = min((s.start for s in vae), default=end)
        loop_start = max((s.end for s in text if s.end <= decode_start), default=start)
        record = {"total": end - start, "text_encode": sum(s.end - s.start for s in text),
                  "unet_steps": decode_start - loop_start,
                  "vae_decode": sum(s.end - s.start for s in vae)}
        record["other"] = record["total"] - record["text_encode"] - record["unet_steps"] - \
            record["vae_decode"]
        self.calls.append(record)
        return out

    def summary(self, steps: int) -> dict[str, Any]:
        def ms(key):
            return round(float(np.median([c[key] for c in self.calls])) * 1000, 1) \
                if self.calls else None

        out = {f"{key}_ms": ms(key) for key in ("text_encode", "unet_steps", "vae_decode",
                                                "other", "total")}
        out["unet_step_ms"] = round(out["unet_steps_ms"] / steps, 1) if self.calls else None
        out["calls"] = len(self.calls)
        return out


class DecodedImages:
    """Counts the images `vae.decode` decodes in a call: a call for N images that decodes more
    did work it threw away (wrapping the VAE never touches a compiled UNet)."""

    def __init__(self, pipe):
        self.vae = pipe.vae
        self.count = 0

    def __enter__(self):
        original = self.vae.decode
        # a decode set on the instance (the OpenVINO route) is put back afterwards
        self._previous = self.vae.__dict__.get("decode")

        def decode(z, *args, **kwargs):
            self.count += int(z.shape[0])
            return original(z, *args, **kwargs)

        self.vae.decode = decode
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            self.vae.decode = self._previous
        else:
            self.vae.__dict__.pop("decode", None)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(run: Run, pipe, *, device: str, steps: int, batches: list[int], repeats: int,
            throughput_repeats: int, breakdown_repeats: int) -> dict[str, Any]:
    """Warm every timed shape up, then: batch-1 latency (`repeats` calls), throughput at each
    batch size, peak memory over both, the graphs compiled meanwhile, and the stages of a call.

    The warm-up runs each shape that is timed (batch 1 and each of `batches`) with the timed
    step count: on CUDA twice, since CUDA graphs are recorded on a shape's second run."""
    cuda = device.startswith("cuda")
    shapes = sorted({1, *batches})
    first_call = None
    for _ in range(2 if cuda else 1):
        for batch in shapes:
            sync(device)
            start = time.perf_counter()
            run(batch, steps=steps, prompt_index=-1 - batch)
            sync(device)
            if first_call is None:  # what the first request after start-up waits
                first_call = time.perf_counter() - start
    # on a CPU the stage boundaries cost nothing: split the timed calls themselves
    timer = StageTimer(pipe, device) if not cuda else None
    load_before = os.getloadavg()[0]  # a shared machine's other work slows the timed calls
    graphs_before = compiled_graphs()
    with MemoryPeak(device) as memory:
        times, first = [], None
        with timer if timer is not None else _Nothing():
            for i in range(repeats):
                sync(device)
                start = time.perf_counter()
                if timer is not None:
                    images = timer.timed(lambda i=i: run(1, steps=steps, prompt_index=i))
                else:
                    images = run(1, steps=steps, prompt_index=i)
                sync(device)
                times.append(time.perf_counter() - start)
                if first is None:
                    first = images
        throughput, decoded = {}, {}
        for batch in batches:
            runs, counts = [], []
            for i in range(throughput_repeats):
                with DecodedImages(pipe) as images_decoded:
                    sync(device)
                    start = time.perf_counter()
                    run(batch, steps=steps, prompt_index=100 + i)
                    sync(device)
                    runs.append(time.perf_counter() - start)
                counts.append(images_decoded.count)
            throughput[str(batch)] = round(batch / float(np.median(runs)), 4)
            decoded[str(batch)] = max(counts)  # per call: the most any timed call decoded
    recompiles = compiled_graphs() - graphs_before
    load_after = os.getloadavg()[0]
    if timer is None:
        timer = StageTimer(pipe, device)
        with timer:
            for i in range(breakdown_repeats):
                timer.timed(lambda i=i: run(1, steps=steps, prompt_index=200 + i))
    ms = np.array(times) * 1000
    return {
        "latency_ms_p50": round(float(np.percentile(ms, 50)), 1),
        "latency_ms_p90": round(float(np.percentile(ms, 90)), 1),
        "latency_ms_all": [round(float(t), 1) for t in ms],
        "first_call_ms": round(first_call * 1000, 1),
        "images_per_s": throughput[str(max(batches))],
        "images_per_s_by_batch": throughput,
        "images_decoded_by_batch": decoded,
        "peak_memory_mb": memory.mb,
        "recompiles_during_timed_calls": recompiles,
        "load_average_1min": [round(load_before, 2), round(load_after, 2)],
        "breakdown": timer.summary(steps),
        "image_finite": bool(np.isfinite(first).all()),
        "_first_image": first,
    }


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def count_syncs(run: Run, pipe, *, device: str, steps: int) -> dict[str, Any]:
    """Host syncs of one batch-1 call, after the timed calls (these counts slow a call down).

    * `host_syncs_per_call` (CUDA only, else None): every op of the call that reads a device
      tensor back to the host (`SyncCounter(device_only=True)`). Under a dispatch mode dynamo
      runs the UNet eagerly; the UNet has no reads of its own, so the count is the loop's and
      the pipeline's.
    * `scalar_reads_in_loop`: scalar reads between the first UNet call and the VAE decode, on any
      device (`count_loop_syncs`): the CPU-side proof that the loop would not stall a GPU.
    * `unet_batch_per_image`: the UNet's batch at guidance 1 (1: no classifier-free doubling).
    * `profiler` (CUDA only): what the torch profiler saw in one call with nothing wrapped:
      `cudaStreamSynchronize` and scalar-read counts and the busiest host operations."""
    from ..accel.syncs import SyncCounter, count_loop_syncs, unet_batches

    out: dict[str, Any] = {"host_syncs_per_call": None}
    with unet_batches(pipe) as seen:
        reads, _ = count_loop_syncs(pipe, lambda: run(1, steps=steps, prompt_index=300))
    out["scalar_reads_in_loop"] = reads
    out["unet_batch_per_image"] = seen[0] if seen else None
    if device.startswith("cuda"):
        counter = SyncCounter(device_only=True)
        with counter:
            run(1, steps=steps, prompt_index=301)
        sync(device)
        out["host_syncs_per_call"] = counter.count
        out["profiler"] = profile_call(lambda: run(1, steps=steps, prompt_index=302), device)
    return out


def profile_call(fn: Callable[[], Any], device: str, rows: int = 12) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    averages = prof.key_averages()
    counts = {e.key: e.count for e in averages}
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return {
        "cudaStreamSynchronize": counts.get("cudaStreamSynchronize", 0),
        "cudaDeviceSynchronize": counts.get("cudaDeviceSynchronize", 0),
        "aten::_local_scalar_dense": counts.get("aten::_local_scalar_dense", 0),
        "aten::nonzero": counts.get("aten::nonzero", 0),
        "host_busiest": [{"op": e.key, "count": e.count,
                          "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2)} for e in top],
        "torch": torch.__version__,
    }
