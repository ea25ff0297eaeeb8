"""The interface the routes use to get work done: submit a core request, wait for it, follow its
events, cancel it, look it up, and ask about health and the queue. The routes know nothing of
threads, queues or engines; `local.LocalBackend` (a bounded queue and one worker over an Engine)
is one implementation, and a backend that sends work elsewhere (Ray Serve replicas) is another.

Jobs are seen through `JobView` snapshots; what a finished job keeps is its `JobOutput`: the
encoded files and the reproduction record, never the inputs or the raw result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Protocol, runtime_checkable

from ..config import Settings
from ..errors import FewstepError
from .errors import JobNotFound

QUEUED, RUNNING, DONE, FAILED, CANCELLED, EXPIRED = (
    "queued", "running", "done", "failed", "cancelled", "expired")
FINAL = frozenset({DONE, FAILED, CANCELLED, EXPIRED})
MAX_JOB_ID_CHARS = 64  # a longer id is never looked up, nor repeated whole in the error


def find_job(jobs: Mapping[str, Any], job_id):
    """The job `job_id` names in a backend's table, or `JobNotFound`."""
    job = jobs.get(job_id) if isinstance(job_id, str) and len(job_id) <= MAX_JOB_ID_CHARS \
        else None
    if job is None:
        shown = repr(job_id[:MAX_JOB_ID_CHARS]) if isinstance(job_id, str) else "such"
        raise JobNotFound(f"no job {shown} (unknown, or finished long ago)", field="job_id")
    return job


def forget_finished(jobs: dict, count: int, budget: int, kept_bytes: int) -> int:
    """Forget finished jobs of a backend's table (oldest first: the table keeps submission
    order) beyond `count` jobs and `budget` bytes of outputs; the most recently finished one
    is always kept. Returns the output bytes still kept."""
    newest = max((j for j in jobs.values() if j.state in FINAL),
                 key=lambda j: j.finished or 0.0, default=None)
    for job in list(jobs.values()):
        if len(jobs) <= count and kept_bytes <= budget:
            break
        if job.state in FINAL and job is not newest:
            del jobs[job.id]
            if job.output is not None:
                kept_bytes -= job.output.nbytes
    return kept_bytes


@dataclass(frozen=True)
class JobOutput:
    """What a client can still fetch from a finished job."""

    files: tuple[tuple[bytes, str], ...]  # (encoded bytes, media type) per image or animation
    params: dict[str, Any]  # the redacted reproduction record
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(len(data) for data, _ in self.files)


@dataclass(frozen=True)
class JobView:
    """A job as it was when the view was taken."""

    id: str
    workflow: str
    state: str
    step: int = 0
    total: int = 0
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    cancelling: bool = False  # a cancel was asked for; the job stops at its next step
    error: FewstepError | None = None
    output: JobOutput | None = None

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "workflow": self.workflow, "state": self.state,
                "step": self.step, "total": self.total, "created": self.created,
                "started": self.started, "finished": self.finished}


@dataclass(frozen=True)
class Health:
    alive: bool  # work can still be done (the worker or the replicas are up)
    ready: bool  # new work is taken (alive and not draining)
    detail: str = "ok"


@dataclass(frozen=True)
class QueueInfo:
    limit: int
    depth: int
    running: tuple[JobView, ...] = field(default_factory=tuple)
    retry_after_s: int = 1


@runtime_checkable
class Backend(Protocol):
    """What the routes may ask of whatever runs the work."""

    settings: Settings  # the request limits the routes check before submitting

    async def submit(self, workflow: str, request, *, timeout_s: float | None = None) -> JobView:
        """Validate `request` fully (no model call), then admit it. Raises the validation's
        typed error, `QueueFull` (with Retry-After) or `ShuttingDown`. `timeout_s` is a start
        deadline: passed while queued, the job expires (504) and never runs."""

    async def wait(self, job_id: str) -> JobView:
        """Until the job is final; its view, with `error` or `output`."""

    def events(self, job_id: str) -> AsyncIterator[dict]:
        """The job's events as dicts with an "event" key: `state` first, then `started`,
        `progress` {step, total}, `preview` {step, image, media_type}, and one final state
        (`done`, `failed`, `cancelled`, `expired`), after which the iterator ends."""

    async def cancel(self, job_id: str) -> JobView:
        """A queued job never runs; a running one stops at its next step."""

    async def get(self, job_id: str) -> JobView:
        """Raises `JobNotFound` for an unknown or forgotten id."""

    async def jobs(self) -> list[JobView]:
        """The jobs still remembered, oldest first."""

    async def health(self) -> Health: ...

    async def queue_info(self) -> QueueInfo: ...

    def describe(self) -> dict[str, Any]:
        """The model served: {"family", "native_size", "inpaint_only"}."""

    # lifecycle, called by the app and by the process running it (SIGTERM drain)
    def start(self) -> None: ...

    def drain(self) -> None:
        """Refuse new work from now on (readiness false); queued and running work goes on."""

    def wait_idle(self, timeout: float) -> bool: ...

    def stop(self, timeout: float = 5.0) -> None:
        """End all work: queued and running jobs fail with `ShuttingDown`."""
