"""`fewstep serve --ray`: the same service on Ray Serve. Starts a local Ray instance (or joins
one with `--ray-address`), deploys the application of `fewstep.server.deployments` with its
HTTP entry on
`--host/--port`, and on SIGTERM drains: readiness goes false, new work gets 503, running and
queued work may finish within `--grace` seconds; then the application is removed, and Serve and
the Ray instance are shut down if fewstep started them (a joined cluster is left running).

The options are `fewstep serve`'s (`fewstep.config.ServeSettings`) plus those of
`RayServeSettings` below, as flags, FEWSTEP_* variables or config-file keys alike. Ray itself is
imported only when the service starts."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from pydantic import Field, field_validator

from ..config import ServeSettings

APP_NAME = "fewstep"
RAY_OPTIONS = ("replicas", "ray_address", "gpus_per_replica", "cpus_per_replica")


class RayServeSettings(ServeSettings):
    """Everything `fewstep serve` takes, and how the service runs on Ray."""

    ray: bool = Field(False, description="serve on Ray Serve: engine replicas behind one "
                      "HTTP entry")
    replicas: str = Field("1", description="engine replicas: N, or MIN:MAX to autoscale "
                          "between the two", json_schema_extra={"metavar": "N|MIN:MAX"})
    ray_address: str | None = Field(None, description="join this Ray cluster (default: start "
                                    "a local instance)",
                                    json_schema_extra={"metavar": "auto|ADDR"})
    gpus_per_replica: float | None = Field(None, ge=0, allow_inf_nan=False, description=(
        "GPUs per replica (default 1 when the cluster has GPUs and the device is not the "
        "CPU, else 0)"), json_schema_extra={"metavar": "G"})
    cpus_per_replica: float = Field(1.0, ge=0, allow_inf_nan=False,
                                    description="CPUs per replica",
                                    json_schema_extra={"metavar": "C"})

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas(cls, value):
        low, high = parse_replicas(value)
        return f"{low}:{high}"

    def replica_bounds(self) -> tuple[int, int]:
        return parse_replicas(self.replicas)


def parse_replicas(value) -> tuple[int, int]:
    """`N` or `MIN:MAX` -> (min, max), 1 <= min <= max."""
    raw = str(value).strip()
    low, sep, high = raw.partition(":")
    try:
        bounds = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise ValueError("takes N or MIN:MAX") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise ValueError("needs 1 <= MIN <= MAX")
    return bounds


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import add_arguments

    group = p.add_argument_group("Ray Serve (scale out)")
    group.add_argument("--ray", action="store_true", default=argparse.SUPPRESS,
                       help=RayServeSettings.model_fields["ray"].description)
    add_arguments(group, RayServeSettings, only=RAY_OPTIONS)


def load_ray_settings(args: argparse.Namespace) -> RayServeSettings:
    """Flags over FEWSTEP_* variables over the config file over the defaults."""
    from ..config import given, load

    return load(RayServeSettings, given(args, RayServeSettings))


def make_spec(settings: RayServeSettings, cluster_gpus: float | None = None):
    """The deployments' spec. `cluster_gpus`: the GPUs the Ray cluster has (the default of
    --gpus-per-replica is 1 when it has any, unless the device asked for is the CPU)."""
    from .deployments import ServiceSpec

    from ..errors import InvalidRequest

    low, high = settings.replica_bounds()
    gpus = settings.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if cluster_gpus and not str(settings.device).startswith("cpu") else 0.0
    if gpus > 0 and ":" in str(settings.device):
        raise InvalidRequest(
            f"device {settings.device!r}: Ray gives each replica its own GPU, which it sees as "
            "cuda:0; use --device auto or cuda", field="device")
    return ServiceSpec(settings=settings, min_replicas=low, max_replicas=high,
                       gpus_per_replica=gpus, cpus_per_replica=settings.cpus_per_replica)


def check_settings(settings: RayServeSettings, *, local: bool) -> None:
    """Every user error found before Ray starts or a model loads. On a local instance the
    device, the files and the address are this machine's, so they are checked too."""
    from .auth import check_bind
    from .catalog import Catalog
    from .listen import bind_socket

    check_bind(settings.host, settings.api_key)
    catalog = Catalog.from_settings(settings)  # names checked
    if local:
        from ..build import inspect

        inspect(settings.engine_options(), settings.limits())  # device, model, family
        catalog.check_references()
        bind_socket(settings.host, settings.port).close()  # in use, or not of this machine


def run_ray_serve(args: argparse.Namespace) -> int:
    """Serve on Ray until SIGTERM/SIGINT; returns the exit status. User errors raise
    FewstepError before Ray starts."""
    from ..errors import FewstepError
    from ..logs import configure_logging
    from ..terminal import require_extra

    settings = load_ray_settings(args)
    # no Ray call may start Ray again once it is shut down: a Serve handle's background thread
    # that did so at exit made the process end with status 1 (read when ray is first imported)
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    require_extra("ray", ("ray.serve",), "fewstep serve --ray")
    check_settings(settings, local=not settings.ray_address)
    import ray
    from ray import serve

    from .deployments import build_app

    log = configure_logging(settings.log_level)
    stop = threading.Event()
    signals = []

    def on_signal(signum, frame):
        signals.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    status: int | None = None  # set once the service ran and stopped as it should
    address = settings.ray_address
    started_ray = started_serve = False
    try:
        if address:
            try:
                ray.init(address=address, log_to_driver=True)
            except (ConnectionError, RuntimeError) as exc:
                raise FewstepError(
                    f"could not join the Ray cluster at {address!r}: {_last_line(str(exc))} "
                    "(is it running? with token authentication, set RAY_AUTH_MODE=token)",
                    field="ray_address") from None
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # "local": a new instance of its own, even if `ray start` runs on this machine
            ray.init(address="local", dashboard_host="127.0.0.1", log_to_driver=True)
            started_ray = True
        # ray.init installs its own SIGTERM handler: ours drains first
        for s in previous:
            signal.signal(s, on_signal)
        spec = make_spec(settings, ray.cluster_resources().get("GPU", 0.0))
        started_serve = started_ray or not _serve_running(serve)
        if not started_serve:
            _check_entry(settings)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        deploy = threading.Thread(target=_deploy, args=(serve, build_app(spec)),
                                  name="fewstep-deploy", daemon=True)
        deploy.start()
        while deploy.is_alive() and not stop.is_set():
            deploy.join(0.2)
        if getattr(deploy, "error", None) is not None:
            reason = _failure_reason(serve) or deploy.error
            print(f"error: the service did not start: {reason}", file=sys.stderr)
            return 1
        if not stop.is_set():
            scale = f"{spec.min_replicas}" if spec.min_replicas == spec.max_replicas else \
                f"{spec.min_replicas}-{spec.max_replicas}"
            log.info("serving on Ray: %s replica(s) (%g GPU, %g CPU each) at http://%s:%s",
                     scale, spec.gpus_per_replica, spec.cpus_per_replica, settings.host,
                     settings.port)
            while not stop.wait(1.0):
                if not ray.is_initialized():
                    print("error: the Ray instance went away", file=sys.stderr)
                    return 1
        # deployed: drain it (else it is still starting: stop it). serve.run may not have
        # returned yet while the application already serves: its status says
        if not deploy.is_alive() or _app_running(serve):
            _drain(serve, settings.grace, signals, log)
        status = 0
        return status
    finally:
        _shut_down(ray, serve, started_ray, started_serve, log)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if not started_ray and status is not None:
            # a joined cluster: leave without ray.shutdown() (also Ray's own at exit). Serve's
            # handle threads may still touch the driver, and Ray ends a process that touches a
            # shut-down driver with status 1, whatever the drain did
            _exit_now(status)


def _deploy(serve, app) -> None:
    """serve.run in a thread, so a signal during a long start (models loading) is seen."""
    me = threading.current_thread()
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as exc:  # noqa: BLE001 - Ray's deployment failure: its last line says why
        me.error = _last_line(str(exc))


def _app_running(serve) -> bool:
    try:
        return str(serve.status().applications[APP_NAME].status).endswith("RUNNING")
    except Exception:  # noqa: BLE001 - not deployed (yet), or Serve is going away
        return False


def _drain(serve, grace: float, signals: list, log) -> None:
    """Readiness false and new work refused; running and queued work gets `grace` seconds
    (a second signal cuts it short), then what is left is stopped."""
    try:
        ingress = serve.get_app_handle(APP_NAME)
    except Exception:  # noqa: BLE001 - never deployed (stopped while starting)
        return
    log.info("shutting down: no new work; running and queued jobs may finish within %g s",
             grace)
    try:
        ingress.drain.remote().result(timeout_s=10)
        count = len(signals)
        left = grace
        while left > 0 and len(signals) == count:
            step = min(1.0, left)
            if ingress.wait_idle.remote(step).result(timeout_s=step + 10):
                return
            left -= step
        log.warning("grace period over: cancelling what is left")
        ingress.stop.remote().result(timeout_s=10)
    except Exception as exc:  # noqa: BLE001 - the shutdown goes on regardless
        log.warning("draining failed (%s); stopping", type(exc).__name__)


def _serve_running(serve) -> bool:
    """Whether Serve already runs on the cluster joined (then it is not fewstep's to stop)."""
    try:
        status = serve.status()  # empty when no Serve controller runs
    except Exception:  # noqa: BLE001
        return False
    return bool(status.proxies or status.applications)


def _check_entry(settings) -> None:
    """Serve already running on the joined cluster keeps its own HTTP address: say so rather
    than announce one that nobody listens on."""
    from ..errors import InvalidRequest

    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().get_serve_details().get("http_options", {})
    except Exception:  # noqa: BLE001 - unknown: serve.start reports what it can
        return
    host, port = http.get("host"), http.get("port")
    if (host, port) != (settings.host, settings.port):
        raise InvalidRequest(
            f"Serve already runs on this cluster with its HTTP entry at {host}:{port}; pass "
            f"--host {host} --port {port}", field="port")


def _shut_down(ray, serve, started_ray: bool, started_serve: bool, log) -> None:
    """Removes what fewstep deployed; stops Serve and Ray only if fewstep started them."""
    if not ray.is_initialized():
        return
    try:
        if started_serve:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    except Exception as exc:  # noqa: BLE001
        log.warning("removing the application failed: %s", type(exc).__name__)
    if started_ray:  # the local instance's processes stop with it
        ray.shutdown()
    log.info("stopped")


def _exit_now(status: int) -> None:
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _failure_reason(serve) -> str | None:
    """The fewstep error that failed a deployment (a replica's constructor), from the
    deployments' status messages, which carry the replica's traceback."""
    import re

    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # noqa: BLE001
        return None
    for deployment in (app.deployments.values() if app else ()):
        found = re.findall(r"fewstep\.\S*?(?:errors|server\.errors)\.\w+: (.+)",
                           deployment.message or "")
        if found:
            return found[-1].strip()
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
