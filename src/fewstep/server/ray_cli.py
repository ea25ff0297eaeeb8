"""`fewstep serve --ray`: the same service on Ray Serve. Starts a local Ray instance (or joins
one with `--ray-address`), deploys the application of `fewstep.server.ray` with its HTTP entry on
`--host/--port`, and on SIGTERM drains: readiness goes false, new work gets 503, running and
queued work may finish within `--grace` seconds; then the application is removed, and Serve and
the Ray instance are shut down if fewstep started them (a joined cluster is left running).

Only the standard library is imported at module level (the CLI lists its flags cheaply)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

RAY_DEFAULTS = {"ray": False, "replicas": "1", "ray_address": None, "gpus_per_replica": None,
                "cpus_per_replica": 1.0}
APP_NAME = "fewstep"


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    group = p.add_argument_group("Ray Serve (scale out)")
    group.add_argument("--ray", action="store_true", default=S,
                       help="serve on Ray Serve: several engine replicas behind one HTTP entry")
    group.add_argument("--replicas", metavar="N|MIN:MAX", default=S,
                       help="engine replicas (default 1); MIN:MAX autoscales between the two")
    group.add_argument("--ray-address", metavar="auto|ADDR", default=S,
                       help="join this Ray cluster (default: start a local instance)")
    group.add_argument("--gpus-per-replica", type=float, metavar="G", default=S,
                       help="GPUs per replica (default 1 when the cluster has GPUs, else 0)")
    group.add_argument("--cpus-per-replica", type=float, metavar="C", default=S,
                       help="CPUs per replica (default 1)")


def parse_replicas(text) -> tuple[int, int]:
    """`N` or `MIN:MAX` -> (min, max), both at least 1, min <= max."""
    from ..errors import InvalidRequest

    raw = str(text).strip()
    low, sep, high = raw.partition(":")
    try:
        bounds = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise InvalidRequest(f"--replicas takes N or MIN:MAX, got {raw!r}",
                             field="replicas") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise InvalidRequest(f"--replicas {raw!r}: need 1 <= MIN <= MAX", field="replicas")
    return bounds


def _number(values: dict, key: str, low: float = 0.0) -> float | None:
    from ..errors import InvalidRequest

    value = values.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number >= low or number == float("inf"):
        raise InvalidRequest(f"--{key.replace('_', '-')} must be a number >= {low:g}, got "
                             f"{value!r}", field=key)
    return number


def make_spec(values: dict, cluster_gpus: float | None = None):
    """The deployments' spec from `fewstep serve` option values. `cluster_gpus`: the GPUs the
    Ray cluster has (the default of --gpus-per-replica is 1 when it has any, unless the device
    asked for is the CPU)."""
    from ..config import Settings
    from .ray import ServiceSpec

    low, high = parse_replicas(values.get("replicas", "1"))
    gpus = _number(values, "gpus_per_replica")
    if gpus is None:
        on_cpu = str(values.get("device") or "auto").startswith("cpu")
        gpus = 1.0 if cluster_gpus and not on_cpu else 0.0
    cpus = _number(values, "cpus_per_replica")
    return ServiceSpec(values=dict(values), settings=Settings.from_env(), min_replicas=low,
                       max_replicas=high, gpus_per_replica=gpus,
                       cpus_per_replica=1.0 if cpus is None else cpus)


def check_values(values: dict) -> None:
    """Every user error found before Ray starts or a model loads."""
    from ..errors import InvalidRequest
    from .auth import check_bind
    from .cli import build_catalog

    check_bind(values["host"], values["api_key"])
    if int(values["queue_size"]) < 1:
        raise InvalidRequest("--queue-size must be at least 1", field="queue_size")
    build_catalog(values)  # names checked
    parse_replicas(values.get("replicas", "1"))
    _number(values, "gpus_per_replica")
    _number(values, "cpus_per_replica")


def run_ray_serve(values: dict) -> int:
    """Serve on Ray until SIGTERM/SIGINT; returns the exit status. User errors raise
    FewstepError before Ray starts."""
    import logging

    from ..errors import FewstepError

    check_values(values)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise FewstepError('fewstep serve --ray needs the ray extra: pip install '
                           '"fewstep[ray]"', field="ray") from None
    from .ray import build_app

    log = logging.getLogger("fewstep.server")
    logging.basicConfig(level=str(values.get("log_level") or "info").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signals = []

    def on_signal(signum, frame):
        signals.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    address = values.get("ray_address")
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
        spec = make_spec(values, ray.cluster_resources().get("GPU", 0.0))
        started_serve = started_ray or not _serve_running(serve)
        if not started_serve:
            _check_entry(values)
        serve.start(http_options={"host": values["host"], "port": int(values["port"])})
        deploy = threading.Thread(target=_deploy, args=(serve, build_app(spec), stop),
                                  name="fewstep-deploy", daemon=True)
        deploy.start()
        while deploy.is_alive() and not stop.is_set():
            deploy.join(0.2)
        if getattr(deploy, "error", None) is not None:
            reason = _failure_reason(serve) or deploy.error
            print(f"error: the service did not start: {reason}", file=sys.stderr)
            return 1
        if not stop.is_set():
            print(f"serving on Ray: {spec.min_replicas}"
                  f"{'' if spec.max_replicas == spec.min_replicas else f'-{spec.max_replicas}'}"
                  f" replica(s) ({spec.gpus_per_replica:g} GPU, {spec.cpus_per_replica:g} CPU "
                  f"each) at http://{values['host']}:{values['port']}", file=sys.stderr,
                  flush=True)
            while not stop.wait(1.0):
                if not ray.is_initialized():
                    print("error: the Ray instance went away", file=sys.stderr)
                    return 1
        if not deploy.is_alive():  # deployed: drain it (else it is still starting: stop it)
            _drain(serve, float(values["grace"]), signals, log)
        return 0
    finally:
        _shut_down(ray, serve, started_ray, started_serve, log)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _deploy(serve, app, stop: threading.Event) -> None:
    """serve.run in a thread, so a signal during a long start (models loading) is seen."""
    me = threading.current_thread()
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as exc:  # noqa: BLE001 - Ray's deployment failure: its last line says why
        me.error = _last_line(str(exc))


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


def _check_entry(values: dict) -> None:
    """Serve already running on the joined cluster keeps its own HTTP address: say so rather
    than announce one that nobody listens on."""
    from ..errors import InvalidRequest

    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().get_serve_details().get("http_options", {})
    except Exception:  # noqa: BLE001 - unknown: serve.start reports what it can
        return
    host, port = http.get("host"), http.get("port")
    if (host, port) != (values["host"], int(values["port"])):
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
    ray.shutdown()
    log.info("stopped")


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
