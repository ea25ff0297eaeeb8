"""The modes the benchmark compares, each loaded fresh in the same process, one after the other:

* `recipe`: `reference.recipe_pipeline` exactly as the LCM-LoRA guide writes it (stock pipeline,
  LCM-LoRA loaded with `load_lora_weights` and left unfused),
* `default`, `auto`, `fastest`: `build_engine(speed=<mode>)`, what users of that preset get. A
  mode that
  compiles (`auto` and `fastest` on CUDA) compiles ahead, at start-up, exactly the shapes that are
  timed; that time is part of its load time, never of a timed call.

`--compile/--no-compile` and `--half` override a preset's choices: the engine is then built with
the preset's `FastPath` given those overrides (reported as such)."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from .measure import count_syncs, measure, prompt

MODES = ("recipe", "default", "auto", "fastest")
ENGINE_MODES = MODES[1:]
SEED = 42


def timed_shapes(args) -> tuple[tuple[int, int, int], ...]:
    """(width, height, batch) of every timed call: batch 1 and each throughput batch."""
    return tuple((args.resolution, args.resolution, b) for b in sorted({1, *args.batch}))


def overrides(args, mode: str) -> dict[str, Any]:
    """The options given on the command line that change a preset."""
    out: dict[str, Any] = {}
    if mode in ("auto", "fastest") and args.compile is not None:
        out["compile_unet"] = args.compile
    if mode == "fastest" and args.half is not None:
        out["dtype"] = None if args.half == "none" else args.half
    return out


def make_engine(args, mode: str, model, lora, taesd, shapes, cache_dir: str,
                loras: tuple[str, ...] = ()):
    """The engine of `mode`, its FastPath, the FastPath's report and how it was built. Compiles
    (and warms) `shapes` if the mode compiles; `loras` are preloaded (as a service's)."""
    from ..build import build_engine, inspect

    openvino = getattr(args, "openvino", "auto")
    options = dict(model=str(model), lcm_lora=str(lora), device=args.device, dtype=args.dtype,
                   speed=mode, openvino=openvino)
    if mode == "fastest":
        options["tiny_vae"] = str(taesd)
    if mode in ("auto", "fastest"):  # the modes that may build ahead
        options.update(compile_shapes=shapes, compile_cache=cache_dir)
    elif mode == "default":  # on CUDA its whole-loop graphs: for the timed shapes
        options.update(compile_shapes=shapes)
    preload = {f"lora.{i}": ref for i, ref in enumerate(loras)}
    changes = overrides(args, mode)
    if not changes:
        engine = build_engine(loras=preload, **options)
        return engine, engine.fast_path, engine.fast_report, f"build_engine(speed={mode!r})"
    from ..accel import FastPath, half_dtype_for
    from ..accel.openvino import choose

    blueprint = inspect(**options)
    ahead = {"compile_shapes": tuple(shapes), "compile_cache_dir": cache_dir} \
        if mode in ("auto", "fastest") else {}
    tiny = {"tiny_vae": str(taesd)} if mode == "fastest" else {}
    half = changes.get("dtype", half_dtype_for(blueprint.device))
    precision, _ = choose(openvino, mode, blueprint.device, half)
    if precision:
        changes["openvino"] = precision
    path = FastPath.preset(mode, blueprint.device, args.family, **ahead, **tiny, **changes)
    engine = build_engine(blueprint, loras=preload, fast_path=path)
    return engine, path, engine.fast_report, \
        f"build_engine(fast_path=FastPath.preset({mode!r}, {changes}))"


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _measure(args, run, pipe) -> dict[str, Any]:
    result = measure(run, pipe, device=args.device, steps=args.steps, batches=args.batch,
                     repeats=args.repeats, throughput_repeats=args.throughput_repeats,
                     breakdown_repeats=args.breakdown_repeats)
    result.update(count_syncs(run, pipe, device=args.device, steps=args.steps))
    return result


def recipe_mode(args, model: Path, lora: Path, dtype) -> dict[str, Any]:
    result = _recipe(args, model, lora, dtype)
    _free()  # the pipeline went with the call's frame
    return result


def _recipe(args, model: Path, lora: Path, dtype) -> dict[str, Any]:
    from ..reference import recipe_call, recipe_pipeline

    start = time.perf_counter()
    pipe = recipe_pipeline("txt2img", str(model), str(lora), torch_dtype=dtype,
                           device=args.device, sdxl=args.family != "sd15")
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start

    def run(batch, steps, prompt_index):
        return recipe_call(pipe, prompt(prompt_index), SEED, num_inference_steps=steps,
                           guidance_scale=1.0, height=args.resolution, width=args.resolution,
                           num_images_per_prompt=batch)

    result = {"load_s": round(load_s, 2), "compile_warmup_s": None, "compiled_shapes": []}
    result.update(_measure(args, run, pipe))
    return result


def engine_mode(args, mode: str, model: Path, lora: Path, taesd: Path) -> dict[str, Any]:
    result = _engine(args, mode, model, lora, taesd)
    _free()  # the engine went with the call's frame
    if result["compiled_shapes"]:
        import torch

        # forget the graphs of the engine just freed: the next mode compiles its own
        torch._dynamo.reset()
    return result


def _engine(args, mode: str, model: Path, lora: Path, taesd: Path) -> dict[str, Any]:
    from ..tasks import Txt2ImgRequest

    shapes = timed_shapes(args)
    start = time.perf_counter()
    engine, path, report, built = make_engine(args, mode, model, lora, taesd, shapes,
                                              args.compile_cache_dir)
    load_s = time.perf_counter() - start

    def run(batch, steps, prompt_index):
        request = Txt2ImgRequest(prompt=prompt(prompt_index), steps=steps, guidance=1.0,
                                 width=args.resolution, height=args.resolution, seed=SEED,
                                 num_images=batch)
        return engine.generate(request).images

    compiles = bool(path.options.compile_unet)
    result = {"load_s": round(load_s, 2),
              "compile_warmup_s": round(report.seconds["warmup"], 2)
              if "warmup" in report.seconds else None,
              "compiled_shapes": [f"{w}x{h}x{b}" for w, h, b in path.shapes(engine)]
              if compiles else []}
    runner = path.graph_runner
    replays = runner.replays if runner is not None else 0
    result.update(_measure(args, run, engine.base))
    if runner is not None:  # calls replayed as one CUDA graph: the stage split sees inside none
        result["graph_loop_calls"] = runner.replays - replays
    result["fast_path"] = {"built_with": built, "options": path.options.describe(),
                           "applied": report.applied, "checks": report.checks}
    if path.openvino is not None:  # which calls the converted models took (the rest: torch)
        result["openvino"] = {"calls": dict(path.openvino.calls),
                              "build_s": path.openvino.seconds,
                              "from_cache": path.openvino.cached}
    return result
