"""The interface the routes use to get work done: submit a core request, wait for it, follow its
events, cancel it, look it up, and ask about health and the queue. The routes know nothing of
threads, queues or engines; `local.LocalBackend` (a bounded queue and one worker over an Engine)
is one implementation, and a backend that sends work elsewhere (Ray Serve replicas) is another.

Jobs are seen through `JobView` snapshots; what a finished job keeps is its `JobOutput`: the
encoded files and the reproduction record, never the inputs or the raw result.

What both backends keep of a job is here too: `Job` (its state, its one way to a final state,
waiting and events, from any thread) and `JobTable` (lookup, retention and the typical run time
behind Retry-After)."""

from __future__ import annotations

import asyncio
import collections
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, runtime_checkable

from ..config import Settings
from ..errors import FewstepError
from ..records import Record
from .errors import JobNotFound

QUEUED, RUNNING, DONE, FAILED, CANCELLED, EXPIRED = (
    "queued", "running", "done", "failed", "cancelled", "expired")
FINAL = frozenset({DONE, FAILED, CANCELLED, EXPIRED})
MAX_JOB_ID_CHARS = 64  # a longer id is never looked up, nor repeated whole in the error


@dataclass(frozen=True)
class JobOutput:
    """What a client can still fetch from a finished job."""

    files: tuple[tuple[bytes, str], ...]  # (encoded bytes, media type) per image or animation
    record: Record  # how it was made, catalogue names in place of references
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


@dataclass(eq=False)
class Job:
    """A job as a backend keeps it: mutable, touched by the backend's threads and event loops
    (a lock guards what they share). Backends subclass it with what they run it from."""

    workflow: str
    deadline: float | None = None  # time.monotonic() by which it must have started
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = QUEUED
    step: int = 0
    total: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: FewstepError | None = None
    output: JobOutput | None = None
    cancel: threading.Event = field(default_factory=threading.Event)  # set: stop it
    _watchers: list = field(default_factory=list)  # (loop, asyncio.Queue) for events
    _futures: list = field(default_factory=list)  # (loop, asyncio.Future) for completion
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def view(self) -> JobView:
        return JobView(id=self.id, workflow=self.workflow, state=self.state, step=self.step,
                       total=self.total, created=self.created, started=self.started,
                       finished=self.finished, cancelling=self.cancel.is_set(),
                       error=self.error, output=self.output)

    def late(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) > self.deadline

    # -- state changes (from any thread) --------------------------------------------------

    def start(self) -> None:
        """It runs now."""
        self.state, self.started = RUNNING, time.time()
        self.emit({"event": "started", **self.view().summary()})

    def progress(self, step: int, total: int) -> None:
        self.step, self.total = step, total
        self.emit({"event": "progress", "id": self.id, "step": step, "total": total})

    def finish(self, state: str, *, output: JobOutput | None = None,
               error: FewstepError | None = None) -> bool:
        """Move to a final state, once (False when it was final already); what the job no
        longer needs is let go, and its waiters and watchers are told."""
        if error is not None:  # a traceback would keep every frame's tensors and images alive
            error.__traceback__ = error.__context__ = error.__cause__ = None
        with self._lock:
            if self.state in FINAL:
                return False
            self.state, self.output, self.error = state, output, error
            self.finished = time.time()
            futures, self._futures = self._futures, []
        self.let_go()
        for loop, future in futures:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # the loop is closed: that waiter is gone
                pass
        self.emit({"event": state, **self.view().summary()})
        return True

    def let_go(self) -> None:
        """What a final job drops (subclasses: its request, timers)."""

    # -- notification -----------------------------------------------------------------

    def emit(self, event: dict) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for loop, queue in watchers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: that watcher is gone
                pass

    def watched(self) -> bool:
        with self._lock:
            return bool(self._watchers)

    # -- waiting (asyncio side) ---------------------------------------------------------

    async def wait(self) -> JobView:
        """Until the job is final."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self.state in FINAL:
                future.set_result(None)
            else:
                self._futures.append((loop, future))
        await future
        return self.view()

    async def events(self) -> AsyncIterator[dict]:
        """`state` first, then every event up to and including the final state."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._watchers.append((asyncio.get_running_loop(), queue))
        try:
            yield {"event": "state", **self.view().summary()}
            if self.state in FINAL:
                return
            while True:
                event = await queue.get()
                yield event
                if event["event"] in FINAL:
                    return
        finally:
            with self._lock:
                self._watchers = [(lo, q) for lo, q in self._watchers if q is not queue]


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class JobTable:
    """A backend's jobs by id, in submission order, with the outputs of finished ones kept
    within `retention` jobs and `retention_bytes`, and the typical run time of a job (for
    Retry-After). Not locked: a backend guards it as it guards its other state."""

    def __init__(self, retention: int = 256, retention_bytes: int = 256 * 1024 * 1024):
        self.retention = retention
        self.retention_bytes = retention_bytes
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.kept_bytes = 0
        self._durations: collections.deque[float] = collections.deque(maxlen=20)

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job
        self.forget_old()

    def find(self, job_id) -> Job:
        """The job `job_id` names, or `JobNotFound`."""
        job = self.jobs.get(job_id) if isinstance(job_id, str) and \
            len(job_id) <= MAX_JOB_ID_CHARS else None
        if job is None:
            shown = repr(job_id[:MAX_JOB_ID_CHARS]) if isinstance(job_id, str) else "such"
            raise JobNotFound(f"no job {shown} (unknown, or finished long ago)", field="job_id")
        return job

    def discard(self, job: Job) -> None:
        self.jobs.pop(job.id, None)

    def finished(self, job: Job) -> None:
        """`job` became final: its output is counted and old ones forgotten."""
        if job.output is not None and job.id in self.jobs:
            self.kept_bytes += job.output.nbytes
        self.forget_old()

    def forget_old(self) -> None:
        """Forget finished jobs (oldest first) beyond the count and the byte budget; the most
        recently finished one is always kept."""
        newest = max((j for j in self.jobs.values() if j.state in FINAL),
                     key=lambda j: j.finished or 0.0, default=None)
        for job in list(self.jobs.values()):
            if len(self.jobs) <= self.retention and self.kept_bytes <= self.retention_bytes:
                break
            if job.state in FINAL and job is not newest:
                del self.jobs[job.id]
                if job.output is not None:
                    self.kept_bytes -= job.output.nbytes

    def ran(self, seconds: float) -> None:
        self._durations.append(seconds)

    def retry_after(self, waiting: int, slots: int = 1) -> int:
        """Seconds a client should wait before retrying: a typical job's time, times the jobs
        ahead of the next free slot."""
        durations = sorted(self._durations)
        typical = durations[len(durations) // 2] if durations else 1.0
        return max(1, min(600, round(typical * (waiting / max(1, slots) + 1))))


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
