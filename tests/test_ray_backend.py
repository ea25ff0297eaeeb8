"""The Ray ingress's backend on its own, over fake replicas (no Ray, no model): admission up to
the replicas' capacity, typed refusals, events, cancellation reaching the replica's call, a
start deadline while waiting for a replica, a job resent when its replica dies before starting
and a typed 503 when it dies while running, drain and stop."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from helpers.fakes import assert_implements

from fewstep.config import Settings
from fewstep.errors import InvalidRequest
from fewstep.records import Record
from fewstep.server.backend import Backend, JobOutput
from fewstep.server.errors import (DeadlineExceeded, JobNotFound, QueueFull, ReplicaUnavailable,
                                   ShuttingDown, status_for)
from fewstep.server.ray_backend import Overloaded, RayBackend, ReplicaLost, ReplicaState

WAIT = 10.0


class FakeReplicas:
    """Replicas as the ingress sees them: each call is a stream of messages. A request's
    `prompt` steers it: "hold" stays running until `release()`, "invalid" is refused, "die"
    loses its replica after starting, "die-queued" loses it before starting (the first time
    only), "busy" meets Ray's back-pressure."""

    def __init__(self, ready: int = 2, capacity: int = 2):
        self.state = ReplicaState(ready=ready, target=ready, capacity=capacity)
        self.released = asyncio.Event()
        self.calls: list[str] = []
        self.closed: list[str] = []  # calls whose stream was closed before their end
        self.died_once = False

    async def describe(self):
        return {"family": "sd15", "native_size": 64, "inpaint_only": False}

    async def replicas(self):
        return self.state

    def release(self):
        self.released.set()

    async def dispatch(self, workflow, request, timeout_s):
        prompt = request.prompt
        self.calls.append(prompt)
        finished = False
        try:
            if prompt == "busy":
                raise Overloaded()
            if prompt == "invalid":
                yield {"event": "refused", "error": InvalidRequest("bad width", field="width")}
                return
            if prompt == "wait-for-slot":  # never admitted: Ray holds it for a slot
                await asyncio.Event().wait()
            yield {"event": "admitted", "replica": f"r{len(self.calls) % 2}"}
            if prompt == "die-queued" and not self.died_once:
                self.died_once = True
                raise ReplicaLost()
            yield {"event": "started"}
            for step in (1, 2):
                yield {"event": "progress", "step": step, "total": 2}
                if prompt == "hold":
                    await self.released.wait()
            if prompt == "die":
                raise ReplicaLost()
            output = JobOutput(files=((b"png", "image/png"),), seconds=0.5, record=Record(
                request={"task": "txt2img", "seed": 1}, model="fake", family="sd15"))
            finished = True
            yield {"event": "final", "state": "done", "step": 2, "total": 2, "error": None,
                   "output": output}
        finally:
            if not finished and prompt not in ("invalid", "busy", "die", "die-queued"):
                self.closed.append(prompt)


def request(prompt: str):
    return SimpleNamespace(prompt=prompt)


def make_backend(replicas: FakeReplicas, overflow: int = 1, **kwargs) -> RayBackend:
    return RayBackend(replicas.dispatch, replicas.replicas, Settings(),
                      describe=replicas.describe, overflow=overflow, state_ttl_s=0.0, **kwargs)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, WAIT))


def test_it_is_a_backend_and_runs_a_job_with_its_events():
    async def main():
        fake = FakeReplicas()
        backend = make_backend(fake)
        assert_implements(backend, Backend)
        await backend.connect()
        assert backend.describe()["family"] == "sd15"
        view = await backend.submit("txt2img", request("hold"))
        events = []
        async for event in backend.events(view.id):
            events.append(event["event"])
            if event["event"] == "state":  # the job is held after its first step
                assert event["state"] == "running" and event["step"] == 1
                fake.release()
        done = await backend.wait(view.id)
        assert events == ["state", "progress", "done"], events
        assert done.state == "done" and done.output.files == ((b"png", "image/png"),)
        assert backend.replica_of(view.id) in ("r0", "r1")
        assert (await backend.health()).ready
        assert backend.wait_idle(0.1)

    run(main())


def test_refusals_are_typed_and_leave_no_job():
    async def main():
        fake = FakeReplicas()
        backend = make_backend(fake)
        with pytest.raises(InvalidRequest) as info:
            await backend.submit("txt2img", request("invalid"))
        assert info.value.field == "width"
        with pytest.raises(QueueFull) as info:
            await backend.submit("txt2img", request("busy"))
        assert status_for(info.value) == 429 and int(info.value.headers["Retry-After"]) >= 1
        assert await backend.jobs() == []
        assert backend.wait_idle(0.1)
        fake.state = ReplicaState(ready=0, target=2, capacity=2)
        with pytest.raises(ReplicaUnavailable) as info:
            await backend.submit("txt2img", request("ok"))
        assert status_for(info.value) == 503 and info.value.headers["Retry-After"]
        assert not (await backend.health()).ready
        with pytest.raises(JobNotFound):
            await backend.get("nope")

    run(main())


def test_admission_stops_at_the_replicas_capacity_plus_the_overflow():
    async def main():
        fake = FakeReplicas(ready=2, capacity=2)
        backend = make_backend(fake, overflow=1)
        views = [await backend.submit("txt2img", request("hold")) for _ in range(4)]
        waiting = asyncio.ensure_future(backend.submit("txt2img", request("wait-for-slot")))
        await asyncio.sleep(0)
        info = await backend.queue_info()
        assert info.limit == 2 * 1 + 1 and len(info.running) == 4
        with pytest.raises(QueueFull):
            await backend.submit("txt2img", request("hold"))
        waiting.cancel()  # a client gone while waiting for a slot: its call is closed
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0)
        assert "wait-for-slot" in fake.closed
        fake.release()
        for view in views:
            assert (await backend.wait(view.id)).state == "done"

    run(main())


def test_cancel_closes_the_replica_call():
    async def main():
        fake = FakeReplicas()
        backend = make_backend(fake)
        view = await backend.submit("txt2img", request("hold"))
        cancelled = await backend.cancel(view.id)
        assert cancelled.state == "cancelled" and status_for(cancelled.error) == 499
        await asyncio.sleep(0)
        assert fake.closed == ["hold"]
        assert backend.wait_idle(0.1)
        backend.cancel_soon("unknown-id")  # nothing to do, no error

    run(main())


def test_start_deadline_while_waiting_for_a_replica_slot():
    async def main():
        fake = FakeReplicas()
        backend = make_backend(fake)
        with pytest.raises(DeadlineExceeded):
            await backend.submit("txt2img", request("wait-for-slot"), timeout_s=0.05)
        await asyncio.sleep(0)
        assert fake.closed == ["wait-for-slot"] and await backend.jobs() == []

    run(main())


def test_a_lost_replica_resends_a_queued_job_and_fails_a_running_one():
    async def main():
        fake = FakeReplicas()
        backend = make_backend(fake)
        resent = await backend.submit("txt2img", request("die-queued"))
        assert (await backend.wait(resent.id)).state == "done"
        assert fake.calls.count("die-queued") == 2
        lost = await backend.submit("txt2img", request("die"))
        view = await backend.wait(lost.id)
        assert view.state == "failed" and isinstance(view.error, ReplicaUnavailable)
        assert status_for(view.error) == 503 and "step 2 of 2" in view.error.message

    run(main())


def test_drain_then_stop():
    async def main():
        fake = FakeReplicas()
        backend = make_backend(fake)
        view = await backend.submit("txt2img", request("hold"))
        backend.drain()
        assert not (await backend.health()).ready
        with pytest.raises(ShuttingDown):
            await backend.submit("txt2img", request("ok"))
        assert not backend.wait_idle(0.05)
        backend.stop()
        stopped = await backend.wait(view.id)
        assert stopped.state == "failed" and isinstance(stopped.error, ShuttingDown)
        assert not (await backend.health()).alive
        assert backend.wait_idle(0.1)

    run(main())


def test_finished_jobs_are_forgotten_beyond_the_retention():
    async def main():
        fake = FakeReplicas()
        backend = make_backend(fake, retention=3)
        ids = []
        for _ in range(5):
            view = await backend.submit("txt2img", request("ok"))
            await backend.wait(view.id)
            ids.append(view.id)
        kept = [view.id for view in await backend.jobs()]
        assert kept == ids[-3:]
        with pytest.raises(JobNotFound):
            await backend.get(ids[0])

    run(main())
