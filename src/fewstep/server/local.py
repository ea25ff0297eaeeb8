"""The local backend: a bounded FIFO of jobs and one worker thread that runs them on one Engine.

Every request is planned at admission (`engine.plan`: checked against the limits and the model,
described as a pipeline call, no model run), so a full queue never hides a request that cannot
succeed. The worker takes the head of the queue together with the queued jobs whose calls can
merge with it (same task, size, steps, guidance, LoRA stack, components; `merge_key()`), up to
`max_batch`, and runs them as one pipeline call (`engine.run`) in which each keeps its own
prompt, seed, progress and cancel flag; a lone job is a batch of one. The head always runs
next, so no job waits behind later ones for long.

The engine runs one call at a time and applies each call's LoRA stack itself, so adapters
change only here, in the worker, between batches. A job carries its own cancel Event (set by a
client's cancel or disconnect: the engine stops at the next step) and a start deadline (passed
while queued -> 504, and it never runs). Waiting is done from asyncio through futures that the
worker completes with `call_soon_threadsafe`.

A finished job keeps only what a client can still fetch (its `JobOutput`: encoded files and the
record): the planned call (with the request's images) and the raw result are dropped as soon as
the outputs are encoded, and finished jobs are forgotten oldest first beyond a count and a byte
budget."""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..errors import Cancelled, FewstepError
from .backend import (
    CANCELLED,
    DONE,
    EXPIRED,
    FAILED,
    FINAL,
    RUNNING,
    Health,
    Job,
    JobOutput,
    JobTable,
    JobView,
    QueueInfo,
)
from .errors import DeadlineExceeded, InternalError, QueueFull, ShuttingDown

log = logging.getLogger("fewstep.server")


class Runner(Protocol):
    """What the local backend needs of an engine (`fewstep.engine.Engine`; tests give fakes):
    its limits and model facts, `plan` (check and describe a request, thread-safe, no model
    run) and `run` (the planned calls of one batch)."""

    settings: Any
    device: str
    family: Any
    native_size: int
    inpaint_only: bool

    def plan(self, request) -> Any: ...

    def run(self, jobs: list) -> list: ...


@dataclass(eq=False)
class LocalJob(Job):
    """A job of the local queue: its planned call until it is final."""

    call: Any = None  # a fewstep.calls.PipelineCall
    _timer: Any = None  # (loop, TimerHandle) of the start deadline

    def let_go(self) -> None:
        self.call = None
        timer, self._timer = self._timer, None
        if timer is not None:
            try:
                timer[0].call_soon_threadsafe(timer[1].cancel)
            except RuntimeError:
                pass


class LocalBackend:
    """A bounded FIFO of jobs and the one worker thread that runs them on `engine`.

    `encode(result) -> JobOutput` turns an engine Result into what clients fetch; it runs in
    the worker. `retention` and `retention_bytes` bound the finished jobs kept for lookups."""

    def __init__(self, engine: Runner, encode: Callable[[Any], JobOutput], *,
                 max_size: int = 16, metrics=None, retention: int = 256,
                 retention_bytes: int = 256 * 1024 * 1024, max_batch: int = 1,
                 batch_wait_s: float = 0.0):
        if max_size < 1:
            raise ValueError("queue size must be at least 1")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self.batch_wait_s = max(0.0, batch_wait_s)
        self.engine = engine
        self.settings = engine.settings
        self.encode = encode
        self.max_size = max_size
        self.metrics = metrics
        self._table = JobTable(retention, retention_bytes)
        self._queue: collections.deque[LocalJob] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[LocalJob] = []
        self._closing = False
        self._draining = False
        self._thread: threading.Thread | None = None

    # -- the Backend interface ----------------------------------------------------------------

    async def submit(self, workflow: str, request, *, timeout_s: float | None = None) -> JobView:
        # checked and described once, off the loop, before admission
        call = await asyncio.to_thread(self.engine.plan, request)
        deadline = time.monotonic() + timeout_s if timeout_s else None
        job = LocalJob(workflow, deadline=deadline, call=call)
        self._admit(job)
        if timeout_s:
            loop = asyncio.get_running_loop()
            with job._lock:
                if job.state not in FINAL:
                    job._timer = (loop, loop.call_later(timeout_s, self._expire, job))
        return job.view()

    async def wait(self, job_id: str) -> JobView:
        return await self._job(job_id).wait()

    async def events(self, job_id: str):
        async for event in self._job(job_id).events():
            yield event

    async def cancel(self, job_id: str) -> JobView:
        job = self._job(job_id)
        self.cancel_job(job)
        return job.view()

    async def get(self, job_id: str) -> JobView:
        return self._job(job_id).view()

    async def jobs(self) -> list[JobView]:
        return [job.view() for job in self.job_list()]

    async def health(self) -> Health:
        alive = self.alive
        detail = "ok" if alive else "worker stopped"
        if alive and self._draining:
            detail = "draining"
        return Health(alive=alive, ready=alive and not self._draining, detail=detail)

    async def queue_info(self) -> QueueInfo:
        # a batch's finished members leave at once, not when the whole batch is done
        running = [job for job in list(self._running) if job.state not in FINAL]
        return QueueInfo(limit=self.max_size, depth=self.depth,
                         running=tuple(job.view() for job in running),
                         retry_after_s=self.retry_after())

    def describe(self) -> dict[str, Any]:
        engine = self.engine
        tasks = ["inpaint"] if engine.inpaint_only else list(engine.family.pipelines)
        return {"family": engine.family.name, "native_size": engine.native_size,
                "inpaint_only": engine.inpaint_only, "workflows": tasks}

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

    def drain(self) -> None:
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._running:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closing = True
            self._draining = True
            pending = list(self._queue)
            self._queue.clear()
            running = list(self._running)
            self._cond.notify_all()
        for job in pending:
            self._fail(job, FAILED, ShuttingDown("the server shut down before the job started"))
        for job in running:
            job.cancel.set()  # it ends as ShuttingDown, not as a client's cancel
        self._update_gauges()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- local state (also for tests and the A1111 progress route) ------------------------------

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> LocalJob | None:
        """The first running job (of the running batch), if any."""
        running = self._running
        return running[0] if running else None

    def retry_after(self) -> int:
        """Seconds a client should wait before retrying: the queue's expected wait."""
        return self._table.retry_after(waiting=len(self._queue))

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._running

    def job(self, job_id: str) -> LocalJob:
        """The backend's own (live) job, for in-process callers."""
        return self._job(job_id)

    def job_list(self) -> list[LocalJob]:
        with self._cond:
            return list(self._table.jobs.values())

    @property
    def kept_bytes(self) -> int:
        return self._table.kept_bytes

    def cancel_job(self, job: LocalJob) -> None:
        job.cancel.set()
        with self._cond:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
                self._cond.notify_all()
        if queued:
            self._fail(job, CANCELLED, Cancelled("cancelled while queued; it never ran"))
            self._update_gauges()

    # -- admission and lookup ---------------------------------------------------------------

    def _admit(self, job: LocalJob) -> None:
        with self._cond:
            if self._draining:
                raise ShuttingDown()
            if len(self._queue) >= self.max_size:
                raise QueueFull(f"the queue is full ({self.max_size} waiting); retry later",
                                retry_after=self.retry_after())
            self._queue.append(job)
            self._table.add(job)
            self._cond.notify_all()
        self._update_gauges()

    def _job(self, job_id: str) -> LocalJob:
        with self._cond:
            return self._table.find(job_id)

    def _expire(self, job: LocalJob) -> None:
        """The job's start deadline has passed: it expires unless it has started."""
        with self._cond:
            if job not in self._queue:
                return
            self._queue.remove(job)
            self._cond.notify_all()
        self._fail(job, EXPIRED, _expired())
        self._update_gauges()

    # -- the worker -----------------------------------------------------------------------

    def _next(self) -> list[LocalJob] | None:
        """The next batch: the head of the queue and the queued jobs that merge with it."""
        while True:
            with self._cond:
                while not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait(0.5)
                job = self._queue.popleft()
                late = job.late()
                if not late:
                    batch = [job] + self._companions(job)
                    for member in batch:
                        member.state, member.started = RUNNING, time.time()
                    self._running = batch
            self._update_gauges()
            if not late:
                return batch
            self._fail(job, EXPIRED, _expired())

    def _companions(self, head: LocalJob) -> list[LocalJob]:
        """Queued jobs that can run in one pipeline call with `head`, oldest first, taken off the
        queue; waits up to `batch_wait_s` for them to arrive. Called with the lock held."""
        key = head.call.merge_key()
        if key is None or self.max_batch <= 1:
            return []
        end = time.monotonic() + self.batch_wait_s
        taken: list[LocalJob] = []
        while True:
            now = time.monotonic()
            for job in list(self._queue):
                if len(taken) + 1 >= self.max_batch:
                    break
                if not job.late(now) and job.call.merge_key() == key:
                    self._queue.remove(job)
                    taken.append(job)
            left = end - time.monotonic()
            if len(taken) + 1 >= self.max_batch or left <= 0 or self._closing:
                return taken
            self._cond.wait(left)

    def _work(self) -> None:
        while True:
            batch = self._next()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException:  # noqa: BLE001 - the worker must survive anything
                log.exception("worker: unexpected failure around jobs %s",
                              ", ".join(job.id for job in batch))
                for job in batch:
                    self._fail(job, FAILED, InternalError())
            finally:
                with self._cond:
                    self._running = []
                    self._cond.notify_all()
                self._update_gauges()

    def _run(self, batch: list[LocalJob]) -> None:
        from ..engine import Job as Call

        calls = []
        for job in batch:
            calls.append(Call(job.call, progress=job.progress, cancel=job.cancel,
                              preview=_previewer(job)))
            job.emit({"event": "started", **job.view().summary()})
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
        start = time.perf_counter()
        try:
            results = self.engine.run(calls)
        except Exception as exc:  # noqa: BLE001 - typed errors pass; the unexpected is logged
            state, error = self._failure(exc, batch)
            for job in batch:
                self._fail(job, state, error)
            return
        seconds = time.perf_counter() - start
        for job, call, result in zip(batch, calls, results):
            if call.cancelled:  # cancelled while the rest of its batch ran on
                self._fail(job, CANCELLED, Cancelled(
                    f"cancelled after step {job.step} of {job.total}"))
            else:
                self._done(job, result, seconds)

    def _failure(self, exc: Exception, jobs: list[LocalJob]) -> tuple[str, FewstepError]:
        """The final state and error for jobs whose run raised `exc` (the engine reports
        running out of memory, on any device, as the typed `OutOfMemory`)."""
        if isinstance(exc, Cancelled):
            if self._closing:  # cut at the end of the shutdown grace: the server's doing
                job = jobs[0]
                return FAILED, ShuttingDown(
                    f"the server shut down while the job ran (after step {job.step} of "
                    f"{job.total})")
            return CANCELLED, exc
        if isinstance(exc, FewstepError):
            return FAILED, exc
        log.exception("job %s (%s) failed", jobs[0].id, jobs[0].workflow, exc_info=exc)
        return FAILED, InternalError()

    def _done(self, job: LocalJob, result, seconds: float) -> None:
        self._table.ran(seconds)
        if self.metrics is not None:
            self.metrics.generation_seconds.labels(job.workflow).observe(seconds)
        try:
            output = self.encode(result)
        except Exception:  # noqa: BLE001
            log.exception("job %s: encoding the result failed", job.id)
            self._fail(job, FAILED, InternalError())
            return
        finally:
            del result  # the float32 images: only the encoded files are kept
        with self._cond:
            if job.finish(DONE, output=output):
                self._table.finished(job)

    # -- metrics ---------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))
            self.metrics.running.set(len(self._running))

    def _fail(self, job: LocalJob, state: str, error: FewstepError) -> None:
        with self._cond:
            finished = job.finish(state, error=error)
            if finished:
                self._table.finished(job)
        if finished:
            error.counted = True  # the HTTP layer does not count it again
            if self.metrics is not None:
                self.metrics.errors.labels(error.kind).inc()


def _expired() -> DeadlineExceeded:
    return DeadlineExceeded("the request's deadline passed while it was queued; it was not run")


def _previewer(job: Job):
    """The preview callback that turns a step's preview image into an event (encoded only
    while somebody follows the job's events)."""

    def preview(step: int, image) -> None:
        if not job.watched():
            return
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        job.emit({"event": "preview", "id": job.id, "step": step,
                  "image": base64.b64encode(buffer.getvalue()).decode("ascii"),
                  "media_type": "image/png"})

    return preview
