"""`fewstep selftest`: tiny random-weight models of every family, every workflow through the real
loading code and the default speed preset, each compared with the reference recipe on the same
weights and seed. A line per case as it finishes; a few minutes on two cores.

Each model's engine is built as a one-shot command builds it: for the calls of that model's
cases, so what it builds ahead (OpenVINO on a CPU) is exactly what they run."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

PARITY_TOLERANCE = 1e-3  # max abs difference on 0..1 images, float32


@dataclass
class Case:
    name: str
    family: str
    model: Callable  # TinyModels -> model path
    lcm: Callable  # TinyModels -> LCM-LoRA path
    request: Callable  # TinyModels -> request
    component: Callable | None = None  # TinyModels -> component path for the recipe
    config: Callable | None = None  # single-file checkpoints: TinyModels -> config folder


def sample_image(seed: int = 0, size: int = 64):
    from PIL import Image

    rng = np.random.RandomState(seed)
    # smooth shapes, so canny finds edges
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([(x * 4 + rng.randint(0, 64)) % 256, (y * 3) % 256,
                    ((x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2) * 255], -1)
    return Image.fromarray(img.astype(np.uint8))


def sample_mask(size: int = 64):
    from PIL import Image

    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return Image.fromarray(mask).convert("RGB")


def cases() -> list[Case]:
    from .tasks import (AnimateRequest, ControlNetRequest, Img2ImgRequest, InpaintRequest,
                        LoraRequest, T2IAdapterRequest, Txt2ImgRequest)

    prompt = "a red lighthouse on a cliff"
    sd15 = dict(family="sd15", model=lambda m: m.sd15, lcm=lambda m: m.lcm_sd15)
    sdxl = dict(family="sdxl", model=lambda m: m.sdxl, lcm=lambda m: m.lcm_sdxl)
    return [
        Case("txt2img", request=lambda m: Txt2ImgRequest(prompt=prompt, seed=42), **sd15),
        Case("txt2img + 2 style LoRAs", request=lambda m: Txt2ImgRequest(
            prompt=prompt, seed=42, loras=[LoraRequest(ref=str(m.style_sd15), weight=0.8),
                                           LoraRequest(ref=str(m.style_sd15_peft), weight=0.5)]),
             **sd15),
        Case("txt2img single-file", family="sd15", model=lambda m: m.sd15_single_file,
             lcm=lambda m: m.lcm_sd15, config=lambda m: m.sd15,
             request=lambda m: Txt2ImgRequest(prompt=prompt, seed=7)),
        Case("img2img", request=lambda m: Img2ImgRequest(
            prompt=prompt, seed=1, image=sample_image()), **sd15),
        Case("inpaint (plain UNet)", request=lambda m: InpaintRequest(
            prompt=prompt, seed=2, image=sample_image(), mask=sample_mask()), **sd15),
        Case("inpaint (9-channel)", family="sd15", model=lambda m: m.sd15_inpaint,
             lcm=lambda m: m.lcm_sd15, request=lambda m: InpaintRequest(
                 prompt=prompt, seed=2, image=sample_image(), mask=sample_mask())),
        Case("controlnet canny", request=lambda m: ControlNetRequest(
            prompt=prompt, seed=3, control_image=sample_image(), controlnet=str(m.controlnet)),
             component=lambda m: m.controlnet, **sd15),
        Case("t2i-adapter canny", request=lambda m: T2IAdapterRequest(
            prompt=prompt, seed=4, control_image=sample_image(), adapter=str(m.adapter_sd15)),
             component=lambda m: m.adapter_sd15, **sd15),
        Case("animate + motion LoRA", request=lambda m: AnimateRequest(
            prompt=prompt, seed=5, motion_adapter=str(m.motion_adapter), num_frames=4,
            loras=[LoraRequest(ref=str(m.motion_lora), weight=1.2)]),
             component=lambda m: m.motion_adapter, **sd15),
        Case("txt2img", request=lambda m: Txt2ImgRequest(prompt=prompt, seed=42), **sdxl),
        Case("txt2img + LDM-named LoRA", request=lambda m: Txt2ImgRequest(
            prompt=prompt, seed=42, loras=[LoraRequest(ref=str(m.style_sdxl_ldm), weight=0.8)]),
             **sdxl),
        Case("img2img", request=lambda m: Img2ImgRequest(
            prompt=prompt, seed=1, image=sample_image()), **sdxl),
        Case("inpaint", request=lambda m: InpaintRequest(
            prompt=prompt, seed=2, image=sample_image(), mask=sample_mask()), **sdxl),
        Case("controlnet canny", request=lambda m: ControlNetRequest(
            prompt=prompt, seed=3, control_image=sample_image(),
            controlnet=str(m.controlnet_sdxl)), component=lambda m: m.controlnet_sdxl, **sdxl),
        Case("t2i-adapter canny", request=lambda m: T2IAdapterRequest(
            prompt=prompt, seed=4, control_image=sample_image(), adapter=str(m.adapter_sdxl),
            negative_prompt="blurry"), component=lambda m: m.adapter_sdxl, **sdxl),
        Case("txt2img", family="ssd-1b", model=lambda m: m.ssd1b, lcm=lambda m: m.lcm_ssd1b,
             request=lambda m: Txt2ImgRequest(prompt=prompt, seed=42)),
    ]


def run_case(case: Case, models, engines: dict, together: list[Case] | None = None) -> dict:
    """Run one case through fewstep and through the recipe; returns a table row. `engines`
    keeps one engine per model, built for the calls of `together` (the cases of the same
    model; default: this one)."""
    from .reference import recipe_arguments, recipe_call, recipe_pipeline

    start = time.perf_counter()
    model = str(case.model(models))
    if model not in engines:
        engines[model] = _engine_for(case, models, together or [case])
    engine = engines[model]
    if engine.family.name != case.family:
        raise AssertionError(f"family detected as {engine.family.name}, not {case.family}")
    request = case.request(models)
    result = engine.generate(request)

    recipe_model = str(case.config(models)) if case.config else model  # same weights
    sdxl = engine.family.sdxl_like
    component = str(case.component(models)) if case.component else None
    pipe = recipe_pipeline(request.task, recipe_model, str(case.lcm(models)),
                           lcm_weight=engine.animate_lcm_weight if request.task == "animate"
                           else engine.lcm_weight,
                           loras=[(lo.ref, lo.weight) for lo in request.loras],
                           component=component, sdxl=sdxl)
    channels = getattr(getattr(pipe, "adapter", None), "config", {}).get("in_channels", 3) \
        if request.task == "t2i-adapter" else 3
    expected = np.asarray(recipe_call(pipe, request.prompt, request.seed,
                                      **recipe_arguments(request, sdxl=sdxl,
                                                         adapter_channels=channels)))
    if expected.shape != result.images.shape:
        raise AssertionError(f"shape {result.images.shape} != recipe {expected.shape}")
    diff = float(np.abs(expected - result.images).max())
    return {"family": case.family, "workflow": case.name, "shape": result.images.shape,
            "max_diff": diff, "ok": diff <= PARITY_TOLERANCE and np.isfinite(diff),
            "seconds": time.perf_counter() - start}


def _engine_for(case: Case, models, together: list[Case]):
    """The engine of `case`'s model, at the recipe's LCM weights (1.0, 0.55 for animations),
    built for the calls of the cases run on it."""
    from .build import build_engine, inspect

    blueprint = inspect(model=str(case.model(models)), lcm_lora=str(case.lcm(models)),
                        model_config_dir=str(case.config(models)) if case.config else None,
                        device="cpu", dtype="fp32")
    calls = [blueprint.plan(other.request(models)) for other in together
             if str(other.model(models)) == str(case.model(models))]
    return build_engine(blueprint, calls=calls)


def run_selftest(keep: Path | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from .testing import build_tiny_models

    console = Console()
    every = cases()
    total = len(every)
    with tempfile.TemporaryDirectory(prefix="fewstep-selftest-") as tmp:
        root = keep or Path(tmp)
        with console.status("building tiny models"):
            models = build_tiny_models(root)
        console.print(f"fewstep selftest: {total} workflows on tiny models, each against the "
                      "reference recipe")
        table = Table(title="fewstep selftest: tiny models, parity with the reference recipe")
        for column in ("family", "workflow", "output", "max |diff|", "time", "result"):
            table.add_column(column)
        engines: dict = {}
        failures = 0
        for number, case in enumerate(every, 1):
            with console.status(f"[{number}/{total}] {case.family} {case.name}"):
                try:
                    row = run_case(case, models, engines, every)
                except Exception as exc:  # noqa: BLE001 - a failing case is reported, not fatal
                    row = {"family": case.family, "workflow": case.name, "shape": "-",
                           "max_diff": float("nan"), "ok": False, "seconds": 0.0,
                           "error": f"{type(exc).__name__}: {exc}"}
            failures += not row["ok"]
            verdict = "[green]pass[/]" if row["ok"] else f"[red]FAIL[/] {row.get('error', '')}"
            # each case as it finishes: a run cut short keeps what it showed
            console.print(f"[{number}/{total}] {row['family']} {row['workflow']}: {verdict} "
                          f"(max |diff| {row['max_diff']:.1e}, {row['seconds']:.1f} s)",
                          highlight=False)
            table.add_row(row["family"], row["workflow"], "x".join(map(str, row["shape"]))
                          if row["shape"] != "-" else "-", f"{row['max_diff']:.2e}",
                          f"{row['seconds']:.1f}s", verdict)
        console.print(table)
        console.print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0
