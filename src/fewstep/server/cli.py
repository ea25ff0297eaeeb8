"""`fewstep serve`: flags and/or a config file (JSON or TOML, the same keys as the flags) ->
Engine + catalogue -> the app, run by uvicorn with a graceful SIGTERM: readiness goes false,
new requests get 503, queued and running work may finish within `--grace` seconds, then a
clean exit (status 0).

Only argparse is imported at module level, so the main CLI can list `serve` cheaply."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULTS = {"host": "127.0.0.1", "port": 7860, "queue_size": 16, "grace": 30.0,
            "max_body_mb": 64.0, "timeout": None, "device": None, "dtype": None,
            "model": None, "model_name": None, "lcm_lora": "auto", "api_key": None,
            "lora": [], "controlnet": [], "adapter": [], "motion_adapter": [], "log_level": "info",
            "model_config": None, "family": None, "speed": "auto", "tiny_vae": None,
            "animate_lcm_weight": 0.55}
LISTS = ("lora", "controlnet", "adapter", "motion_adapter")
from .ray_cli import RAY_DEFAULTS  # noqa: E402 - `--ray` and its options (scale out)

DEFAULTS.update(RAY_DEFAULTS)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="run the HTTP service (native, OpenAI images and A1111 APIs)",
        description=__doc__.split("\n\n")[0])
    add_serve_arguments(p)
    return p


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # unset flags stay unset, so the config file can fill them
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file with the same keys "
                   "as these options (lora = {NAME = REF} or [\"NAME=REF\"])")
    p.add_argument("--model", metavar="REF", default=S, help="base model (as in the CLI)")
    p.add_argument("--model-name", metavar="NAME", default=S,
                   help="the name clients see for the model (default: from REF)")
    p.add_argument("--lcm-lora", metavar="REF[:W]", default=S,
                   help="LCM-LoRA (default auto: the family's)")
    for flag, what in (("lora", "a LoRA"), ("controlnet", "a ControlNet"),
                       ("adapter", "a T2I-Adapter"), ("motion-adapter", "a motion adapter")):
        p.add_argument(f"--{flag}", metavar="NAME=REF", action="append", default=S,
                       help=f"add {what} to the catalogue (repeatable)")
    p.add_argument("--host", default=S, help="bind address (default 127.0.0.1; any other "
                   "needs an API key)")
    p.add_argument("--port", type=int, default=S, help="default 7860")
    p.add_argument("--api-key", metavar="KEY", default=S,
                   help="required key (Bearer or basic-auth password); also FEWSTEP_API_KEY")
    p.add_argument("--queue-size", type=int, default=S, help="jobs waiting at most (default 16)")
    p.add_argument("--timeout", type=float, default=S, metavar="S",
                   help="default start deadline of a request, seconds (default none)")
    p.add_argument("--grace", type=float, default=S, metavar="S",
                   help="SIGTERM: seconds work may go on (default 30)")
    p.add_argument("--max-body-mb", type=float, default=S, help="request body limit (64)")
    p.add_argument("--device", default=S, help="auto, cuda, cuda:1, mps, cpu")
    p.add_argument("--dtype", default=S, help="auto, fp16, bf16, fp32")
    p.add_argument("--animate-lcm-weight", type=float, metavar="W", default=S,
                   help="LCM-LoRA weight for animations (default 0.55, as in the recipe)")
    p.add_argument("--model-config", metavar="DIR", default=S, help="local diffusers folder "
                   "with the configs of a single-file --model (needed offline)")
    p.add_argument("--family", default=S, choices=["sd15", "sdxl", "ssd-1b"],
                   help="override the detected family")
    p.add_argument("--speed", default=S, choices=["off", "auto", "default", "fastest"],
                   help="fast-path preset (default: default)")
    p.add_argument("--tiny-vae", metavar="REF", default=S,
                   help="tiny autoencoder for --speed fastest (default: the family's taesd)")
    p.add_argument("--log-level", default=S, help="uvicorn log level (info)")
    from .ray_cli import add_ray_arguments

    add_ray_arguments(p)


def read_config(path: str) -> dict:
    from ..errors import InvalidRequest

    file = Path(path)
    if not file.is_file():
        raise InvalidRequest(f"--config {path!r}: no such file", field="config")
    text = file.read_bytes()
    try:
        if file.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text.decode("utf-8"))
        else:
            data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"--config {path!r} is not valid: {exc}", field="config") from None
    if not isinstance(data, dict):
        raise InvalidRequest("--config must hold a table/object", field="config")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise InvalidRequest(f"--config: unknown key {unknown[0]!r}", field="config")
    for key in LISTS:
        value = data.get(key)
        if isinstance(value, dict):
            data[key] = [f"{name}={ref}" for name, ref in value.items()]
        elif value is not None and not isinstance(value, list):
            raise InvalidRequest(f"--config: {key} must be a table or a list", field=key)
    return data


def resolve_options(args: argparse.Namespace) -> dict:
    """Defaults < config file < environment (FEWSTEP_API_KEY) < flags."""
    values = dict(DEFAULTS)
    config = getattr(args, "config", None)
    if config:
        values.update(read_config(config))
    if os.environ.get("FEWSTEP_API_KEY"):
        values["api_key"] = os.environ["FEWSTEP_API_KEY"]
    for key in DEFAULTS:
        if hasattr(args, key):
            values[key] = getattr(args, key)
    return values


def build_catalog(values: dict, engine=None):
    from ..lora import parse_lora_arg
    from .catalog import Catalog, parse_entry

    tables = {}
    for key in LISTS:
        table = {}
        for entry in values.get(key) or []:
            name, ref = parse_entry(entry, key.replace("_", "-"))
            table[name] = ref
        tables[key] = table
    model_ref = str(values.get("model") or "")
    name = values.get("model_name") or _name_from_ref(model_ref)
    hidden = {name: model_ref} if model_ref else {}
    lcm = values.get("lcm_lora")
    if lcm and lcm not in ("auto", "none"):
        hidden["lcm-lora"] = parse_lora_arg(lcm, "lcm_lora").ref
    if engine is not None and getattr(engine, "lcm_ref", None):
        hidden.setdefault("lcm-lora", engine.lcm_ref)
    return Catalog(model_name=name, loras=tables["lora"], controlnets=tables["controlnet"],
                   adapters=tables["adapter"], motion_adapters=tables["motion_adapter"],
                   hidden=hidden)


def _name_from_ref(ref: str) -> str:
    import re

    last = Path(ref.rstrip("/\\")).name or "model"
    last = re.sub(r"\.safetensors$", "", last)
    last = re.sub(r"[^A-Za-z0-9_.+-]+", "-", last).strip(".-") or "model"
    return last[:64]


class GracefulServer:
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of stopping at once."""

    def __new__(cls, config, service):
        import threading

        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if self._draining:
                    self.should_exit = True
                    self.force_exit = True
                    return
                self._draining = True
                service.queue.drain()  # readiness false; new work gets 503
                grace = float(self._grace)

                def finish():
                    if not service.queue.wait_idle(grace):
                        service.queue.stop(timeout=5.0)  # past the grace: cancel the rest
                    self.should_exit = True

                threading.Thread(target=finish, name="fewstep-drain", daemon=True).start()

        server = _Server(config)
        server._draining = False
        server._grace = service.options.grace_s
        return server


def run_serve(args: argparse.Namespace) -> int:
    """Build the engine and the app from `args` and serve until SIGTERM. Returns 0."""
    import logging

    from ..errors import FewstepError
    from .auth import check_bind

    values = resolve_options(args)
    if values.get("ray"):
        from .ray_cli import run_ray_serve

        return run_ray_serve(values)
    try:
        check_bind(values["host"], values["api_key"])  # before loading anything
        if values["queue_size"] < 1:
            from ..errors import InvalidRequest

            raise InvalidRequest("--queue-size must be at least 1", field="queue_size")
        build_catalog(values)  # names checked before the model loads
    except FewstepError as exc:
        print(f"error [{exc.field}]: {exc.message}", file=sys.stderr)
        return exc.exit_code

    import uvicorn

    from ..engine import Engine
    from ..lora import parse_lora_arg
    from .app import create_app
    from .service import ServerOptions

    lcm = values["lcm_lora"]
    lcm_ref, lcm_weight = lcm, 1.0
    if lcm and lcm not in ("auto", "none"):
        spec = parse_lora_arg(lcm, "lcm_lora")
        lcm_ref, lcm_weight = spec.ref, spec.weight
    engine = Engine(values["model"], lcm_lora=lcm_ref, lcm_weight=lcm_weight,
                    animate_lcm_weight=float(values["animate_lcm_weight"]),
                    config=values["model_config"], family=values["family"],
                    device=values["device"], dtype=values["dtype"], speed=values["speed"],
                    tiny_vae=values["tiny_vae"])
    catalog = build_catalog({**values, "model": values["model"] or engine.model_ref}, engine)
    for name, ref in catalog.loras.items():  # broken LoRA files fail the start, not a request
        engine.lora(ref, f"lora {name}")
    options = ServerOptions(api_key=values["api_key"], queue_size=int(values["queue_size"]),
                            max_body_bytes=int(float(values["max_body_mb"]) * 1024 * 1024),
                            default_timeout_s=values["timeout"], grace_s=float(values["grace"]))
    app = create_app(engine, catalog, options)
    config = uvicorn.Config(app, host=values["host"], port=int(values["port"]),
                            log_level=values["log_level"], timeout_graceful_shutdown=5)
    server = GracefulServer(config, app.state.service)
    logging.getLogger("fewstep.server").info("serving %s on %s:%s", catalog.model_name,
                                             values["host"], values["port"])
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..errors import FewstepError

    parser = argparse.ArgumentParser(prog="python -m fewstep.server",
                                     description=__doc__.split("\n\n")[0])
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except FewstepError as exc:
        print(f"error [{exc.field}]: {exc.message}", file=sys.stderr)
        return exc.exit_code
