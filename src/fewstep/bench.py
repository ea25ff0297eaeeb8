"""The benchmark: the reference recipe against fewstep (default and fastest) on the same weights.

    python -m fewstep.bench --family sd15 --resolution 256 --steps 4 --batch 1,2 --device cpu

The real architectures (SD1.5, SDXL, SSD-1B: UNet, text encoders, VAE) are built from their
configs with random weights -- speed does not depend on weight values -- and saved in the real
formats (a diffusers folder, an LCM-LoRA `pytorch_lora_weights.safetensors` of the published
shape: kohya keys, rank 64, alpha 8 on the published target modules), so the recipe and fewstep
both load through their real loading code. In one process, one after the other:

* `recipe`: `reference.recipe_pipeline` exactly as written (stock pipeline, LCM-LoRA unfused),
* `default`: `Engine` (LCM-LoRA fused) with `FastPath.preset("default")`,
* `fastest`: the same engine with `FastPath.preset("fastest")` (half precision where it pays, a
  tiny VAE of the real taesd config with random weights, `torch.compile` on CUDA).

Cold start (process start to first image) runs in subprocesses. See benchmarks/README.md."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np

MODES = ("recipe", "default", "fastest")
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEED = 42
LCM_RANK, LCM_ALPHA = 64, 8.0

# -- the real architectures ------------------------------------------------------------------

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                 num_hidden_layers=32, projection_dim=1280, hidden_act="gelu")
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, cross_attention_dim=2048)
# SSD-1B: SDXL with transformer layers pruned (down 2/4, up 4-4-10 / 2-1-1) and no attention in
# the mid block; this gives its published sizes (UNet 1.33B, LCM-LoRA 105M parameters)
SSD1B_UNET = dict(SDXL_UNET, transformer_layers_per_block=(1, 2, 4),
                  reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]],
                  mid_block_type="UNetMidBlock2D")
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4)


def _text_encoder(config: dict, projection: bool):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    # token ids of fewstep.testing.write_tokenizer's vocabulary; the real vocabulary size
    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1, **config)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_real(family: str, folder: Path, dtype) -> tuple[Path, Path, Path]:
    """Write the family's real-size pipeline (random weights), its LCM-LoRA and a tiny VAE
    of the real taesd/taesdxl config into `folder`; return (model, lcm_lora, tiny_vae) paths."""
    import torch
    from diffusers import (AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTokenizer

    from .families import LCM_TARGET_SUFFIXES
    from .testing import _scheduler, write_tokenizer, write_kohya_lora

    model, lora, taesd = folder / "model", folder / "lcm-lora", folder / "taesd"
    marker = folder / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"family": family,
                                                               "dtype": str(dtype)}:
        return model, lora, taesd
    shutil.rmtree(folder, ignore_errors=True)
    write_tokenizer(folder / "tokenizer-src")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer-src"))
    sdxl = family != "sd15"
    unet_cfg = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "ssd-1b": SSD1B_UNET}[family]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_cfg)
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE, sample_size=1024 if sdxl else 512,
                        scaling_factor=0.13025 if sdxl else 0.18215, force_upcast=sdxl)
    if sdxl:
        pipe = StableDiffusionXLPipeline(
            unet=unet, vae=vae, text_encoder=_text_encoder(CLIP_L, False),
            text_encoder_2=_text_encoder(CLIP_BIGG, True), tokenizer=tokenizer,
            tokenizer_2=tokenizer, scheduler=_scheduler(True))
    else:
        pipe = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=_text_encoder(CLIP_L, False), tokenizer=tokenizer,
            scheduler=_scheduler(False), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    write_kohya_lora(lora / "pytorch_lora_weights.safetensors", unet, rank=LCM_RANK,
                     alpha=LCM_ALPHA, suffixes=LCM_TARGET_SUFFIXES, seed=1)
    pipe.to(dtype=dtype).save_pretrained(model)
    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(taesd)  # the published taesd / taesdxl config
    del pipe, unet, vae
    gc.collect()
    marker.write_text(json.dumps({"family": family, "dtype": str(dtype)}))
    return model, lora, taesd


def build_tiny(folder: Path, family: str) -> tuple[Path, Path, Path]:
    import torch
    from diffusers import AutoencoderTiny

    from .testing import build_tiny_models

    tiny = build_tiny_models(folder)
    taesd = folder / "taesd"
    torch.manual_seed(0)
    # the tiny models' VAE scales by 2: two blocks
    AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).save_pretrained(taesd)
    model, lora = {"sd15": (tiny.sd15, tiny.lcm_sd15), "sdxl": (tiny.sdxl, tiny.lcm_sdxl),
                   "ssd-1b": (tiny.ssd1b, tiny.lcm_ssd1b)}[family]
    return model, lora, taesd


# -- measuring -------------------------------------------------------------------------------


class MemoryPeak:
    """Peak memory while running: CUDA `max_memory_allocated`, else the process RSS sampled
    every 10 ms (everything the process holds, loaded weights included)."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            proc = psutil.Process()

            def sample():
                while not self._stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    self._stop.wait(0.01)

            self.peak = proc.memory_info().rss
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


class Breakdown:
    """Time spent in the text encoders, the UNet (per call) and the VAE decode, by wrapping
    their methods on the instances (removed afterwards). Also records the UNet's batch."""

    def __init__(self, pipe, device: str):
        self.pipe, self.device = pipe, device
        self.times: dict[str, list[float]] = {"text_encode": [], "unet": [], "vae_decode": []}
        self.unet_batch: list[int] = []
        self._undo: list[Callable] = []

    def _wrap(self, obj, attr: str, key: str, on_call=None):
        import torch

        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            if on_call:
                on_call(args, kwargs)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.times[key].append(time.perf_counter() - start)
            return out

        had, previous = attr in obj.__dict__, obj.__dict__.get(attr)  # e.g. the prompt cache
        setattr(obj, attr, timed)
        self._undo.append(lambda: setattr(obj, attr, previous) if had
                          else obj.__dict__.pop(attr, None))

    def __enter__(self):
        pipe = self.pipe
        self._wrap(pipe, "encode_prompt", "text_encode")
        self._wrap(pipe.unet, "forward", "unet", lambda a, k: self.unet_batch.append(
            int((a[0] if a else k["sample"]).shape[0])))
        self._wrap(pipe.vae, "decode", "vae_decode")
        return self

    def __exit__(self, *exc):
        for undo in self._undo:
            undo()

    def summary(self, calls: int) -> dict[str, Any]:
        def ms(values):
            return round(float(np.median(values)) * 1000, 1) if values else None

        return {"text_encode_ms": ms(self.times["text_encode"]),
                "unet_call_ms": ms(self.times["unet"]),
                "vae_decode_ms": ms(self.times["vae_decode"]),
                "unet_batch_per_image_at_guidance_1": (self.unet_batch[0]
                                                       if self.unet_batch else None)}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(run: Callable[..., np.ndarray], args, pipe_for_breakdown) -> dict[str, Any]:
    """Warm up, then batch-1 latency (`repeats` calls) and throughput at each batch size."""
    out: dict[str, Any] = {}
    for batch in args.batch:  # warm-up: one step per batch size (same shapes, kernels, caches)
        run(batch, steps=1, prompt_index=-1)
    with MemoryPeak(args.device) as memory:
        times, first = [], None
        breakdown = Breakdown(pipe_for_breakdown, args.device) if pipe_for_breakdown else None
        with breakdown if breakdown else _nothing():
            for i in range(args.repeats):
                _sync(args.device)
                start = time.perf_counter()
                images = run(1, steps=args.steps, prompt_index=i)
                _sync(args.device)
                times.append(time.perf_counter() - start)
                if first is None:
                    first = images
        throughput = {}
        for batch in args.batch:
            runs = []
            for i in range(args.throughput_repeats):
                _sync(args.device)
                start = time.perf_counter()
                run(batch, steps=args.steps, prompt_index=100 + i)
                _sync(args.device)
                runs.append(time.perf_counter() - start)
            throughput[str(batch)] = round(batch / float(np.median(runs)), 4)
    ms = np.array(times) * 1000
    out.update(
        latency_ms_p50=round(float(np.percentile(ms, 50)), 1),
        latency_ms_p90=round(float(np.percentile(ms, 90)), 1),
        latency_ms_all=[round(float(t), 1) for t in ms],
        images_per_s=throughput[str(max(args.batch))],
        images_per_s_by_batch=throughput,
        peak_memory_mb=memory.mb,
        image_finite=bool(np.isfinite(first).all()),
    )
    if breakdown:
        out["breakdown"] = breakdown.summary(args.repeats)
    out["_first_image"] = first
    return out


@contextmanager
def _nothing():
    yield


def prompt(i: int) -> str:
    # a different prompt per call, so the prompt cache does not flatter fewstep's latency
    return PROMPT if i == 0 else f"{PROMPT}, variant {i}"


# -- the three modes ---------------------------------------------------------------------------


def recipe_mode(args, model, lora, dtype):
    import torch

    from .reference import recipe_call, recipe_pipeline

    load_start = time.perf_counter()
    pipe = recipe_pipeline("txt2img", str(model), str(lora), torch_dtype=dtype,
                           device=args.device, sdxl=args.family != "sd15")
    load_s = time.perf_counter() - load_start

    def run(batch, steps, prompt_index):
        return recipe_call(pipe, prompt(prompt_index), SEED, num_inference_steps=steps,
                           guidance_scale=1.0, height=args.resolution, width=args.resolution,
                           num_images_per_prompt=batch)

    result = measure(run, args, pipe)
    result["load_s"] = round(load_s, 2)
    del pipe, run
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def engine_modes(args, model, lora, taesd, dtype_name):
    from .accel import FastPath
    from .engine import Engine
    from .tasks import Txt2ImgRequest

    load_start = time.perf_counter()
    engine = Engine(str(model), lcm_lora=str(lora), device=args.device, dtype=dtype_name,
                        speed="off")  # the fast paths below are applied explicitly
    load_s = time.perf_counter() - load_start

    def run(batch, steps, prompt_index):
        request = Txt2ImgRequest(prompt=prompt(prompt_index), steps=steps, guidance=1.0,
                                 width=args.resolution, height=args.resolution, seed=SEED,
                                 num_images=batch)
        return engine.generate(request).images

    results = {}
    for mode in ("default", "fastest"):
        start = time.perf_counter()
        path = fast_path(mode, args, str(taesd))
        report = path.apply(engine)
        compiled = path.options.compile_unet
        result = measure(run, args, None if compiled else engine.base)
        result["load_s"] = round(load_s + time.perf_counter() - start, 2)
        result["fast_path"] = {"options": path.options.describe(), "applied": report.applied,
                               "checks": report.checks}
        results[mode] = result
    return results


def fast_path(mode: str, args, taesd: str):
    from .accel import FastPath

    overrides: dict[str, Any] = {}
    if mode == "fastest":
        overrides["tiny_vae"] = taesd
        if args.compile is not None:
            overrides["compile_unet"] = args.compile
        if args.half is not None:
            overrides["dtype"] = args.half if args.half != "none" else None
        overrides["compile_cache_dir"] = args.compile_cache_dir
        overrides["compile_shapes"] = tuple((args.resolution, args.resolution, b) for b in args.batch)
    return FastPath.preset(mode, args.device, args.family, **overrides)


# -- cold start (subprocesses) -----------------------------------------------------------------


def child(args) -> None:
    """Run in a fresh process: load `args.child` mode and make one image; print timings."""
    t_import = time.time()
    model, lora, taesd = Path(args.model), Path(args.lora), args.taesd
    dtype_name = args.dtype
    from .config import pick_dtype

    if args.child == "recipe":
        import torch  # noqa: F401

        from .reference import recipe_call, recipe_pipeline

        pipe = recipe_pipeline("txt2img", str(model), str(lora),
                               torch_dtype=pick_dtype(dtype_name, args.device),
                               device=args.device, sdxl=args.family != "sd15")
        t_loaded = time.time()
        images = recipe_call(pipe, PROMPT, SEED, num_inference_steps=args.steps,
                             guidance_scale=1.0, height=args.resolution, width=args.resolution)
    else:
        from .engine import Engine
        from .tasks import Txt2ImgRequest

        engine = Engine(str(model), lcm_lora=str(lora), device=args.device, dtype=dtype_name,
                        speed="off")  # the fast paths below are applied explicitly
        args.batch = [1]
        fast_path(args.child, args, taesd).apply(engine)  # includes compile warm-up
        t_loaded = time.time()
        images = engine.generate(Txt2ImgRequest(
            prompt=PROMPT, steps=args.steps, width=args.resolution, height=args.resolution,
            seed=SEED)).images
    _sync(args.device)
    done = time.time()
    print("FEWSTEP-BENCH-CHILD " + json.dumps({
        "imported_at": t_import, "loaded_at": t_loaded, "first_image_at": done,
        "finite": bool(np.isfinite(images).all())}), flush=True)


def cold_start(args, mode: str, model, lora, taesd, cache_dir: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fewstep.bench", "--child", mode, "--model", str(model),
           "--lora", str(lora), "--taesd", str(taesd), "--family", args.family,
           "--resolution", str(args.resolution), "--steps", str(args.steps),
           "--device", args.device, "--dtype", args.dtype,
           "--compile-cache-dir", cache_dir]
    if args.compile is not None:
        cmd += ["--compile" if args.compile else "--no-compile"]
    if args.half is not None:
        cmd += ["--half", args.half]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir,
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FEWSTEP-BENCH-CHILD ")),
                None)
    if proc.returncode or line is None:
        return {"error": (proc.stderr or proc.stdout)[-800:]}
    info = json.loads(line.split(" ", 1)[1])
    return {"process_start_to_first_image_s": round(info["first_image_at"] - start, 2),
            "import_s": round(info["imported_at"] - start, 2),
            "load_s": round(info["loaded_at"] - info["imported_at"], 2),
            "first_image_s": round(info["first_image_at"] - info["loaded_at"], 2)}


# -- LoRA weight changes under torch.compile ---------------------------------------------------


def lora_switch(args, workdir: Path) -> dict[str, Any]:
    """Compile the UNet (tiny SD1.5 model), then change the request's LoRA stack and weights:
    time each call and count the graphs dynamo compiled for it (0 = no recompilation)."""
    import torch
    from torch._dynamo.utils import counters

    from .accel import FastOptions, FastPath
    from .engine import Engine
    from .tasks import LoraRequest, Txt2ImgRequest
    from .testing import build_tiny_models

    tiny = build_tiny_models(workdir / "tiny-lora-switch")
    engine = Engine(str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device=args.device,
                    dtype=args.dtype, speed="off")
    size = 64
    path = FastPath(FastOptions(compile_unet=True, compile_cache_dir=args.compile_cache_dir,
                                compile_shapes=((size, size, 1),)))
    report = path.apply(engine)
    style, peft = str(tiny.style_sd15), str(tiny.style_sd15_peft)
    plan = [("no LoRA (after warm-up)", []),
            ("style LoRA 0.5 (first load)", [(style, 0.5)]),
            ("style LoRA 0.8 (weight change)", [(style, 0.8)]),
            ("style LoRA 0.8 (same again)", [(style, 0.8)]),
            ("style LoRA 0.3 (weight change)", [(style, 0.3)]),
            ("style 0.8 + peft 0.5 (second LoRA added)", [(style, 0.8), (peft, 0.5)]),
            ("style 0.4 + peft 0.9 (both weights changed)", [(style, 0.4), (peft, 0.9)]),
            ("no LoRA again", [])]
    rows = []
    for label, stack in plan:
        graphs = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        engine.generate(Txt2ImgRequest(prompt="switch", steps=2, width=size, height=size,
                                       seed=1, loras=[LoraRequest(ref=r, weight=w)
                                                      for r, w in stack]))
        rows.append({"call": label, "seconds": round(time.perf_counter() - start, 2),
                     "new_graphs": counters["stats"]["unique_graphs"] - graphs})
    return {"warmup_compile_s": round(report.seconds.get("warmup", 0.0), 2), "calls": rows,
            "torch": torch.__version__}


# -- output ------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def device_slug(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device)).lower()
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"cpu-{os.cpu_count()}core"


def ratios(results: dict) -> dict[str, dict[str, float]]:
    base = results["recipe"]
    out = {}
    for mode in ("default", "fastest"):
        r = results[mode]
        out[mode] = {
            "latency_speedup": round(base["latency_ms_p50"] / r["latency_ms_p50"], 3),
            "throughput_ratio": round(r["images_per_s"] / base["images_per_s"], 3),
            "memory_ratio": round(r["peak_memory_mb"] / base["peak_memory_mb"], 3),
        }
    return out


def markdown(data: dict) -> str:
    cfg = data["config"]
    big = max(cfg["batch"])
    lines = [
        f"# {cfg['family']} {cfg['resolution']}x{cfg['resolution']}, {cfg['steps']} steps, "
        f"guidance 1.0 — {data['device']}",
        "",
        f"torch {data['versions']['torch']}, diffusers {data['versions']['diffusers']}, "
        f"dtype {cfg['dtype']}, {cfg['repeats']} timed calls at batch 1 after a warm-up, "
        f"random weights{' (tiny test models)' if cfg['tiny'] else ''}.",
        "",
        f"| mode | latency p50 (ms) | p90 (ms) | images/s (batch {big}) | peak memory (MB) "
        "| cold start (s) | speed-up vs recipe (p50) | throughput vs recipe |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        r = data["results"][mode]
        cold = data.get("cold_start", {}).get(mode, {})
        cold_s = cold.get("cold", cold).get("process_start_to_first_image_s", "—") \
            if isinstance(cold, dict) else "—"
        ratio = data["ratios"].get(mode, {"latency_speedup": 1.0, "throughput_ratio": 1.0})
        lines.append(f"| {mode} | {r['latency_ms_p50']} | {r['latency_ms_p90']} | "
                     f"{r['images_per_s']} | {r['peak_memory_mb']} | {cold_s} | "
                     f"{ratio['latency_speedup']}x | {ratio['throughput_ratio']}x |")
    rows = [(m, data["results"][m].get("breakdown")) for m in MODES]
    if any(b for _, b in rows):
        lines += ["", "Where the time goes (median per call, batch 1):", "",
                  "| mode | text encode (ms) | UNet call (ms) | VAE decode (ms) | "
                  "UNet batch per image |", "|---|---:|---:|---:|---:|"]
        for mode, b in rows:
            if b:
                lines.append(f"| {mode} | {b['text_encode_ms']} | {b['unet_call_ms']} | "
                             f"{b['vae_decode_ms']} | {b['unet_batch_per_image_at_guidance_1']} |")
            else:
                lines.append(f"| {mode} | (compiled: not split) | | | |")
    if data.get("cold_start"):
        lines += ["", "Cold start, process start to first image (s):", ""]
        for mode, info in data["cold_start"].items():
            lines.append(f"- {mode}: {json.dumps(info)}")
    if data.get("agreement"):
        lines += ["", "Largest pixel difference (0..1) of the first image against the recipe's: "
                  + ", ".join(f"{k} {v}" for k, v in data["agreement"].items())]
    return "\n".join(lines) + "\n"


def chart(data: dict, path: Path) -> None:
    labels = list(MODES)
    lat = [data["results"][m]["latency_ms_p50"] for m in labels]
    ips = [data["results"][m]["images_per_s"] for m in labels]
    title = (f"{data['config']['family']} {data['config']['resolution']}px "
             f"{data['config']['steps']} steps — {data['device']}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        colors = ["#888888", "#4c72b0", "#dd8452"]
        axes[0].bar(labels, lat, color=colors)
        axes[0].set_ylabel("batch-1 latency p50 (ms), lower is better")
        axes[1].bar(labels, ips, color=colors)
        axes[1].set_ylabel(f"images/s at batch {max(data['config']['batch'])}, higher is better")
        for ax, values in ((axes[0], lat), (axes[1], ips)):
            for i, v in enumerate(values):
                ax.text(i, v, f"{v:g}", ha="center", va="bottom")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except ImportError:
        _pil_chart(labels, lat, ips, title, path)


def _pil_chart(labels, lat, ips, title, path: Path) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (800, 360), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    for panel, (name, values) in enumerate((("latency p50 ms (lower is better)", lat),
                                            ("images/s (higher is better)", ips))):
        x0 = 20 + panel * 400
        draw.text((x0, 30), name, fill="black")
        top = max(values) or 1
        for i, (label, v) in enumerate(zip(labels, values)):
            h = int(250 * v / top)
            x = x0 + 20 + i * 120
            draw.rectangle([x, 320 - h, x + 80, 320], fill=(76, 114, 176))
            draw.text((x, 322), label, fill="black")
            draw.text((x, 305 - h), f"{v:g}", fill="black")
    img.save(path)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="fewstep bench", description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=("sd15", "sdxl", "ssd-1b"), default="sd15")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels (default: 512 for sd15, 1024 for sdxl/ssd-1b)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="batch sizes for throughput, e.g. 1,4 (default: 1,4 on CPU, "
                        "4,8,16 on CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="recipe and default dtype (auto: fp16 on "
                   "GPU, fp32 on CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed batch-1 calls per mode")
    p.add_argument("--throughput-repeats", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="JSON file (default: in --out)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default=None, help="result file stem (default: "
                   "<device>-<family>-<resolution>)")
    p.add_argument("--tiny", action="store_true", help="tiny test models: a smoke run")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the generated models here and reuse them (default: a temp dir)")
    p.add_argument("--cold-start", default="recipe,fastest",
                   help="modes to time from process start in a subprocess ('' for none); "
                        "fastest runs twice: empty then warm compile cache")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the UNet in the fastest mode (default: on CUDA only)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--half", default=None, help="fastest mode precision: bf16, fp16 or none "
                   "(default: fp16 on GPU, bf16 on a CPU with AMX/AVX512-BF16)")
    p.add_argument("--compile-cache-dir", default=None)
    p.add_argument("--lora-switch", action="store_true",
                   help="only measure LoRA weight changes on a compiled UNet (tiny models)")
    # internal: the cold-start subprocess
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--lora", help=argparse.SUPPRESS)
    p.add_argument("--taesd", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from .config import pick_device

    args.device = pick_device(args.device)
    if args.resolution is None:
        args.resolution = 512 if args.family == "sd15" else 1024
    if args.batch is None:
        args.batch = [1, 4] if args.device == "cpu" else [4, 8, 16]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        child(args)
        return 0
    import diffusers
    import torch

    from .config import pick_dtype

    dtype = pick_dtype(args.dtype, args.device)
    args.dtype = str(dtype).removeprefix("torch.")
    started = time.time()
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fewstep-bench-")
        workdir = Path(tmp.name)
    workdir = Path(workdir)
    if args.compile_cache_dir is None:
        args.compile_cache_dir = str(workdir / "inductor-cache")
    if args.lora_switch:
        try:
            data = lora_switch(args, workdir)
        finally:
            if tmp is not None:
                tmp.cleanup()
        text = json.dumps(data, indent=2) + "\n"
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text)
        print(text)
        return 0
    try:
        build_start = time.perf_counter()
        if args.tiny:
            model, lora, taesd = build_tiny(workdir / "tiny", args.family)
        else:
            model, lora, taesd = build_real(args.family, workdir / args.family, dtype)
        build_s = time.perf_counter() - build_start

        results = {"recipe": recipe_mode(args, model, lora, dtype)}
        results.update(engine_modes(args, model, lora, taesd, args.dtype))
        first = {m: results[m].pop("_first_image") for m in MODES}
        agreement = {m: round(float(np.abs(first[m] - first["recipe"]).max()), 6)
                     for m in ("default", "fastest") if first[m].shape == first["recipe"].shape}

        cold: dict[str, Any] = {}
        for mode in [m for m in args.cold_start.split(",") if m]:
            if mode == "fastest":
                cache = tempfile.mkdtemp(prefix="fewstep-inductor-", dir=workdir)
                cold[mode] = {"cold": cold_start(args, mode, model, lora, taesd, cache),
                              "warm": cold_start(args, mode, model, lora, taesd, cache)}
            else:
                cold[mode] = cold_start(args, mode, model, lora, taesd,
                                        tempfile.mkdtemp(dir=workdir))
    finally:
        if tmp is not None:
            tmp.cleanup()

    name = args.name or f"{device_slug(args.device)}-{args.family}-{args.resolution}"
    if args.tiny and args.name is None:
        name += "-tiny"
    data = {
        "device": device_name(args.device),
        "device_slug": device_slug(args.device),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
        "config": {"family": args.family, "resolution": args.resolution, "steps": args.steps,
                   "batch": args.batch, "device": args.device, "dtype": args.dtype,
                   "repeats": args.repeats, "throughput_repeats": args.throughput_repeats,
                   "guidance": 1.0, "tiny": args.tiny, "lcm_lora": {"rank": LCM_RANK,
                                                                    "alpha": LCM_ALPHA}},
        "results": results,
        "ratios": ratios(results),
        "agreement": agreement,
        "cold_start": cold,
        "memory_note": ("CUDA max_memory_allocated during the timed runs" if
                        args.device.startswith("cuda") else
                        "peak process RSS during the timed runs (weights of that mode "
                        "included; the recipe is freed before the engine loads)"),
        "build_models_s": round(build_s, 1),
        "wall_s": round(time.time() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.out / f"{name}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(data))
    chart(data, args.out / f"{name}.png")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
