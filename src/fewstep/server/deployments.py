"""The service on Ray Serve: one ingress serving the same FastAPI app as `fewstep serve`, and
engine replicas, each holding one Engine behind the single-process service's local backend
(its queue, worker and batching), so a replica runs work exactly as the single-process service.

    HTTP -> Ray proxy -> Ingress (the app; jobs, events, errors)  --stream-->  EngineReplica x N

The ingress's backend (`ray_backend.RayBackend`) sends each job to a replica through a
streaming handle call: the replica admits it into its local backend and streams the job's
events, then its final view with the encoded files. Ray routes each call to the less busy of
two replicas and holds a replica to `max_ongoing_requests` (one running job and the
`--queue-size` waiting behind it). The ingress admits as many jobs as the ready replicas hold
plus `--queue-size` more waiting for a slot, and answers the service's own 429 with Retry-After
past that (Ray's `max_queued_requests`, set above that, is only a safety net; its rejection is
mapped to the same 429, never Ray's raw 503). A replica is healthy only once its engine is
loaded and warmed (the Engine compiles its shapes while it is made) and its worker lives.
Responses name the replica that ran the job in `X-Fewstep-Replica`.

`build_app(spec)` makes the Serve application; `fewstep.ray:app` builds one from options (for
`serve run` and Serve config files) and `fewstep serve --ray` runs one (`ray_cli`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

from ..errors import FewstepError
from .backend import FINAL, RUNNING
from .ray_backend import Overloaded, RayBackend, ReplicaLost, ReplicaState
from .service import ServerOptions

log = logging.getLogger("fewstep.server")

REPLICA_HEADER = "X-Fewstep-Replica"
INGRESS_MAX_ONGOING = 10_000  # HTTP requests the ingress holds at once (waits and event streams)
CONSTRUCTOR_RETRIES = 3  # a replica that cannot load its engine is retried this often, then fails


@dataclass
class ServiceSpec:
    """What the deployments need, plain and picklable: the options of `fewstep serve --ray`
    (`ray_cli.RayServeSettings`) and how to run replicas."""

    settings: Any  # RayServeSettings
    min_replicas: int = 1
    max_replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    # makes the engine from the settings and `Catalog.engine_needs()` (default: as
    # `fewstep serve` does, with `build_engine`); tests use it
    engine_factory: Callable[[Any, dict], Any] | None = None

    @property
    def queue_size(self) -> int:
        return int(self.settings.queue_size)

    def server_options(self) -> ServerOptions:
        return ServerOptions.from_settings(self.settings)

    def make_engine(self):
        """The engine of a replica, built as `fewstep serve` builds it: its catalogue's LoRAs
        and components checked before loading (one that does not fit fails the replica)."""
        from .catalog import Catalog

        needs = Catalog.from_settings(self.settings).engine_needs()
        if self.engine_factory is not None:
            return self.engine_factory(self.settings, needs)
        from ..build import build_engine

        return build_engine(self.settings.engine_options(), settings=self.settings.limits(),
                            **needs)

    def catalog(self, engine):
        """The catalogue, with the model, LCM-LoRA (and tiny VAE) references that `engine`
        resolved hidden as `fewstep serve` hides them (an engine, or its description)."""
        from .catalog import Catalog

        return Catalog.from_settings(self.settings, engine)


# -- the engine replicas ------------------------------------------------------------------------


class EngineReplica:
    """One Engine and the local backend over it. `run` is one job's whole life as a stream of
    plain messages: "admitted" (or "refused" with the typed error), "started", "progress",
    "preview", then "final" with the job's state, error and encoded files."""

    def __init__(self, spec: ServiceSpec):
        from ..logs import quiet_libraries
        from .convert.common import encode_result
        from .heap import freeze_startup_objects
        from .local import LocalBackend
        from .service import default_max_batch

        quiet_libraries()  # a replica's log is the cluster's: no progress bars or notices
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        engine = spec.make_engine()
        self.catalog = spec.catalog(engine)
        self.engine = engine
        capacity = spec.queue_size + 1
        options = spec.server_options()
        # Ray holds the replica to `capacity` calls; the local queue has room for more, since a
        # cancelled call frees its Ray slot while its job still stops at its next step.
        # Batching as the single-process service does it, with the same defaults.
        self.backend = LocalBackend(
            engine, functools.partial(encode_result, catalog=self.catalog),
            max_size=2 * capacity, retention=2 * capacity + 8,
            retention_bytes=options.job_retention_bytes,
            max_batch=options.max_batch or default_max_batch(getattr(engine, "device", "cpu")),
            batch_wait_s=options.batch_wait_ms / 1000)
        self.backend.start()
        freeze_startup_objects()  # as `fewstep serve` does: full collections skip the engine
        log.info("replica %s ready: %s on %s (pid %d)", self.name, engine.family.name,
                 engine.device, os.getpid())

    async def run(self, workflow: str, request, timeout_s: float | None):
        backend = self.backend
        try:
            view = await backend.submit(workflow, request, timeout_s=timeout_s)
        except FewstepError as exc:
            exc.__traceback__ = exc.__context__ = exc.__cause__ = None
            yield {"event": "refused", "error": exc}
            return
        del request
        yield {"event": "admitted", "replica": self.name}
        final = False
        try:
            async for event in backend.events(view.id):
                kind = event["event"]
                if kind == "state":  # what happened before watching began
                    if event["state"] == RUNNING:
                        yield {"event": "started"}
                    if event["state"] not in FINAL:
                        continue
                    kind = event["state"]
                if kind in FINAL:
                    done = await backend.get(view.id)
                    final = True
                    yield {"event": "final", "state": done.state, "step": done.step,
                           "total": done.total, "error": done.error, "output": done.output}
                    return
                event.pop("id", None)
                yield event
        finally:
            if not final:  # the call was cancelled: a client's cancel or disconnect
                with contextlib.suppress(FewstepError):
                    await backend.cancel(view.id)

    def describe(self) -> dict:
        """The model, and what the ingress needs to build the same catalogue."""
        engine = self.engine
        return {**self.backend.describe(), "model_ref": getattr(engine, "model_ref", None),
                "lcm_ref": getattr(engine, "lcm_ref", None),
                "speed": getattr(engine, "speed", None), "replica": self.name}

    def check_health(self) -> None:
        if not self.backend.alive:
            raise RuntimeError("the replica's worker has stopped")

    def __del__(self):
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.stop(timeout=5.0)


# -- the ingress -------------------------------------------------------------------------------


class ReplicaHeaderMiddleware:
    """Names the replica that ran a response's job (`X-Fewstep-Replica`), and cancels the job
    of a request Ray cancels (its client went away), as a disconnect does in the single-process
    service."""

    def __init__(self, app, backend: RayBackend):
        self.app = app
        self.backend = backend

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        answered = False

        async def named_send(message):
            nonlocal answered
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                job_id = state.get("job_id") or next(
                    (v.decode("latin-1") for k, v in headers if k.lower() == b"x-job-id"),
                    None) or _job_in_path(scope.get("path", ""))
                replica = self.backend.replica_of(job_id) if job_id else None
                if replica:
                    headers.append((REPLICA_HEADER.lower().encode(), replica.encode("latin-1")))
                    message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True
            await send(message)

        try:
            await self.app(scope, receive, named_send)
        except asyncio.CancelledError:
            job_id = state.get("job_id")
            if job_id and not answered:
                self.backend.cancel_soon(job_id)
            raise


def _job_in_path(path: str) -> str | None:
    """The job a /v1/jobs/{id}[/...] request is about."""
    match = _JOB_PATH.match(path)
    return match.group(1) if match else None


_JOB_PATH = re.compile(r"^/v1/jobs/([^/]+)(?:/[a-z]+)?$")


@serve.ingress()
class Ingress:
    """The app of `fewstep serve`, over a RayBackend that sends jobs to the engine replicas."""

    async def __init__(self, engines, spec: ServiceSpec):
        self.engines = engines
        self.spec = spec
        _check_proxy_bind(spec.settings.api_key)
        capacity = spec.queue_size + 1
        options = spec.server_options()
        self.backend = RayBackend(
            self._dispatch, self._replica_state, spec.settings.limits(), describe=self._describe,
            overflow=spec.queue_size, retention=options.job_retention,
            retention_bytes=options.job_retention_bytes)
        self._capacity = capacity
        await self.backend.connect()  # waits for one engine replica

    def __serve_build_asgi_app__(self):
        from .app import create_app

        description = self.backend.describe()
        engine = SimpleNamespace(model_ref=description["model_ref"],
                                 lcm_ref=description["lcm_ref"], speed=description["speed"])
        catalog = self.spec.catalog(engine)
        app = create_app(catalog=catalog, options=self.spec.server_options(),
                         backend=self.backend)
        app.add_middleware(ReplicaHeaderMiddleware, backend=self.backend)
        return app

    # -- what the process running the service calls (drain on SIGTERM) ------------------------

    async def drain(self) -> None:
        self.backend.drain()

    async def wait_idle(self, timeout: float) -> bool:
        return await self.backend.wait_idle_async(timeout)

    async def stop(self) -> None:
        self.backend.stop()

    # -- the RayBackend's two links to Ray ---------------------------------------------------

    async def _describe(self) -> dict:
        return await self.engines.describe.remote()

    async def _dispatch(self, workflow: str, request, timeout_s: float | None):
        response = self.engines.options(stream=True).run.remote(workflow, request, timeout_s)
        try:
            async for message in response:
                yield message
        except BackPressureError:
            raise Overloaded() from None
        except (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError,
                DeploymentUnavailableError):
            raise ReplicaLost() from None
        except RequestCancelledError:
            raise asyncio.CancelledError() from None
        except RayTaskError as exc:  # the replica raised: never its text in a client's body
            cause = getattr(exc, "cause", None)
            if isinstance(cause, FewstepError):
                raise cause from None
            log.error("a replica failed a job: %s", exc)
            raise RuntimeError("a replica failed") from None
        finally:
            response.cancel()  # nothing once the stream has ended; else the replica's job stops

    async def _replica_state(self) -> ReplicaState:
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.engines.app_name)
        deployment = app.deployments.get(self.engines.deployment_name) if app else None
        if deployment is None:
            return ReplicaState(ready=0, target=0, alive=False, capacity=self._capacity)
        states = {getattr(k, "value", k): n for k, n in deployment.replica_states.items()}
        failed = getattr(deployment.status, "value", deployment.status) == "DEPLOY_FAILED"
        return ReplicaState(ready=int(states.get("RUNNING", 0)),
                            target=int(sum(states.values())), alive=not failed,
                            capacity=self._capacity)


def _check_proxy_bind(api_key: str | None) -> None:
    """`serve run` and Serve config files choose the HTTP address, not fewstep: refuse to serve
    beyond loopback without an API key, as `fewstep serve` does."""
    from .auth import check_bind

    try:
        from ray.serve.context import _get_global_client

        host = _get_global_client().get_serve_details().get("http_options", {}).get("host")
    except Exception:  # noqa: BLE001 - the address is unknown: the proxies are Ray's to set
        return
    if host:
        check_bind(host, api_key)


# -- the application -----------------------------------------------------------------------------


def build_app(spec: ServiceSpec):
    """The Serve application: the ingress bound to the engine replicas' deployment."""
    capacity = spec.queue_size + 1
    grace = float(spec.settings.grace)
    engine_options: dict[str, Any] = dict(
        # the ingress admits at most the ready replicas' capacity plus queue_size; Ray's own
        # limit only catches what that count cannot see (jobs cancelled but still stopping)
        max_ongoing_requests=capacity,
        max_queued_requests=2 * capacity * spec.max_replicas + spec.queue_size,
        ray_actor_options={"num_cpus": spec.cpus_per_replica,
                           "num_gpus": spec.gpus_per_replica},
        graceful_shutdown_timeout_s=grace + 5.0, graceful_shutdown_wait_loop_s=1.0,
        health_check_period_s=5.0, max_constructor_retry_count=CONSTRUCTOR_RETRIES)
    if spec.min_replicas == spec.max_replicas:
        engine_options["num_replicas"] = spec.min_replicas
    else:
        engine_options["autoscaling_config"] = {
            "min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
            "initial_replicas": spec.min_replicas,
            # a replica with one job running and one waiting is busy: add one
            "target_ongoing_requests": 2}
    # the replicas' logs (and Ray's line per call) at the service's --log-level
    level = str(spec.settings.log_level).upper()
    logging_config = {"log_level": "DEBUG" if level == "TRACE" else level}
    engines = serve.deployment(EngineReplica).options(**engine_options,
                                                      logging_config=logging_config)
    ingress = serve.deployment(Ingress).options(
        num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=grace + 5.0,
        logging_config=logging_config)
    # the replicas never see HTTP: they need no API key
    engine_spec = dataclasses.replace(
        spec, settings=spec.settings.model_copy(update={"api_key": None}))
    return ingress.bind(engines.bind(engine_spec), spec)
