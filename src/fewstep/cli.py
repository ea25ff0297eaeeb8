"""`fewstep ...`: a thin shell over the engine. One command per task, shared options, a progress
bar per step; typed errors become a message and a non-zero exit code, and nothing is written."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .errors import FewstepError

console = Console(stderr=True, soft_wrap=True)  # messages stay on one line

TASK_OUT = {"animate": "fewstep.gif"}
DEFAULT_OUT = "fewstep.png"


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", help="hub id, local diffusers folder or .safetensors file "
                   "(default: the SD1.5 base, stable-diffusion-v1-5/stable-diffusion-v1-5)")
    g.add_argument("--config", help="local diffusers folder giving the config of a single-file "
                   "--model (needed offline)")
    g.add_argument("--family", choices=["sd15", "sdxl", "ssd-1b"],
                   help="override the detected family")
    g.add_argument("--lcm-lora", default="auto", metavar="REF[:WEIGHT]",
                   help="LCM-LoRA (default: the family's published one; 'none' for checkpoints "
                   "that are already LCM-distilled)")
    g.add_argument("--lora", action="append", default=[], metavar="REF[:WEIGHT]",
                   help="a style or motion LoRA; repeatable")
    g.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    g.add_argument("--dtype", help="auto (fp16 on GPUs, fp32 on cpu), fp16, bf16, fp32")
    g.add_argument("--speed", default="auto", choices=["off", "auto", "default", "fastest"],
                   help="fast-path preset: default keeps the recipe's pictures; fastest adds half "
                   "precision where it pays and a tiny VAE (approximate decoding)")
    g.add_argument("--tiny-vae", metavar="REF",
                   help="tiny autoencoder for --speed fastest (default: the family's taesd)")
    r = parser.add_argument_group("generation")
    r.add_argument("prompt")
    r.add_argument("--negative", dest="negative_prompt", metavar="TEXT")
    r.add_argument("--steps", type=int)
    r.add_argument("--guidance", type=float)
    r.add_argument("--width", type=int)
    r.add_argument("--height", type=int)
    r.add_argument("--seed", type=int, help="default: random (recorded in the output)")
    r.add_argument("--num-images", type=int)
    r.add_argument("--out", help="output file; several images are numbered out-1.png, ...")
    r.add_argument("--quiet", action="store_true", help="no progress bar")


def _control(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control-image", required=True, metavar="FILE")
    parser.add_argument("--canny", action=argparse.BooleanOptionalAction, default=None,
                        help="turn the control image into canny edges first (default: yes)")
    parser.add_argument("--canny-low", type=int)
    parser.add_argument("--canny-high", type=int)
    parser.add_argument("--conditioning-scale", type=float)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fewstep", description="Few-step image and animation generation with LCM-LoRA.")
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("txt2img", help="text to image")
    _common(p)
    p = sub.add_parser("img2img", help="image to image")
    _common(p)
    p.add_argument("--image", required=True, metavar="FILE")
    p.add_argument("--strength", type=float, help="default 0.6")
    p = sub.add_parser("inpaint", help="repaint the white part of a mask")
    _common(p)
    p.add_argument("--image", required=True, metavar="FILE")
    p.add_argument("--mask", required=True, metavar="FILE")
    p.add_argument("--strength", type=float, help="default 1.0")
    p = sub.add_parser("controlnet", help="ControlNet (canny built in)")
    _common(p)
    _control(p)
    p.add_argument("--controlnet", required=True, metavar="REF")
    p = sub.add_parser("t2i-adapter", help="T2I-Adapter (canny built in)")
    _common(p)
    _control(p)
    p.add_argument("--adapter", required=True, metavar="REF")
    p.add_argument("--conditioning-factor", type=float)
    p = sub.add_parser("animate", help="AnimateDiff animation (GIF or MP4 by --out suffix)")
    _common(p)
    p.add_argument("--motion-adapter", required=True, metavar="REF")
    p.add_argument("--num-frames", type=int, help="default 16")
    p.add_argument("--fps", type=int, help="default 8")

    sub.add_parser("bench", add_help=False, prefix_chars="\0",
                   help="benchmark against the reference recipe (see fewstep bench --help)")
    p = sub.add_parser("selftest", help="run every workflow on tiny built-in models")
    p.add_argument("--keep", metavar="DIR", help="build the models in DIR and keep them")
    try:
        from .server.cli import add_serve_parser
    except ImportError:  # the service's extra dependencies are not installed
        pass
    else:
        add_serve_parser(sub)
    return parser


def _request_values(args, task: str) -> dict:
    from .images import load_image
    from .lora import parse_lora_arg

    values = {k: getattr(args, k, None) for k in (
        "prompt", "negative_prompt", "steps", "guidance", "width", "height", "seed",
        "num_images", "strength", "canny", "canny_low", "canny_high", "conditioning_scale",
        "conditioning_factor", "controlnet", "adapter", "motion_adapter", "num_frames", "fps")}
    values["loras"] = [
        {"ref": spec.ref, "weight": spec.weight}
        for spec in (parse_lora_arg(text, f"lora.{i}") for i, text in enumerate(args.lora))]
    for name in ("image", "mask", "control_image"):
        path = getattr(args, name, None)
        if path is not None:
            values[name] = load_image(path, name)
    return values


def _lcm(args, task: str) -> tuple[str, float]:
    from .lora import check_weight, split_weight

    ref, weight = split_weight(args.lcm_lora)
    if weight is None:
        weight = 0.55 if task == "animate" else 1.0  # the recipe's weights
    return ref, check_weight(weight, "lcm_lora")


def run_task(args) -> int:
    from .engine import Engine
    from .outputs import check_output_path, save_result
    from .tasks import REQUESTS

    task = args.command
    out = args.out or TASK_OUT.get(task, DEFAULT_OUT)
    check_output_path(out, task == "animate")  # before any work
    request = REQUESTS[task].build(**_request_values(args, task))
    for warning in request.warnings():
        console.print(f"[yellow]warning:[/] {warning}")
    lcm_ref, lcm_weight = _lcm(args, task)
    with console.status("loading model"):
        engine = Engine(args.model, lcm_lora=lcm_ref, lcm_weight=lcm_weight,
                        animate_lcm_weight=lcm_weight, config=args.config,
                        family=args.family, device=args.device, dtype=args.dtype,
                        speed=args.speed, tiny_vae=args.tiny_vae)
    result = _generate(engine, request, quiet=args.quiet)
    paths = save_result(result, out)
    seed = result.params["request"]["seed"]
    for path in paths:
        print(path)
    console.print(f"[green]done[/] {len(paths)} file(s), seed {seed}, {result.seconds:.2f} s")
    return 0


def _generate(engine, request, quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    if quiet:
        return engine.generate(request)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task_id = bar.add_task(request.task, total=None)

        def progress(step: int, total: int) -> None:
            bar.update(task_id, completed=step, total=total)

        return engine.generate(request, progress=progress)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own options: the benchmark's parser reads them
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "selftest":
            from .selftest import run_selftest

            return run_selftest(Path(args.keep) if args.keep else None)
        if args.command == "serve":
            from .server.cli import run_serve

            return run_serve(args)
        return run_task(args)
    except FewstepError as exc:
        where = f" ({exc.field})" if exc.field else ""
        console.print(f"[red]error{escape(where)}:[/] {escape(exc.message)}", highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130


def _quiet_libraries() -> None:
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
