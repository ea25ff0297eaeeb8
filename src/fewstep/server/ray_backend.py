"""The backend of the Ray Serve ingress: jobs run on engine replicas elsewhere, the ingress keeps
them. It implements the same `Backend` interface as the local queue and worker, so the routes
and the app are the ones the single-process service uses.

Each job is one streaming call to some replica (`dispatch`), followed by a task of its own: the
replica admits the job into its own local backend (validation, its queue), then streams the
job's events and, last, its final view (state, error, encoded files). The ingress keeps that
view, as the local backend does, for `wait`, `get` and the job routes.

What Ray does is kept behind two small callables, so this module imports nothing of Ray:
`dispatch(workflow, request, timeout_s)` returns the replica's message stream (raising
`Overloaded` when every replica is full, `ReplicaLost` when the replica died), and
`replicas()` says how many replicas are ready and whether the deployment still lives.

A job that has not started when its replica dies is sent again (its start deadline still
counts); one that was running fails with a typed 503. Cancelling a job (a client's cancel, a
disconnect) cancels its call, which cancels the job on the replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from ..errors import Cancelled, FewstepError
from .backend import (
    CANCELLED,
    DONE,
    EXPIRED,
    FAILED,
    FINAL,
    QUEUED,
    RUNNING,
    Health,
    Job,
    JobOutput,
    JobTable,
    JobView,
    QueueInfo,
)
from .errors import (DeadlineExceeded, InternalError, JobNotFound, QueueFull,
                     ReplicaUnavailable, ShuttingDown)

log = logging.getLogger("fewstep.server")

RESENDS = 2  # times a job that never started is sent again after its replica died


class ReplicaLost(Exception):
    """Raised by a dispatch stream: the replica holding the call died or went away."""


class Overloaded(Exception):
    """Raised by a dispatch stream before admission: every replica and the overflow are full."""


@dataclass(frozen=True)
class ReplicaState:
    ready: int  # replicas that take work now
    target: int  # replicas the deployment is meant to have
    alive: bool = True  # False once the deployment has failed for good
    capacity: int = 1  # jobs one replica holds (running and queued)


Dispatch = Callable[[str, Any, "float | None"], AsyncIterator[dict]]


@dataclass(eq=False)
class RemoteJob(Job):
    """A job as the ingress keeps it: its request until it starts (it may be sent again), the
    replica running it and the task following its call."""

    request: Any = None
    replica: str | None = None
    task: asyncio.Task | None = None

    def let_go(self) -> None:
        self.request = None


def _retrieved(future: asyncio.Future) -> None:
    """Marks a refusal nobody awaits any more as seen (no 'never retrieved' warning)."""
    if not future.cancelled():
        future.exception()


class RayBackend:
    """Jobs sent to engine replicas through `dispatch`; see the module docstring.

    `overflow` is how many jobs may wait at the ingress for a replica slot (Ray's
    `max_queued_requests`); `describe` is the model's description, asked of a replica once."""

    def __init__(self, dispatch: Dispatch, replicas: Callable[[], Awaitable[ReplicaState]],
                 settings, *, describe: Callable[[], Awaitable[dict]], overflow: int = 16,
                 retention: int = 256, retention_bytes: int = 256 * 1024 * 1024,
                 state_ttl_s: float = 1.0):
        self.dispatch = dispatch
        self._replicas = replicas
        self._describe_call = describe
        self.settings = settings
        self.overflow = overflow
        self.state_ttl_s = state_ttl_s
        self._table = JobTable(retention, retention_bytes)
        self._description: dict | None = None
        self._state: ReplicaState | None = None
        self._state_at = 0.0
        self._state_lock: asyncio.Lock | None = None
        self._draining = False
        self._stopped = False
        self._active = 0  # jobs not final
        self._idle = threading.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- set-up -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Waits for one replica to describe the model (the app's /v1/models needs it)."""
        self._loop = asyncio.get_running_loop()
        self._description = dict(await self._describe_call())

    # -- the Backend interface ----------------------------------------------------------------

    async def submit(self, workflow: str, request, *, timeout_s: float | None = None) -> JobView:
        self._loop = asyncio.get_running_loop()
        if self._draining:
            raise ShuttingDown()
        state = await self.replica_state()
        if state.ready < 1:
            raise ReplicaUnavailable("no replica is ready to take work; retry later")
        limit = self.capacity(state)
        if self._active >= limit:
            raise QueueFull(f"every replica is full ({self._active} jobs for {state.ready} "
                            f"replica(s)); retry later", retry_after=self.retry_after(state))
        job = RemoteJob(workflow, request=request,
                        deadline=time.monotonic() + timeout_s if timeout_s else None)
        admitted: asyncio.Future = self._loop.create_future()
        admitted.add_done_callback(_retrieved)
        self._table.jobs[job.id] = job
        self._set_active(+1)
        job.task = asyncio.ensure_future(self._follow(job, admitted))
        try:
            await asyncio.shield(admitted)
        except asyncio.CancelledError:  # the caller went away while the job was admitted
            self._cancel(job, Cancelled("cancelled while queued; it never ran"), CANCELLED)
            raise
        except FewstepError:
            self._table.discard(job)  # refused: never a job anyone can look up
            raise
        self._table.forget_old()
        return job.view()

    async def wait(self, job_id: str) -> JobView:
        return await self._job(job_id).wait()

    async def events(self, job_id: str):
        async for event in self._job(job_id).events():
            yield event

    async def cancel(self, job_id: str) -> JobView:
        job = self._job(job_id)
        self._cancel(job, Cancelled("cancelled" if job.state == RUNNING else
                                    "cancelled while queued; it never ran"), CANCELLED)
        return job.view()

    def cancel_soon(self, job_id: str) -> None:
        """Cancels a job from code that cannot await (a cancelled request's clean-up)."""
        with contextlib.suppress(JobNotFound):
            job = self._job(job_id)
            self._cancel(job, Cancelled("cancelled: the client went away"), CANCELLED)

    async def get(self, job_id: str) -> JobView:
        return self._job(job_id).view()

    async def jobs(self) -> list[JobView]:
        return [job.view() for job in self._table.jobs.values()]

    async def health(self) -> Health:
        state = await self.replica_state()
        if self._stopped:
            return Health(alive=False, ready=False, detail="stopped")
        if not state.alive:
            return Health(alive=False, ready=False, detail="the engine replicas failed")
        ready = state.ready > 0 and not self._draining
        detail = "draining" if self._draining else "ok" if state.ready else "no replica ready"
        return Health(alive=True, ready=ready, detail=detail)

    async def queue_info(self) -> QueueInfo:
        state = await self.replica_state()
        running = tuple(j.view() for j in self._table.jobs.values() if j.state == RUNNING)
        depth = sum(1 for j in self._table.jobs.values() if j.state == QUEUED)
        # waiting places: each ready replica's queue (its capacity less the running job) and
        # the overflow here
        limit = self.capacity(state) - state.ready
        return QueueInfo(limit=limit, depth=depth, running=running,
                         retry_after_s=self.retry_after(state))

    def describe(self) -> dict[str, Any]:
        if self._description is None:
            raise ReplicaUnavailable("no replica has described the model yet; retry later")
        return dict(self._description)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._stopped = False

    def drain(self) -> None:
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    def wait_idle(self, timeout: float) -> bool:
        """Blocks (not on the event loop) until no job is left, or `timeout` passes."""
        return self._idle.wait(timeout)

    async def wait_idle_async(self, timeout: float) -> bool:
        return await asyncio.to_thread(self._idle.wait, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Every job not final fails with ShuttingDown (its call, and so its replica job, is
        cancelled). Safe from any thread."""
        self._draining = self._stopped = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running_here = asyncio.get_running_loop() is loop
        except RuntimeError:
            running_here = False
        if running_here:
            self._stop_jobs()
        else:
            done = threading.Event()

            def stop_jobs():
                self._stop_jobs()
                done.set()

            try:
                loop.call_soon_threadsafe(stop_jobs)
            except RuntimeError:  # the loop closed meanwhile
                return
            done.wait(timeout)

    def _stop_jobs(self) -> None:
        for job in list(self._table.jobs.values()):
            if job.state not in FINAL:
                self._cancel(job, ShuttingDown("the server shut down before the job finished"),
                             FAILED)

    # -- replicas ----------------------------------------------------------------------------

    async def replica_state(self) -> ReplicaState:
        """The deployment's state, asked at most once per `state_ttl_s`."""
        if self._state_lock is None:
            self._state_lock = asyncio.Lock()
        async with self._state_lock:
            if self._state is None or time.monotonic() - self._state_at > self.state_ttl_s:
                try:
                    self._state = await self._replicas()
                except Exception:  # noqa: BLE001 - unknown state: assume none is ready
                    log.exception("could not read the replicas' state")
                    self._state = ReplicaState(ready=0, target=0)
                self._state_at = time.monotonic()
            return self._state

    def capacity(self, state: ReplicaState) -> int:
        """Jobs the service holds at once: each ready replica's running job and queue, and
        the overflow waiting here for a replica slot. Counted here, exactly, rather than by
        Ray's per-caller queue counter, which also counts requests being routed at that moment
        and so refuses early under a burst."""
        return state.ready * state.capacity + self.overflow

    def replica_of(self, job_id: str) -> str | None:
        """The replica that ran (or runs) a job, for the X-Fewstep-Replica header."""
        job = self._table.jobs.get(job_id) if isinstance(job_id, str) else None
        return job.replica if job is not None else None

    def retry_after(self, state: ReplicaState | None = None) -> int:
        """Seconds to wait before retrying: a typical job's time, times the jobs ahead of the
        next free slot on each ready replica."""
        ready = state.ready if state is not None else 1
        waiting = sum(1 for j in self._table.jobs.values() if j.state == QUEUED)
        return self._table.retry_after(waiting, ready)

    # -- one job's call -----------------------------------------------------------------------

    async def _follow(self, job: RemoteJob, admitted: asyncio.Future) -> None:
        """Sends the job and follows its stream to the end; resends a job that had not started
        when its replica died. Always ends the job (a final state) and resolves `admitted`."""
        try:
            for attempt in range(RESENDS + 1):
                try:
                    await self._run_once(job, admitted)
                    return
                except ReplicaLost:
                    if job.state == RUNNING or job.started is not None:
                        self._finish(job, FAILED, error=ReplicaUnavailable(
                            f"the replica running the job stopped (after step {job.step} of "
                            f"{job.total}); retry"))
                        return
                    if attempt == RESENDS:
                        break
                    log.warning("job %s: its replica died before it started; sending it "
                                "again", job.id)
            self._refuse_or_fail(job, admitted, ReplicaUnavailable(
                "the replicas holding the job stopped before it started; retry"))
        except asyncio.CancelledError:
            # cancel() or stop() ended the job already; else the ingress itself is stopping
            self._refuse_or_fail(job, admitted, ShuttingDown(
                "the server shut down before the job finished"))
        except Overloaded:
            state = self._state
            self._refuse_or_fail(job, admitted, QueueFull(
                "every replica is full; retry later", retry_after=self.retry_after(state)))
        except FewstepError as exc:
            self._refuse_or_fail(job, admitted, exc)
        except Exception:  # noqa: BLE001 - nothing unexpected reaches a client's body
            log.exception("job %s: the call to its replica failed", job.id)
            self._refuse_or_fail(job, admitted, InternalError())

    async def _run_once(self, job: RemoteJob, admitted: asyncio.Future) -> None:
        timeout_s = None
        if job.deadline is not None:
            timeout_s = job.deadline - time.monotonic()
            if timeout_s <= 0:
                raise DeadlineExceeded(
                    "the request's deadline passed while it was queued; it was not run")
        stream = self.dispatch(job.workflow, job.request, timeout_s)
        try:
            first = await self._first_message(stream, job)
            if first["event"] == "refused":
                raise first["error"]
            job.replica = first.get("replica")
            if not admitted.done():
                admitted.set_result(None)
            async for message in stream:
                if self._apply(job, message):
                    return
            raise ReplicaLost()  # the stream ended without a final view
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _first_message(self, stream, job: RemoteJob) -> dict:
        """The replica's answer to the admission; bounded by the job's start deadline (a job
        still waiting for a replica slot then expires, as a queued one does)."""
        first = stream.__anext__()
        if job.deadline is None:
            return await first
        try:
            return await asyncio.wait_for(first, max(0.0, job.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                "the request's deadline passed while it was queued; it was not run") from None

    def _apply(self, job: RemoteJob, message: dict) -> bool:
        """One message from the replica; True once the job is final."""
        kind = message["event"]
        if job.state in FINAL:  # cancelled here meanwhile: the rest is not ours to show
            return True
        if kind == "started":
            job.request = None
            job.start()
        elif kind == "progress":
            job.progress(message["step"], message["total"])
        elif kind == "preview":
            job.emit({**message, "id": job.id})
        elif kind == "final":
            job.step = message.get("step", job.step)
            job.total = message.get("total", job.total)
            output = message.get("output")
            if output is not None and message["state"] == DONE:
                self._table.ran(output.seconds)
            self._finish(job, message["state"], output=output, error=message.get("error"))
            return True
        return False

    def _refuse_or_fail(self, job: RemoteJob, admitted: asyncio.Future,
                        error: FewstepError) -> None:
        """Before admission the error is the submit's answer; after it, the job's end."""
        if not admitted.done():
            admitted.set_exception(error)
            self._finish(job, EXPIRED if isinstance(error, DeadlineExceeded) else FAILED,
                         error=error)
            self._table.discard(job)
            return
        state = EXPIRED if isinstance(error, DeadlineExceeded) else FAILED
        self._finish(job, state, error=error)

    def _cancel(self, job: RemoteJob, error: FewstepError, state: str) -> None:
        if job.state in FINAL:
            return
        job.cancel.set()
        self._finish(job, state, error=error)
        if job.task is not None:
            job.task.cancel()  # cancels the call: the replica stops the job at its next step

    def _finish(self, job: RemoteJob, state: str, *, output: JobOutput | None = None,
                error: FewstepError | None = None) -> None:
        if job.finish(state, output=output, error=error):
            self._table.finished(job)
            self._set_active(-1)

    def _set_active(self, change: int) -> None:
        self._active += change
        if self._active == 0:
            self._idle.set()
        else:
            self._idle.clear()

    # -- lookup and retention -------------------------------------------------------------------

    def _job(self, job_id: str) -> RemoteJob:
        return self._table.find(job_id)
