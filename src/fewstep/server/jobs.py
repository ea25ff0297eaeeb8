"""The job queue: one worker thread drains a bounded queue and runs each job on the engine.

The engine runs one request at a time and applies each request's LoRA stack itself, so adapters
change only here, in the worker, between jobs. A job carries its own cancel Event (set by a
client's cancel or disconnect: the engine stops at the next step) and a deadline for its start
(passed while queued -> 504, and it never runs). Waiting is done from asyncio through a Future
that the worker completes with `call_soon_threadsafe`."""

from __future__ import annotations

import base64
import io

import asyncio
import collections
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import Cancelled, FewstepError, OutOfMemory
from .errors import DeadlineExceeded, InternalError, QueueFull, ShuttingDown

log = logging.getLogger("fewstep.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED, EXPIRED = (
    "queued", "running", "done", "failed", "cancelled", "expired")
FINAL = {DONE, FAILED, CANCELLED, EXPIRED}


@dataclass(eq=False)
class Job:
    workflow: str
    request: Any  # a fewstep.tasks Request
    deadline: float | None = None  # time.monotonic() by which it must have started
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = QUEUED
    step: int = 0
    total: int = 0
    result: Any = None
    error: FewstepError | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    params: dict | None = None  # set with the result: redacted reproduction record
    outputs: list = field(default_factory=list)  # [(bytes, media type)]
    warnings: list = field(default_factory=list)
    seconds: float = 0.0
    _watchers: list = field(default_factory=list)  # (loop, asyncio.Queue) for events
    _futures: list = field(default_factory=list)  # (loop, asyncio.Future) for completion
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> dict:
        return {"id": self.id, "workflow": self.workflow, "state": self.state,
                "step": self.step, "total": self.total, "created": self.created,
                "started": self.started, "finished": self.finished}

    # -- notification (called from any thread) ----------------------------------------

    def _emit(self, event: dict) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for loop, queue in watchers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: that watcher is gone
                pass

    def _finish(self, state: str, result=None, error: FewstepError | None = None) -> bool:
        with self._lock:
            if self.state in FINAL:
                return False
            self.state, self.result, self.error = state, result, error
            self.finished = time.time()
            futures, self._futures = self._futures, []
        self.done.set()
        for loop, future in futures:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:
                pass
        self._emit({"event": state, **self.summary()})
        return True

    # -- waiting (asyncio side) --------------------------------------------------------

    def future(self) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self.state in FINAL:
                future.set_result(None)
            else:
                self._futures.append((loop, future))
        return future

    def watch(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._watchers.append((loop, queue))
        return queue

    def unwatch(self, queue: asyncio.Queue) -> None:
        with self._lock:
            self._watchers = [(lo, q) for lo, q in self._watchers if q is not queue]


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class JobQueue:
    """A bounded FIFO of jobs and the one worker thread that runs them on `engine`."""

    def __init__(self, engine, max_size: int = 16, *, metrics=None, retention: int = 256,
                 on_result: Callable[[Job], None] | None = None):
        if max_size < 1:
            raise ValueError("queue size must be at least 1")
        self.engine = engine
        self.max_size = max_size
        self.metrics = metrics
        self.on_result = on_result
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._retention = retention
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._closing = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        self.completed = itertools.count()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._closing = False
                self._thread = threading.Thread(target=self._work, name="fewstep-worker",
                                                daemon=True)
                self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """Refuse new jobs from now on; queued and running ones go on."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and self._running is None

    def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._running is not None:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def stop(self, timeout: float = 5.0) -> None:
        """Fail whatever is queued, cancel what runs, and end the worker."""
        with self._cond:
            self._closing = True
            self._draining = True
            pending = list(self._queue)
            self._queue.clear()
            running = self._running
            self._cond.notify_all()
        for job in pending:
            self._fail(job, FAILED, ShuttingDown("the server is shutting down"))
        if running is not None:
            running.cancel.set()
        self._update_gauges()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- submission -----------------------------------------------------------------------

    def retry_after(self) -> int:
        """Seconds a client should wait before retrying: the queue's expected wait."""
        typical = sorted(self._durations)[len(self._durations) // 2] if self._durations else 1.0
        return max(1, min(600, round(typical * (len(self._queue) + 1))))

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._draining:
                raise ShuttingDown("the server is shutting down; not taking new work")
            if len(self._queue) >= self.max_size:
                raise QueueFull(f"the queue is full ({self.max_size} waiting); retry later")
            self._queue.append(job)
            self._jobs[job.id] = job
            while len(self._jobs) > self._retention:
                oldest = next(iter(self._jobs.values()))
                if oldest.state not in FINAL:
                    break
                self._jobs.popitem(last=False)
            self._cond.notify_all()
        self._update_gauges()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> Job | None:
        return self._running

    def cancel(self, job: Job) -> None:
        """Cancel a job: a queued one is removed and never runs; a running one stops at its
        next step."""
        job.cancel.set()
        with self._cond:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
                self._cond.notify_all()
        if queued:
            self._fail(job, CANCELLED, Cancelled("cancelled while queued"))
            self._update_gauges()

    def expire(self, job: Job) -> bool:
        """The job's start deadline has passed: remove it if it has not started."""
        with self._cond:
            if job not in self._queue:
                return False
            self._queue.remove(job)
            self._cond.notify_all()
        self._fail(job, EXPIRED, DeadlineExceeded(
            "the request's deadline passed while it was queued; it was not run"))
        self._update_gauges()
        return True

    # -- the worker -----------------------------------------------------------------------

    def _next(self) -> Job | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait(0.5)
            job = self._queue.popleft()
            if job.deadline is not None and time.monotonic() > job.deadline:
                expired = True
            else:
                expired = False
                job.state, job.started = RUNNING, time.time()
                self._running = job
        self._update_gauges()
        if expired:
            self._fail(job, EXPIRED, DeadlineExceeded(
                "the request's deadline passed while it was queued; it was not run"))
            return self._next()
        return job

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            try:
                self._run(job)
            except BaseException:  # noqa: BLE001 - the worker must survive anything
                log.exception("worker: unexpected failure around job %s", job.id)
                self._fail(job, FAILED, InternalError())
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()
                self._update_gauges()

    def _run(self, job: Job) -> None:
        import torch

        def progress(step: int, total: int) -> None:
            job.step, job.total = step, total
            job._emit({"event": "progress", "id": job.id, "step": step, "total": total})

        def preview(step: int, image) -> None:
            with job._lock:
                if not job._watchers:  # nobody follows the events: skip the encoding
                    return
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            job._emit({"event": "preview", "id": job.id, "step": step,
                       "image": base64.b64encode(buffer.getvalue()).decode("ascii"),
                       "media_type": "image/png"})

        job._emit({"event": "started", **job.summary()})
        start = time.perf_counter()
        try:
            result = self.engine.generate(job.request, progress=progress, cancel=job.cancel,
                                          preview=preview)
        except Cancelled as exc:
            self._fail(job, CANCELLED, exc)
            return
        except torch.OutOfMemoryError:
            self.engine.release_memory()
            error = OutOfMemory("out of memory on the device; try a smaller size or batch")
            self._fail(job, FAILED, error)
            return
        except FewstepError as exc:
            if isinstance(exc, OutOfMemory):
                self.engine.release_memory()
            self._fail(job, FAILED, exc)
            return
        except Exception:  # noqa: BLE001 - unexpected: logged here, generic to the client
            log.exception("job %s (%s) failed", job.id, job.workflow)
            self.engine.release_memory()
            self._fail(job, FAILED, InternalError())
            return
        seconds = time.perf_counter() - start
        self._durations.append(seconds)
        if self.metrics is not None:
            self.metrics.generation_seconds.labels(job.workflow).observe(seconds)
        if self.on_result is not None:
            try:
                self.on_result(job, result)
            except Exception:  # noqa: BLE001
                log.exception("job %s: encoding the result failed", job.id)
                self._fail(job, FAILED, InternalError())
                return
        job._finish(DONE, result=result)
        next(self.completed)

    # -- metrics ---------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))
            self.metrics.running.set(1 if self._running is not None else 0)

    def _fail(self, job: Job, state: str, error: FewstepError) -> None:
        if job._finish(state, error=error):
            error.counted = True  # the HTTP layer does not count it again
            if self.metrics is not None:
                self.metrics.errors.labels(error.kind).inc()
