"""`fewstep serve`: flags, FEWSTEP_* variables and/or a config file (JSON or TOML), all from one
model (`fewstep.config.ServeSettings`) -> Engine + catalogue -> the app, run by uvicorn with a
graceful SIGTERM: readiness goes false, new requests get 503, queued and running work may
finish within `--grace` seconds, then a clean exit (status 0).

Every user error -- a bad option, a name, an address in use, a missing file, a device this
machine lacks -- is found before the model loads and reported in one line. Components that do
not fit the model (LoRAs, ControlNets, T2I-Adapters, motion adapters) fail the start, not a
request.

Only the standard library and pydantic are imported at module level, so the main CLI can list
`serve` cheaply and say what to install when the service's extra is missing."""

from __future__ import annotations

import argparse

SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client", "python_multipart")
GROUPS = {
    "model": ("model", "model_name", "model_config_dir", "family", "lcm_lora",
              "animate_lcm_weight", "device", "dtype", "speed", "openvino", "tiny_vae",
              "fp16_vae", "compile_shapes", "compile_cache", "cuda_graph_loop"),
    "catalogue (requests name these)": ("lora", "controlnet", "adapter", "motion_adapter"),
    "service": ("host", "port", "api_key", "allowed_hosts", "public_url", "queue_size",
                "timeout", "grace", "max_body_mb", "body_timeout_s", "header_timeout_s",
                "max_connections", "job_retention_bytes", "max_batch", "batch_wait_ms",
                "log_level"),
}


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="run the HTTP service (native, OpenAI images and A1111 APIs)",
        description=__doc__.split("\n\n")[0])
    add_serve_arguments(p)
    return p


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import ServeSettings, Settings, add_arguments

    add_arguments(p, ServeSettings, only=("config",))
    for title, names in GROUPS.items():
        add_arguments(p.add_argument_group(title), ServeSettings, only=names)
    limits = tuple(n for n in Settings.model_fields if n not in ("device", "dtype", "openvino"))
    add_arguments(p.add_argument_group("limits (per request)"), ServeSettings, only=limits)
    from .ray_cli import add_ray_arguments  # --ray and its options (scale out)

    add_ray_arguments(p)


def load_settings(args: argparse.Namespace):
    """Flags over FEWSTEP_* variables over the config file over the defaults."""
    from ..config import ServeSettings, given, load

    return load(ServeSettings, given(args, ServeSettings))


class GracefulServer:
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of stopping at once, and
    which logs the service's own start-up and shutdown."""

    def __new__(cls, config, service, log, banner: str):
        import threading

        import uvicorn

        from .shutdown import STOP_MARGIN_S, exit_after

        class _Server(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                if self.started:
                    log.info("%s", banner)

            async def shutdown(self, sockets=None):
                await super().shutdown(sockets=sockets)
                log.info("stopped")

            def handle_exit(self, sig, frame):
                if self._draining:
                    log.warning("second signal: stopping now")
                    self.should_exit = True
                    self.force_exit = True
                    exit_after(STOP_MARGIN_S, log)
                    return
                self._draining = True
                grace = float(self._grace)
                log.info("shutting down: no new work; running and queued jobs may finish "
                         "within %g s", grace)
                service.queue.drain()  # readiness false; new work gets 503

                def finish():
                    if not service.queue.wait_idle(grace):
                        log.warning("grace period over: cancelling what is left")
                        exit_after(STOP_MARGIN_S, log)  # a step that cannot stop cannot hold it
                        service.queue.stop(timeout=STOP_MARGIN_S)
                    self.should_exit = True

                threading.Thread(target=finish, name="fewstep-drain", daemon=True).start()

        server = _Server(config)
        server._draining = False
        server._grace = service.options.grace_s
        return server


def run_serve(args: argparse.Namespace) -> int:
    """Check everything, build the engine and the app, serve until SIGTERM. Returns the exit
    status: 0, or a user error's code after reporting it in one line."""
    from ..errors import FewstepError
    from ..terminal import report_error

    try:
        return _checked_serve(args)
    except FewstepError as exc:
        return report_error(exc)


def _checked_serve(args: argparse.Namespace) -> int:
    from ..terminal import require_extra

    require_extra("serve", SERVE_EXTRA, "fewstep serve")
    if getattr(args, "ray", False):
        from .ray_cli import run_ray_serve

        return run_ray_serve(args)
    from ..build import inspect
    from .auth import check_bind
    from .catalog import Catalog
    from .listen import bind_socket

    settings = load_settings(args)
    check_bind(settings.host, settings.api_key)
    # the device, the model's references and family, the catalogue's names and references:
    # all checked before the socket is taken and anything loads
    blueprint = inspect(settings.engine_options(), settings.limits())
    catalog = Catalog.from_settings(settings)
    catalog.check_references()
    sock = bind_socket(settings.host, settings.port)
    try:
        return _serve(settings, blueprint, catalog, sock)
    finally:
        sock.close()


def _serve(settings, blueprint, catalog, sock) -> int:
    import logging

    from ..build import build_engine
    from ..logs import configure_logging, quiet_libraries
    from .app import create_app
    from .catalog import Catalog
    from .connections import uvicorn_config
    from .heap import freeze_startup_objects
    from .service import ServerOptions

    quiet_libraries()
    log = configure_logging(settings.log_level)
    log.info("loading %s", settings.model or "the default model")
    engine = build_engine(blueprint, **catalog.engine_needs())
    for technique in ("compile_unet", "openvino", "cuda_graph_loop"):  # what was built ahead
        done = engine.fast_report.applied.get(technique, "off")
        if done != "off":
            log.info("speed %s: %s %s", engine.speed, technique, done)
    catalog = Catalog.from_settings(settings, engine)
    app = create_app(engine, catalog, ServerOptions.from_settings(settings))
    config = uvicorn_config(app, log_level=settings.log_level, timeout_graceful_shutdown=5)
    if settings.log_level not in ("debug", "trace"):
        # uvicorn's own life-cycle lines say what ours say; its errors still show
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    host, port = sock.getsockname()[:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    banner = (f"serving {catalog.model_name} ({engine.family.name}, {engine.device}, "
              f"{str(engine.dtype).removeprefix('torch.')}) at http://{address}")
    freeze_startup_objects()  # full garbage collections skip the engine's half-million objects
    GracefulServer(config, app.state.service, log, banner).run(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m fewstep.server`."""
    from ..terminal import Parser

    parser = Parser(prog="python -m fewstep.server", description=__doc__.split("\n\n")[0])
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except KeyboardInterrupt:
        return 130
