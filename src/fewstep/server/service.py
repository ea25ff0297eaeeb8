"""The state one app instance owns: engine, catalogue, queue, metrics, served files. Route
modules get it as an argument; nothing here is global."""

from __future__ import annotations

import asyncio
import collections
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import FewstepError
from .catalog import Catalog
from .convert import build_request, encode_outputs
from .errors import JobNotFound
from .jobs import QUEUED, Job, JobQueue
from .metrics import Metrics


@dataclass
class ServerOptions:
    api_key: str | None = None
    queue_size: int = 16
    max_body_bytes: int = 64 * 1024 * 1024
    default_timeout_s: float | None = None  # start deadline when a request gives none
    grace_s: float = 30.0  # SIGTERM: how long running and queued work may go on
    job_retention: int = 256  # finished jobs kept for GET /v1/jobs/{id}
    file_retention: int = 512  # images kept for OpenAI `url` responses
    file_ttl_s: float = 3600.0


class ClientGone(Exception):
    """The client disconnected while its job waited or ran."""


class Service:
    def __init__(self, engine, catalog: Catalog, options: ServerOptions):
        self.engine = engine
        self.catalog = catalog
        self.options = options
        self.settings = engine.settings
        self.metrics = Metrics()
        self.metrics.queue_limit.set(options.queue_size)
        self.queue = JobQueue(engine, options.queue_size, metrics=self.metrics,
                              retention=options.job_retention, on_result=self._encode)
        self._files: collections.OrderedDict[str, tuple[bytes, str, float]] = \
            collections.OrderedDict()
        self._files_lock = threading.Lock()

    # -- requests -> jobs ---------------------------------------------------------------

    def build(self, workflow: str, values: dict[str, Any], images=None):
        return build_request(workflow, values, self.catalog, self.settings, images)

    def submit(self, workflow: str, request, timeout_s: float | None = None) -> Job:
        timeout = timeout_s or self.options.default_timeout_s
        deadline = time.monotonic() + timeout if timeout else None
        return self.queue.submit(Job(workflow, request, deadline=deadline))

    async def run(self, http_request, workflow: str, request,
                  timeout_s: float | None = None) -> Job:
        """Queue a job and wait for it; a disconnect cancels it, a start deadline expires it.
        Raises the job's error, if any."""
        job = self.submit(workflow, request, timeout_s)
        http_request.state.job_id = job.id
        await self.wait(http_request, job)
        if job.error is not None:
            raise job.error
        return job

    async def run_counted(self, http_request, workflow: str, request,
                          timeout_s: float | None = None) -> Job:
        """`run`, counted in the request metrics by workflow and outcome."""
        started = time.perf_counter()
        status = "error"
        try:
            job = await self.run(http_request, workflow, request, timeout_s)
            status = "ok"
            return job
        finally:
            self.metrics.requests.labels(workflow, status).inc()
            self.metrics.request_seconds.labels(workflow).observe(time.perf_counter() - started)

    async def wait(self, http_request, job: Job) -> None:
        finished = job.future()
        gone = asyncio.ensure_future(_disconnected(http_request))
        try:
            while not finished.done():
                timeout = None
                if job.state == QUEUED and job.deadline is not None:
                    timeout = max(0.0, job.deadline - time.monotonic())
                done, _ = await asyncio.wait({finished, gone}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if finished in done:
                    break
                if gone in done:
                    self.queue.cancel(job)
                    raise ClientGone(job.id)
                if job.state == QUEUED:
                    self.queue.expire(job)
        finally:
            gone.cancel()

    def job(self, job_id: str) -> Job:
        job = self.queue.get(job_id) if isinstance(job_id, str) and len(job_id) <= 64 else None
        if job is None:
            raise JobNotFound(f"no job {job_id[:64]!r}" if isinstance(job_id, str)
                              else "no such job", field="job_id")
        return job

    # -- results ------------------------------------------------------------------------

    def _encode(self, job: Job, result) -> None:
        """Runs in the worker: redacted parameters and encoded files, ready to send."""
        params = self.catalog.redact_obj(result.params)
        job.params = params
        job.outputs = encode_outputs(result, params)
        job.warnings = [self.catalog.redact(w) for w in result.warnings]
        job.seconds = result.seconds

    def job_result(self, job: Job) -> dict:
        from .convert import b64

        return {
            "id": job.id,
            "workflow": job.workflow,
            "seed": job.params["request"]["seed"],
            "images": [{"b64": b64(data), "media_type": media} for data, media in job.outputs],
            "params": job.params,
            "warnings": job.warnings,
            "seconds": round(job.seconds, 4),
        }

    def store_file(self, data: bytes, media_type: str) -> str:
        token = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._files_lock:
            self._files[token] = (data, media_type, now + self.options.file_ttl_s)
            while len(self._files) > self.options.file_retention:
                self._files.popitem(last=False)
            for key in [k for k, v in self._files.items() if v[2] < now]:
                del self._files[key]
        return token

    def load_file(self, token: str) -> tuple[bytes, str] | None:
        with self._files_lock:
            entry = self._files.get(token)
        if entry is None or entry[2] < time.monotonic():
            return None
        return entry[0], entry[1]

    def redact(self, text: str) -> str:
        return self.catalog.redact(text)

    def count_error(self, exc: FewstepError) -> None:
        if not getattr(exc, "counted", False):
            self.metrics.errors.labels(exc.kind).inc()


async def _disconnected(http_request) -> None:
    """Returns when the client has gone (the body was read already, so the next ASGI message
    is the disconnect)."""
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return
