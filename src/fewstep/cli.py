"""`fewstep ...`: a thin shell over the engine. One command per task, shared options, a progress
bar per step, and `reproduce` to regenerate an output from its file.

Every user error -- a bad option or value, a missing or unsafe file, a device this machine
lacks, an output that cannot be written -- is found before the model loads and reported as
one line with a non-zero exit code; nothing is written."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.markup import escape

from .errors import FewstepError
from .preparing import compile_ahead, prepare_after, remember_compiled, speed_line
from .terminal import Parser, console, progress, report_error, require_extra, warn

TASK_OUT = {"animate": "fewstep.gif"}
DEFAULT_OUT = "fewstep.png"
# generating commands spell the model-config option --config, as they always have
ENGINE_FLAGS = {"model_config_dir": ["--config", "--model-config"]}
# options of a service, not of one command: what a command builds ahead is its own call, and
# --lcm-lora REF:W gives an animation's LCM-LoRA weight
SERVICE_ONLY = ("compile_shapes", "cuda_graph_loop", "animate_lcm_weight", "fuse_loras")


def _engine_options(parser: argparse.ArgumentParser, only=None, flags=ENGINE_FLAGS) -> None:
    from .config import EngineOptions, add_arguments

    add_arguments(parser.add_argument_group("model"), EngineOptions, flags=flags, only=only,
                  skip=SERVICE_ONLY)


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
    g.add_argument("--out", help="output file; several images are numbered out-1.png, ... "
                   "(default fewstep.png, or fewstep-2.png, ... when taken)")
    g.add_argument("--overwrite", action="store_true", help="replace an --out that exists")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--prepare", action=argparse.BooleanOptionalAction, default=True,
                   help="after the output is written, prepare the fast path for the next runs "
                   "when the cache lacks it (once; default: yes)")


def _control(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control-image", required=True, metavar="FILE")
    parser.add_argument("--canny", action=argparse.BooleanOptionalAction, default=None,
                        help="turn the control image into canny edges first (default: yes)")
    parser.add_argument("--canny-low", metavar="N")
    parser.add_argument("--canny-high", metavar="N")
    parser.add_argument("--conditioning-scale", metavar="X")


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

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
    p = sub.add_parser("prepare", help="build the fast path ahead for a model and sizes",
                       description="Build the fast path ahead (OpenVINO on a CPU, compiled "
                       "graphs on CUDA) for a model and image sizes, kept in the cache, so the "
                       "first image of a later command or service is fast.")
    _engine_options(p)
    p.add_argument("--size", action="append", metavar="WxH[xB]",
                   help="an image size (and batch) to prepare; repeatable (default: the "
                   "model's native size)")
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
    p.add_argument("--overwrite", action="store_true", help="replace an --out that exists")
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


def _output(given: str | None, default, overwrite: bool, animation: bool, count: int = 1):
    """Where a command writes, checked before any work: a name the user gave (not replaced
    when it exists, unless --overwrite), else the default's first free numbering."""
    from .outputs import check_output_path, free_name, refuse_existing

    path = check_output_path(given or default, animation, count)
    if given is None:
        return free_name(path, count)
    if not overwrite:
        refuse_existing(path, count)
    return path


def _options_for(options, task: str):
    """A command's engine options: local references made absolute (so the record reproduces
    from any folder), and the weight given with --lcm-lora used for an animation."""
    from .lora import split_weight

    update = {k: _absolute(getattr(options, k)) for k in ("model", "model_config_dir",
                                                           "tiny_vae", "fp16_vae")}
    ref, weight = split_weight(options.lcm_lora)
    if ref not in ("auto", "none"):
        ref = _absolute(ref)
        update["lcm_lora"] = ref if weight is None else f"{ref}:{weight}"
    if task == "animate" and weight is not None:
        update["animate_lcm_weight"] = weight
    return options.model_copy(update=update)


def _engine_needs(request) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """The LoRAs and the component a request names, by the option that gave them."""
    loras = {f"lora.{i}": lora.ref for i, lora in enumerate(request.loras)}
    components = {name: {name: getattr(request, name)}
                  for name in ("controlnet", "adapter", "motion_adapter")
                  if getattr(request, name, None)}
    return loras, components


def run_task(args) -> int:
    from .config import EngineOptions, Settings, given, load

    task = args.command
    options = load(EngineOptions, given(args, EngineOptions), {"model_config_dir": "--config"})
    # the models the same command compiled last time, compiled now beside the imports below
    digest = compile_ahead(options, task, {k: getattr(args, k, None) for k in (
        "width", "height", "num_images", "guidance")})
    options = _options_for(options, task)

    from .outputs import check_record_fits, draft_record
    from .tasks import REQUESTS

    settings = Settings.from_env()
    request = REQUESTS[task].build(settings=settings, **_request_values(args, task))
    out = _output(args.out, TASK_OUT.get(task, DEFAULT_OUT), args.overwrite,
                  task == "animate", request.num_images)
    check_record_fits(out, draft_record(request, model=options.model,
                                        lcm_lora=options.lcm_lora, tiny_vae=options.tiny_vae))
    for warning in request.warnings():
        warn(warning)
    result = _run_direct(options, digest, request, settings, args.quiet)
    if result is not None:  # the same command again, on its converted models alone
        _report(result, out)
        return 0

    from .build import build_engine, inspect
    from .logs import quiet_libraries

    quiet_libraries()
    # every check that configs and file headers allow, then the call planned against them:
    # sizes, images and components are refused here, before anything loads
    blueprint = inspect(options, settings)
    call = blueprint.plan(request)
    loras, components = _engine_needs(request)
    with console.status("loading model"):
        # one command, one call: what is built ahead (compiled on CUDA, converted on a CPU;
        # kept on disk for the next run) is what this call runs, nothing else
        engine = build_engine(blueprint, loras=loras, components=components, calls=[call])
    line = speed_line(engine)
    if line:
        console.print(line, style="dim", highlight=False)
    result = _run(engine, call, quiet=args.quiet)
    _report(result, out)
    if args.prepare:
        prepare_after(engine, say=lambda text: console.print(text, style="dim",
                                                             highlight=False))
    remember_compiled(engine, options, digest, call)
    return 0


def _run_direct(options, digest: str, request, settings, quiet: bool):
    """The result of `request` from `fewstep.direct` when the last run of the same command
    left a plan that repeats it, else None (the engine runs it). A bad request is refused as
    the engine's blueprint would refuse it."""
    from . import direct
    from .config import openvino_cache_dir

    plan = direct.noted(openvino_cache_dir(options.compile_cache), digest)
    if not direct.usable(plan, request):
        return None
    call = direct.plan_call(plan, request, settings)
    console.print(f"{plan['speed_line']}; the converted models alone", style="dim",
                  highlight=False)
    try:
        with progress(quiet, call.task) as on_step:
            return direct.run(plan, call, on_step)
    except Exception as exc:  # noqa: BLE001 - a cache file gone or broken since the check
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        console.print(f"the converted models could not run alone ({why}); loading the model",
                      style="dim", highlight=False)
        return None


def _report(result, out) -> None:
    paths = _save(result, out)
    for path in paths:
        print(path)
    console.print(f"[green]done[/] {len(paths)} file(s), seed {result.record.request['seed']}, "
                  f"{result.seconds:.2f} s")


def run_prepare(args) -> int:
    """`fewstep prepare`: build ahead for a model and sizes (converted on a CPU, compiled on
    CUDA), kept in the cache, so that the first image of a later command or service is fast."""
    import time

    from .build import build_engine, inspect, prepare_one_shots
    from .config import EngineOptions, Settings, given, load, parse_shapes

    options = load(EngineOptions, given(args, EngineOptions), {"model_config_dir": "--config"})
    options = _options_for(options, "txt2img")
    settings = Settings.from_env()
    if args.size:
        shapes = parse_shapes(",".join(args.size), "size")
    else:  # the model's native size, read from its configs
        native = inspect(options, settings).native_size
        shapes = ((native, native, 1),)
    blueprint = inspect(options.model_copy(update={"compile_shapes": shapes}), settings)

    def say(text: str) -> None:
        console.print(text, highlight=False)

    sizes = ", ".join(f"{w}x{h}" + (f"x{b}" if b > 1 else "") for w, h, b in shapes)
    say(f"preparing {blueprint.model_text} ({blueprint.family.name}) for {sizes}, speed "
        f"{options.speed}")
    began = time.perf_counter()
    with console.status("loading model"):
        engine = build_engine(blueprint, progress=say)
    report = engine.fast_report.applied
    built = [f"{name}: {report[name]}" for name in ("openvino", "compile_unet")
             if not str(report.get(name, "off")).startswith("off")]
    if not built:
        say(f"nothing to prepare: speed {options.speed} on {engine.device} builds nothing ahead "
            f"(openvino: {report.get('openvino', 'off')})")
        return 0
    for line in built:
        say(line)
    with console.status("compiling for one-shot commands"):
        # a command compiles for its own batch (the images it makes), which these blobs are
        static = prepare_one_shots(engine, sorted({batch for _, _, batch in shapes}))
    if static:
        say(f"compiled for one-shot commands: {', '.join(static)}")
    console.print(f"[green]prepared[/] in {time.perf_counter() - began:.0f} s",
                  highlight=False)
    return 0


def _save(result, out) -> list[Path]:
    from .outputs import save_result

    try:
        return save_result(result, out)
    except OSError as exc:  # the disk filled up or went away after the checks
        raise FewstepError(f"out {str(out)!r}: could not write ({exc.strerror or exc}); "
                           "nothing was written", field="out") from None


def _run(engine, call, quiet: bool):
    from .engine import Job

    with progress(quiet, call.task) as on_step:
        return engine.run([Job(call, progress=on_step)])[0]


# -- reproducing -------------------------------------------------------------------------------

def run_reproduce(args) -> int:
    from .config import EngineOptions, ServeSettings, given, load
    from .outputs import check_record_fits
    from .records import read_record, same_pixels
    from .reproduce import prepare, run

    source = Path(args.path)
    # only what is given here: the record, not FEWSTEP_* defaults, says what to load
    flags = given(args, EngineOptions)
    load(EngineOptions, flags)  # checks the values
    model, model_config = _absolute(flags.get("model")), _absolute(flags.get("model_config_dir"))
    catalog = None
    if read_record(source).catalog_names:
        from .server.catalog import Catalog

        entries = {k: v for k, v in given(args, ServeSettings).items() if k in (
            "config", "lcm_lora", "lora", "controlnet", "adapter", "motion_adapter")}
        if entries:
            catalog = Catalog.from_settings(load(ServeSettings, entries))
    images = {name: getattr(args, name) for name in ("image", "mask", "control_image")
              if getattr(args, name) is not None}
    # the record, its names, the input images and the engine options: checked before loading
    prepared = prepare(source, images=images, catalog=catalog, model=model,
                       model_config=model_config, device=flags.get("device"),
                       dtype=flags.get("dtype"))
    for name in images:
        if name not in prepared.record.inputs:
            warn(f"the record holds no digest of its {name}: the one given cannot be checked")
    out = _output(args.out, Path.cwd() / f"{source.stem}-reproduced{source.suffix}",
                  args.overwrite, prepared.record.task == "animate")
    check_record_fits(out, prepared.record)

    from .logs import quiet_libraries

    quiet_libraries()
    with progress(args.quiet, f"reproduce {prepared.record.task}") as on_step:
        run(prepared, out=out, model=model, progress=on_step)
    print(out)
    same, diff = same_pixels(source, out)
    if same:
        console.print(f"[green]done[/] same pixels as {escape(str(source))}", highlight=False)
    else:
        lossy = Path(out).suffix.lower() in (".jpg", ".jpeg", ".webp", ".mp4")
        why = f"{Path(out).suffix} is a lossy format: write .png to compare" \
            if lossy and Path(out).suffix.lower() != source.suffix.lower() \
            else "another device, dtype or library version?"
        warn(f"differs from {source} by up to {diff}/255 ({why})")
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
    if not {"-h", "--help"} & set(argv):
        require_extra("bench", ("psutil",), "fewstep bench")
    from .bench import main as bench_main

    return bench_main(argv)


# request fields as the generating commands spell them
FLAGS = {"negative_prompt": "--negative", "num_images": "--num-images",
         "control_image": "--control-image", "canny_low": "--canny-low",
         "canny_high": "--canny-high", "conditioning_scale": "--conditioning-scale",
         "conditioning_factor": "--conditioning-factor", "num_frames": "--num-frames",
         "motion_adapter": "--motion-adapter", "lcm_lora": "--lcm-lora",
         "tiny_vae": "--tiny-vae", "fp16_vae": "--fp16-vae", "model_config": "--config",
         **{name: f"--{name}" for name in (
             "steps", "guidance", "width", "height", "seed", "strength", "fps", "image",
             "mask", "controlnet", "adapter", "model", "family", "device", "dtype", "speed",
             "openvino", "out")}}


def in_flags(exc: FewstepError) -> FewstepError:
    """A request's error as a command line user reads it: the field named by its flag
    (`num_images` -> `--num-images`, `loras.1.weight` -> `--lora (the second)`)."""
    import re

    field = exc.field or ""
    head, _, rest = field.partition(".")
    if head in ("lora", "loras") and rest[:1].isdigit():
        nth = int(rest.split(".")[0])
        ordinal = ("first", "second", "third")[nth] if nth < 3 else f"#{nth + 1}"
        flag = f"--lora (the {ordinal})"
    else:
        flag = FLAGS.get(field)
    if flag is None:
        return exc
    # "num_images: must be at most 16" reads "error (--num-images): must be at most 16"
    exc.message = re.sub(rf"^{re.escape(field)}\b:?\s*", "", exc.message, count=1)
    exc.field = flag
    return exc


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
        if args.command == "prepare":
            return run_prepare(args)
        try:
            return run_task(args)
        except FewstepError as exc:
            return report_error(in_flags(exc))
    except FewstepError as exc:
        return report_error(exc)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
