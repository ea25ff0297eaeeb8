"""`fewstep ...`: a thin shell over the engine. One command per task, shared options, a progress
bar per step, and `reproduce` to regenerate an output from its file.

Every user error -- a bad option or value, a missing or unsafe file, a device this machine
lacks, an output that cannot be written -- is found before the model loads and reported as
one line with a non-zero exit code; nothing is written."""

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
# generating commands spell the model-config option --config, as they always have
ENGINE_FLAGS = {"model_config_dir": ["--config", "--model-config"]}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage goes to --help)."""

    def error(self, message: str):
        console.print(f"[red]error:[/] {escape(self.prog)}: {escape(message)} "
                      f"(see {escape(self.prog)} --help)", highlight=False)
        sys.exit(2)


def report_error(exc: FewstepError) -> int:
    """One line on stderr; returns the exit code."""
    where = f" ({exc.field})" if exc.field else ""
    console.print(f"[red]error{escape(where)}:[/] {escape(exc.message)}", highlight=False)
    return exc.exit_code


def _engine_options(parser: argparse.ArgumentParser, only=None, flags=ENGINE_FLAGS) -> None:
    from .config import EngineOptions, add_arguments

    add_arguments(parser.add_argument_group("model"), EngineOptions, flags=flags, only=only)


def _common(parser: argparse.ArgumentParser) -> None:
    _engine_options(parser)
    g = parser.add_argument_group("generation")
    g.add_argument("prompt")
    g.add_argument("--lora", action="append", default=[], metavar="REF[:WEIGHT]",
                   help="a style or motion LoRA; repeatable")
    g.add_argument("--negative", dest="negative_prompt", metavar="TEXT")
    # numbers stay text here: the request model converts and checks them, naming the field
    for flag in ("steps", "guidance", "width", "height"):
        g.add_argument(f"--{flag}", metavar="N")
    g.add_argument("--seed", metavar="N", help="default: random (recorded in the output)")
    g.add_argument("--num-images", metavar="N")
    g.add_argument("--out", help="output file; several images are numbered out-1.png, ...")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _control(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control-image", required=True, metavar="FILE")
    parser.add_argument("--canny", action=argparse.BooleanOptionalAction, default=None,
                        help="turn the control image into canny edges first (default: yes)")
    parser.add_argument("--canny-low", metavar="N")
    parser.add_argument("--canny-high", metavar="N")
    parser.add_argument("--conditioning-scale", metavar="X")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(
        prog="fewstep", description="Few-step image and animation generation with LCM-LoRA.")
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)

    p = sub.add_parser("txt2img", help="text to image")
    _common(p)
    p = sub.add_parser("img2img", help="image to image")
    _common(p)
    p.add_argument("--image", required=True, metavar="FILE")
    p.add_argument("--strength", metavar="X", help="default 0.6")
    p = sub.add_parser("inpaint", help="repaint the white part of a mask")
    _common(p)
    p.add_argument("--image", required=True, metavar="FILE")
    p.add_argument("--mask", required=True, metavar="FILE")
    p.add_argument("--strength", metavar="X", help="default 1.0")
    p = sub.add_parser("controlnet", help="ControlNet (canny built in)")
    _common(p)
    _control(p)
    p.add_argument("--controlnet", required=True, metavar="REF")
    p = sub.add_parser("t2i-adapter", help="T2I-Adapter (canny built in)")
    _common(p)
    _control(p)
    p.add_argument("--adapter", required=True, metavar="REF")
    p.add_argument("--conditioning-factor", metavar="X")
    p = sub.add_parser("animate", help="AnimateDiff animation (GIF or MP4 by --out suffix)")
    _common(p)
    p.add_argument("--motion-adapter", required=True, metavar="REF")
    p.add_argument("--num-frames", metavar="N", help="default 16")
    p.add_argument("--fps", metavar="N", help="default 8")

    _reproduce_parser(sub)
    sub.add_parser("bench", add_help=False, prefix_chars="\0",
                   help="benchmark against the reference recipe (see fewstep bench --help)")
    p = sub.add_parser("selftest", help="run every workflow on tiny built-in models")
    p.add_argument("--keep", metavar="DIR", help="build the models in DIR and keep them")
    from .server.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def _reproduce_parser(sub) -> None:
    from .config import ServeSettings, add_arguments

    p = sub.add_parser(
        "reproduce", help="regenerate an output from the record in its file",
        description="Regenerate an output (PNG, JPEG, WebP, GIF or MP4 written by fewstep) "
        "from the record it carries. Input images are given again and checked against "
        "the record; outputs of the service need its catalogue (--config or NAME=REF flags).")
    p.add_argument("path", metavar="FILE", help="the output to regenerate")
    p.add_argument("--out", help="where to write it (default: FILE's name + -reproduced, "
                   "in the current folder)")
    for name in ("image", "mask", "control-image"):
        p.add_argument(f"--{name}", metavar="FILE", help=f"the original's {name} input")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # here --config is the service's config file, as in `fewstep serve`
    _engine_options(p, only=("model", "model_config_dir", "device", "dtype"), flags={})
    add_arguments(p.add_argument_group("the service's catalogue (for its outputs)"),
                  ServeSettings, only=("config", "lcm_lora", "lora", "controlnet", "adapter",
                                       "motion_adapter"))


# -- generating --------------------------------------------------------------------------------

def _absolute(ref: str | None) -> str | None:
    """A local reference as an absolute path, so the record reproduces from any folder."""
    if ref is None:
        return None
    path = Path(ref).expanduser()
    try:
        return str(path.resolve()) if path.exists() else ref
    except (OSError, ValueError):
        return ref


def _request_values(args, task: str) -> dict:
    from .images import load_image
    from .lora import parse_lora_arg

    values = {k: getattr(args, k, None) for k in (
        "prompt", "negative_prompt", "steps", "guidance", "width", "height", "seed",
        "num_images", "strength", "canny", "canny_low", "canny_high", "conditioning_scale",
        "conditioning_factor", "num_frames", "fps")}
    for name in ("controlnet", "adapter", "motion_adapter"):
        values[name] = _absolute(getattr(args, name, None))
    loras = []
    for i, text in enumerate(args.lora):
        spec = parse_lora_arg(text, f"lora.{i}")
        loras.append({"ref": _absolute(spec.ref), "weight": spec.weight})
    values["loras"] = loras
    for name in ("image", "mask", "control_image"):
        path = getattr(args, name, None)
        if path is not None:
            values[name] = load_image(path, name)
    return values


def _lcm(text: str, task: str) -> tuple[str, float]:
    from .lora import check_weight, split_weight

    ref, weight = split_weight(text)
    if weight is None:
        weight = 0.55 if task == "animate" else 1.0  # the recipe's weights
    return ref, check_weight(weight, "lcm_lora")


def _check_references(options, lcm_ref: str, request) -> None:
    """Missing local files and pickle formats, before anything loads."""
    from .loading import parse_ref

    refs = {"model": options.model, "config": options.model_config_dir,
            "tiny_vae": options.tiny_vae,
            "lcm_lora": None if lcm_ref in ("auto", "none") else lcm_ref}
    for name in ("controlnet", "adapter", "motion_adapter"):
        refs[name] = getattr(request, name, None)
    for i, lora in enumerate(request.loras):
        refs[f"lora.{i}"] = lora.ref
    for field, ref in refs.items():
        if ref:
            parse_ref(ref, field)


def _check_size(request, settings) -> None:
    """An explicit size against the pixel limit, before the model loads (the engine checks
    sizes that depend on the model)."""
    if request.width and request.height:
        request.check_size(request.width, request.height, 8, settings)


def run_task(args) -> int:
    from .config import EngineOptions, Settings, given, load, pick_device
    from .outputs import check_output_path, check_record_fits, draft_record
    from .tasks import REQUESTS

    task = args.command
    options = load(EngineOptions, given(args, EngineOptions),
                   {"model_config_dir": "--config"})
    options = options.model_copy(update={k: _absolute(getattr(options, k)) for k in (
        "model", "model_config_dir", "tiny_vae")})
    pick_device(options.device)
    settings = Settings.from_env()
    lcm_ref, lcm_weight = _lcm(options.lcm_lora, task)
    lcm_ref = lcm_ref if lcm_ref in ("auto", "none") else _absolute(lcm_ref)
    request = REQUESTS[task].build(settings=settings, **_request_values(args, task))
    out = check_output_path(args.out or TASK_OUT.get(task, DEFAULT_OUT), task == "animate",
                            request.num_images)
    check_record_fits(out, draft_record(request, model=options.model, lcm_lora=lcm_ref,
                                        tiny_vae=options.tiny_vae))
    _check_references(options, lcm_ref, request)
    _check_size(request, settings)
    for warning in request.warnings():
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)

    from .engine import Engine
    from .logs import quiet_libraries
    from .records import complete_record

    quiet_libraries()
    # one command, one shape: what is built ahead (compiled on CUDA, converted on a CPU; kept on
    # disk for the next run) is that shape only, not the family's service defaults
    shape = ((request.width, request.height, request.num_images),) \
        if request.width and request.height and task != "animate" else None
    with console.status("loading model"):
        engine = Engine(options.model, lcm_lora=lcm_ref, lcm_weight=lcm_weight,
                        animate_lcm_weight=lcm_weight, config=options.model_config_dir,
                        family=options.family, settings=settings, device=options.device,
                        dtype=options.dtype, speed=options.speed, openvino=options.openvino,
                        tiny_vae=options.tiny_vae, fp16_vae=options.fp16_vae,
                        compile_shapes=shape)
    result = _generate(engine, request, quiet=args.quiet)
    result.params = complete_record(result.params, request, engine, options.tiny_vae)
    paths = _save(result, out)
    seed = result.params["request"]["seed"]
    for path in paths:
        print(path)
    console.print(f"[green]done[/] {len(paths)} file(s), seed {seed}, {result.seconds:.2f} s")
    return 0


def _save(result, out) -> list[Path]:
    from .outputs import save_result

    try:
        return save_result(result, out)
    except OSError as exc:  # the disk filled up or went away after the checks
        raise FewstepError(f"out {str(out)!r}: could not write ({exc.strerror or exc}); "
                           "nothing was written", field="out") from None


def _progress(quiet: bool, label: str):
    """A context manager yielding a progress callback (None when quiet)."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    if quiet or not console.is_terminal:  # a bar is for people watching a terminal
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def bar():
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as progress:
            task_id = progress.add_task(label, total=None)
            yield lambda step, total: progress.update(task_id, completed=step, total=total)

    return bar()


def _generate(engine, request, quiet: bool):
    with _progress(quiet, request.task) as progress:
        return engine.generate(request, progress=progress)


# -- reproducing -------------------------------------------------------------------------------

def run_reproduce(args) -> int:
    from .config import EngineOptions, ServeSettings, given, load, pick_device
    from .outputs import check_output_path, check_record_fits
    from .records import (build_request, read_record, resolve_names, same_pixels)

    source = Path(args.path)
    record = read_record(source)
    # only what is given here: the record, not FEWSTEP_* defaults, says what to load
    flags = given(args, EngineOptions)
    load(EngineOptions, flags)  # checks the values
    model, model_config = _absolute(flags.get("model")), _absolute(flags.get("model_config_dir"))
    pick_device(flags.get("device", "auto"))
    catalog = None
    if record.get("catalog_names"):
        from .server.catalog import Catalog

        entries = {k: v for k, v in given(args, ServeSettings).items() if k in (
            "config", "lcm_lora", "lora", "controlnet", "adapter", "motion_adapter")}
        if entries:
            catalog = Catalog.from_settings(load(ServeSettings, entries))
    record = resolve_names(record, catalog, model_given=model is not None)
    images = {name: getattr(args, name) for name in ("image", "mask", "control_image")
              if getattr(args, name) is not None}
    build_request(record, images)  # inputs checked before anything loads
    for name in images:
        if name not in (record.get("inputs") or {}):
            console.print(f"[yellow]warning:[/] the record holds no digest of its {name}: "
                          "the one given cannot be checked", highlight=False)
    out = args.out or Path.cwd() / f"{source.stem}-reproduced{source.suffix}"
    check_output_path(out, record["request"]["task"] == "animate")
    check_record_fits(out, record)

    from .logs import quiet_libraries
    from .records import reproduce

    quiet_libraries()
    with _progress(args.quiet, f"reproduce {record['request']['task']}") as progress:
        reproduce(source, images=images, catalog=catalog, out=out, model=model,
                  model_config=model_config, device=flags.get("device"),
                  dtype=flags.get("dtype"), progress=progress)
    print(out)
    same, diff = same_pixels(source, out)
    if same:
        console.print(f"[green]done[/] same pixels as {escape(str(source))}", highlight=False)
    else:
        console.print(f"[yellow]warning:[/] differs from {escape(str(source))} by up to "
                      f"{diff}/255 (another device, dtype or library version?)",
                      highlight=False)
    return 0


# -- entry point -------------------------------------------------------------------------------

def _folder(text: str, option: str) -> Path:
    """A folder to write into, made now: a path that cannot be one is a user error."""
    folder = Path(text).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FewstepError(f"--{option} {text!r}: cannot make the folder "
                           f"({exc.strerror or exc})", field=option) from None
    return folder


def _bench(argv: list[str]) -> int:
    from .server.cli import require_extra

    if not {"-h", "--help"} & set(argv):
        require_extra("bench", ("psutil",), "fewstep bench")
    from .bench import main as bench_main

    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["bench"]:  # its own options: the benchmark's parser reads them
            return _bench(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "selftest":
            from .logs import quiet_libraries
            from .selftest import run_selftest

            keep = _folder(args.keep, "keep") if args.keep else None
            quiet_libraries()
            return run_selftest(keep)
        if args.command == "serve":
            from .server.cli import run_serve

            return run_serve(args)
        if args.command == "reproduce":
            return run_reproduce(args)
        return run_task(args)
    except FewstepError as exc:
        return report_error(exc)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
