"""The local backend: a bounded FIFO of jobs and one worker thread that runs them on one Engine.

The engine runs one request at a time and applies each request's LoRA stack itself, so adapters
change only here, in the worker, between jobs. Requests are validated (`engine.validate`, no
model call) before they are admitted, so a full queue never hides a request that cannot succeed.
A job carries its own cancel Event (set by a client's cancel or disconnect: the engine stops at
the next step) and a start deadline (passed while queued -> 504, and it never runs). Waiting is
done from asyncio through Futures that the worker completes with `call_soon_threadsafe`.

With `max_batch` above 1, each request is planned at admission (`engine.plan`: a pipeline call
description) and the worker runs the first queued job together with the queued jobs whose calls
can merge with it (same task, size, steps, guidance, LoRA stack, components; `merge_key()`), up
to `max_batch`, as one batched pipeline call in which each keeps its own prompt, seed, progress
and cancel flag. The head of the queue always runs next, so no job waits behind later ones for
long; compatible later jobs may join its batch.

A finished job keeps only what a client can still fetch (its `JobOutput`: encoded files and the
record): the request's images and the raw result are dropped as soon as the outputs are encoded,
and finished jobs are forgotten oldest first beyond a count and a byte budget."""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import logging
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import Cancelled, FewstepError, OutOfMemory
from .backend import (
    CANCELLED,
    DONE,
    EXPIRED,
    FAILED,
    FINAL,
    QUEUED,
    RUNNING,
    Health,
    JobOutput,
    JobView,
    QueueInfo,
    find_job,
    forget_finished,
)
from .errors import DeadlineExceeded, InternalError, QueueFull, ShuttingDown

log = logging.getLogger("fewstep.server")



@dataclass(eq=False)
class Job:
    """A job as the local backend keeps it (mutable, shared with the worker thread)."""

    workflow: str
    request: Any  # a fewstep.tasks Request; dropped once the job is final
    call: Any = None  # its planned PipelineCall (batching backends); dropped with the request
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
    cancel: threading.Event = field(default_factory=threading.Event)
    _watchers: list = field(default_factory=list)  # (loop, asyncio.Queue) for events
    _futures: list = field(default_factory=list)  # (loop, asyncio.Future) for completion
    _timer: Any = None  # (loop, TimerHandle) of the start deadline
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def view(self) -> JobView:
        return JobView(id=self.id, workflow=self.workflow, state=self.state, step=self.step,
                       total=self.total, created=self.created, started=self.started,
                       finished=self.finished, cancelling=self.cancel.is_set(),
                       error=self.error, output=self.output)

    # -- notification (called from any thread) ----------------------------------------

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

    def finish(self, state: str, *, output: JobOutput | None = None,
               error: FewstepError | None = None) -> bool:
        """Move to a final state once; what the job no longer needs is let go."""
        if error is not None:  # a traceback would keep every frame's tensors and images alive
            error.__traceback__ = error.__context__ = error.__cause__ = None
        with self._lock:
            if self.state in FINAL:
                return False
            self.state, self.output, self.error = state, output, error
            self.finished = time.time()
            self.request = self.call = None
            futures, self._futures = self._futures, []
            timer, self._timer = self._timer, None
        for loop, future in futures:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:
                pass
        if timer is not None:
            try:
                timer[0].call_soon_threadsafe(timer[1].cancel)
            except RuntimeError:
                pass
        self.emit({"event": state, **self.view().summary()})
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
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._watchers.append((asyncio.get_running_loop(), queue))
        return queue

    def unwatch(self, queue: asyncio.Queue) -> None:
        with self._lock:
            self._watchers = [(lo, q) for lo, q in self._watchers if q is not queue]


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # not loaded: it cannot be torch's error
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


class LocalBackend:
    """A bounded FIFO of jobs and the one worker thread that runs them on `engine`.

    `encode(result) -> JobOutput` turns an engine Result into what clients fetch; it runs in
    the worker. `retention` and `retention_bytes` bound the finished jobs kept for lookups."""

    def __init__(self, engine, encode: Callable[[Any], JobOutput], *, max_size: int = 16,
                 metrics=None, retention: int = 256, retention_bytes: int = 256 * 1024 * 1024,
                 max_batch: int = 1, batch_wait_s: float = 0.0):
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
        self.retention = retention
        self.retention_bytes = retention_bytes
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._kept_bytes = 0
        self._cond = threading.Condition()
        self._running: list[Job] = []
        self._closing = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self._durations: collections.deque[float] = collections.deque(maxlen=20)

    # -- the Backend interface ----------------------------------------------------------------

    async def submit(self, workflow: str, request, *, timeout_s: float | None = None) -> JobView:
        # validated before admission, off the loop; planned too when jobs may be batched
        call = None
        if self.max_batch > 1:
            call = await asyncio.to_thread(self.engine.plan, request)
        else:
            await asyncio.to_thread(self.engine.validate, request)
        deadline = time.monotonic() + timeout_s if timeout_s else None
        job = Job(workflow, request, deadline=deadline, call=call)
        self._admit(job)
        if timeout_s:
            loop = asyncio.get_running_loop()
            with job._lock:
                if job.state not in FINAL:
                    job._timer = (loop, loop.call_later(timeout_s, self._expire, job))
        return job.view()

    async def wait(self, job_id: str) -> JobView:
        job = self._job(job_id)
        await job.future()
        return job.view()

    async def events(self, job_id: str):
        job = self._job(job_id)
        queue = job.watch()
        try:
            yield {"event": "state", **job.view().summary()}
            if job.state in FINAL:
                return
            while True:
                event = await queue.get()
                yield event
                if event["event"] in FINAL:
                    return
        finally:
            job.unwatch(queue)

    async def cancel(self, job_id: str) -> JobView:
        job = self._job(job_id)
        self.cancel_job(job)
        return job.view()

    async def get(self, job_id: str) -> JobView:
        return self._job(job_id).view()

    async def jobs(self) -> list[JobView]:
        with self._cond:
            jobs = list(self._jobs.values())
        return [job.view() for job in jobs]

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
        inpaint_only = bool(getattr(engine, "inpaint_only", False))
        tasks = ["inpaint"] if inpaint_only else list(engine.family.pipelines)
        return {"family": engine.family.name, "native_size": engine.native_size,
                "inpaint_only": inpaint_only, "workflows": tasks}

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
    def running(self) -> Job | None:
        """The first running job (of the running batch), if any."""
        running = self._running
        return running[0] if running else None

    def retry_after(self) -> int:
        """Seconds a client should wait before retrying: the queue's expected wait."""
        durations = sorted(self._durations)
        typical = durations[len(durations) // 2] if durations else 1.0
        return max(1, min(600, round(typical * (len(self._queue) + 1))))

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._running

    def job(self, job_id: str) -> Job:
        """The backend's own (live) job, for in-process callers."""
        return self._job(job_id)

    def job_list(self) -> list[Job]:
        with self._cond:
            return list(self._jobs.values())

    @property
    def kept_bytes(self) -> int:
        return self._kept_bytes

    def cancel_job(self, job: Job) -> None:
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

    def _admit(self, job: Job) -> None:
        with self._cond:
            if self._draining:
                raise ShuttingDown()
            if len(self._queue) >= self.max_size:
                raise QueueFull(f"the queue is full ({self.max_size} waiting); retry later",
                                retry_after=self.retry_after())
            self._queue.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self._cond.notify_all()
        self._update_gauges()

    def _job(self, job_id: str) -> Job:
        with self._cond:
            return find_job(self._jobs, job_id)

    def _forget_old(self) -> None:
        """Called with the lock held."""
        self._kept_bytes = forget_finished(self._jobs, self.retention, self.retention_bytes,
                                           self._kept_bytes)

    def _expire(self, job: Job) -> None:
        """The job's start deadline has passed: it expires unless it has started."""
        with self._cond:
            if job not in self._queue:
                return
            self._queue.remove(job)
            self._cond.notify_all()
        self._fail(job, EXPIRED, DeadlineExceeded(
            "the request's deadline passed while it was queued; it was not run"))
        self._update_gauges()

    # -- the worker -----------------------------------------------------------------------

    def _next(self) -> list[Job] | None:
        """The next batch: the head of the queue and the queued jobs that merge with it."""
        while True:
            with self._cond:
                while not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait(0.5)
                job = self._queue.popleft()
                late = job.deadline is not None and time.monotonic() > job.deadline
                if not late:
                    batch = [job] + self._companions(job)
                    for member in batch:
                        member.state, member.started = RUNNING, time.time()
                    self._running = batch
            self._update_gauges()
            if not late:
                return batch
            self._fail(job, EXPIRED, DeadlineExceeded(
                "the request's deadline passed while it was queued; it was not run"))

    def _companions(self, head: Job) -> list[Job]:
        """Queued jobs that can run in one pipeline call with `head`, oldest first, taken off the
        queue; waits up to `batch_wait_s` for them to arrive. Called with the lock held."""
        key = head.call.merge_key() if head.call is not None else None
        if key is None or self.max_batch <= 1:
            return []
        end = time.monotonic() + self.batch_wait_s
        taken: list[Job] = []
        while True:
            now = time.monotonic()
            for job in list(self._queue):
                if len(taken) + 1 >= self.max_batch:
                    break
                late = job.deadline is not None and now > job.deadline
                if not late and job.call is not None and job.call.merge_key() == key:
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
                if batch[0].call is None:
                    self._run(batch[0])
                else:
                    self._run_batch(batch)
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

    def _followers(self, job: Job):
        """The progress and preview callbacks that turn a job's steps into events."""

        def progress(step: int, total: int) -> None:
            job.step, job.total = step, total
            job.emit({"event": "progress", "id": job.id, "step": step, "total": total})

        def preview(step: int, image) -> None:
            if not job.watched():  # nobody follows the events: skip the encoding
                return
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            job.emit({"event": "preview", "id": job.id, "step": step,
                      "image": base64.b64encode(buffer.getvalue()).decode("ascii"),
                      "media_type": "image/png"})

        return progress, preview

    def _run(self, job: Job) -> None:
        progress, preview = self._followers(job)
        job.emit({"event": "started", **job.view().summary()})
        start = time.perf_counter()
        try:
            result = self.engine.generate(job.request, progress=progress, cancel=job.cancel,
                                          preview=preview)
        except Exception as exc:  # noqa: BLE001 - typed errors pass; the unexpected is logged
            self._fail(job, *self._failure(exc, [job]))
            return
        self._done(job, result, time.perf_counter() - start)

    def _run_batch(self, batch: list[Job]) -> None:
        from ..engine import Job as Call

        calls = []
        for job in batch:
            progress, preview = self._followers(job)
            calls.append(Call(job.call, progress=progress, cancel=job.cancel, preview=preview))
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

    def _failure(self, exc: Exception, jobs: list[Job]) -> tuple[str, FewstepError]:
        """The final state and error for jobs whose run raised `exc`."""
        if isinstance(exc, Cancelled):
            if self._closing:  # cut at the end of the shutdown grace: the server's doing
                job = jobs[0]
                return FAILED, ShuttingDown(
                    f"the server shut down while the job ran (after step {job.step} of "
                    f"{job.total})")
            return CANCELLED, exc
        if _is_out_of_memory(exc) or isinstance(exc, OutOfMemory):
            self._release_memory()
            return FAILED, OutOfMemory("out of memory on the device; try a smaller size or batch")
        if isinstance(exc, FewstepError):
            return FAILED, exc
        log.exception("job %s (%s) failed", jobs[0].id, jobs[0].workflow, exc_info=exc)
        self._release_memory()
        return FAILED, InternalError()

    def _done(self, job: Job, result, seconds: float) -> None:
        self._durations.append(seconds)
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
                if job.id in self._jobs:
                    self._kept_bytes += output.nbytes
                self._forget_old()

    def _release_memory(self) -> None:
        release = getattr(self.engine, "release_memory", None)
        if release is not None:
            release()

    # -- metrics ---------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))
            self.metrics.running.set(len(self._running))

    def _fail(self, job: Job, state: str, error: FewstepError) -> None:
        with self._cond:
            finished = job.finish(state, error=error)
            if finished:
                self._forget_old()
        if finished:
            error.counted = True  # the HTTP layer does not count it again
            if self.metrics is not None:
                self.metrics.errors.labels(error.kind).inc()
