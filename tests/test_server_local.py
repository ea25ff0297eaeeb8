"""The local backend (bounded queue + worker) on its own, over a fake engine: no model, no HTTP.
Order, admission (validation before the queue-full check), cancellation, start deadlines,
shutdown, what finished jobs keep and how much of it, and the worker surviving failures."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import weakref

import pytest
from helpers.fakes import (WAIT, FakeEngine, FakeRequest, assert_implements, encode,
                           run, until)

from fewstep.errors import Cancelled, InvalidRequest, OutOfMemory
from fewstep.server.backend import Backend
from fewstep.server.errors import (
    DeadlineExceeded,
    InternalError,
    JobNotFound,
    QueueFull,
    ShuttingDown,
    status_for,
)
from fewstep.server.local import LocalBackend



def backend(engine=None, **kw) -> LocalBackend:
    local = LocalBackend(engine or FakeEngine(), encode, **{"max_size": 4, **kw})
    local.start()
    return local


def test_the_local_backend_is_a_backend():
    assert_implements(backend(), Backend)


def test_a_method_that_differs_from_the_protocol_is_caught():
    """The check compares parameters and how a method is called, not only names."""

    class Sloppy(type(backend())):
        def get(self, job):  # plain, and another parameter name
            raise NotImplementedError

    local = Sloppy(FakeEngine(), encode)
    with pytest.raises(AssertionError, match="get"):
        assert_implements(local, Backend)


def test_jobs_run_in_order_and_keep_their_outputs():
    engine = FakeEngine()
    local = backend(engine)

    async def scenario():
        views = [await local.submit("txt2img", FakeRequest(prompt=f"p{i}")) for i in range(3)]
        done = [await local.wait(v.id) for v in views]
        assert engine.ran == ["p0", "p1", "p2"]
        assert [d.state for d in done] == ["done"] * 3
        assert done[0].output.record.request["prompt"] == "p0"
        assert done[0].step == done[0].total == 3 and done[0].error is None
        assert [v.id for v in await local.jobs()] == [v.id for v in views]

    run(scenario)
    local.stop()


def test_validation_comes_before_admission():
    """With the queue full, a request that can never run is refused as invalid (not told to
    retry); a valid one gets queue_full with a Retry-After."""
    engine = FakeEngine()
    local = backend(engine, max_size=1)

    async def scenario():
        running = await local.submit("txt2img", FakeRequest(prompt="hold"))
        await until(engine.held.is_set, "the first job to run")
        queued = await local.submit("txt2img", FakeRequest())
        with pytest.raises(InvalidRequest) as invalid:
            await local.submit("txt2img", FakeRequest(prompt="invalid"))
        assert invalid.value.field == "prompt" and status_for(invalid.value) == 422
        with pytest.raises(QueueFull) as full:
            await local.submit("txt2img", FakeRequest())
        assert status_for(full.value) == 429 and int(full.value.headers["Retry-After"]) >= 1
        engine.release.set()
        assert (await local.wait(running.id)).state == "done"
        assert (await local.wait(queued.id)).state == "done"
        assert "invalid" not in engine.ran

    run(scenario)
    local.stop()


def test_cancel_queued_and_running_jobs():
    engine = FakeEngine()
    local = backend(engine)

    async def scenario():
        running = await local.submit("txt2img", FakeRequest(prompt="hold", steps=5))
        await until(engine.held.is_set, "the job to run")
        queued = await local.submit("txt2img", FakeRequest(prompt="never"))
        view = await local.cancel(queued.id)
        assert view.state == "cancelled" and "never ran" in view.error.message
        assert (await local.cancel(running.id)).cancelling
        engine.release.set()
        final = await local.wait(running.id)
        assert final.state == "cancelled" and isinstance(final.error, Cancelled)
        # the message and the recorded step agree on how many steps ran
        assert final.step == 1 and final.error.message == "cancelled after step 1 of 5"
        assert "never" not in engine.ran and status_for(final.error) == 499

    run(scenario)
    local.stop()


def test_a_start_deadline_expires_a_queued_job_without_a_waiter():
    engine = FakeEngine()
    local = backend(engine)

    async def scenario():
        running = await local.submit("txt2img", FakeRequest(prompt="hold"))
        await until(engine.held.is_set, "the job to run")
        late = await local.submit("txt2img", FakeRequest(prompt="late"), timeout_s=0.05)
        await until(lambda: local.depth == 0, "the late job to expire")
        view = await local.get(late.id)
        assert view.state == "expired" and isinstance(view.error, DeadlineExceeded)
        assert status_for(view.error) == 504 and view.started is None
        engine.release.set()
        await local.wait(running.id)
        assert "late" not in engine.ran

    run(scenario)
    local.stop()


def test_shutdown_fails_queued_and_running_jobs_as_shutting_down():
    engine = FakeEngine()
    local = backend(engine)

    async def scenario():
        running = await local.submit("txt2img", FakeRequest(prompt="hold", steps=5))
        await until(engine.held.is_set, "the job to run")
        queued = await local.submit("txt2img", FakeRequest())
        local.drain()
        assert not (await local.health()).ready and (await local.health()).alive
        with pytest.raises(ShuttingDown):
            await local.submit("txt2img", FakeRequest())
        stopping = threading.Thread(target=local.stop, kwargs={"timeout": WAIT})
        stopping.start()
        await until(lambda: local.running.cancel.is_set(), "the stop to reach the job")
        engine.release.set()
        for job in (running, queued):
            view = await local.wait(job.id)
            assert view.state == "failed" and isinstance(view.error, ShuttingDown), view
            assert status_for(view.error) == 503
        stopping.join(WAIT)
        assert not (await local.health()).alive

    run(scenario)


def test_finished_jobs_let_go_of_requests_and_results(monkeypatch):
    # pytest's log capture keeps records, and with them the failed job's frames: not here
    monkeypatch.setattr(logging.getLogger("fewstep.server"), "propagate", False)
    engine = FakeEngine()
    local = backend(engine)
    payloads = []

    async def scenario():
        for prompt in ("ok", "boom", "oom", "ok"):
            request = FakeRequest(prompt=prompt)
            payloads.append(weakref.ref(request.payload))
            view = await local.submit("txt2img", request)
            del request
            await local.wait(view.id)

    run(scenario)
    gc.collect()
    assert [p() for p in payloads] == [None] * 4  # nothing keeps the inputs alive
    assert len(run(local.jobs)) == 4  # while the jobs are still there to look up
    local.stop()


def test_kept_outputs_are_bounded_in_bytes_oldest_first():
    local = backend(retention=100, retention_bytes=2500)

    async def scenario():
        views = []
        for i in range(5):
            view = await local.submit("txt2img", FakeRequest(prompt=f"p{i}", size=1000))
            views.append(await local.wait(view.id))
        kept = [v.id for v in await local.jobs()]
        assert kept == [v.id for v in views[-2:]]
        assert local.kept_bytes == 2000
        with pytest.raises(JobNotFound) as missing:
            await local.get(views[0].id)
        assert missing.value.field == "job_id"
        big = await local.submit("txt2img", FakeRequest(size=10_000))
        assert (await local.wait(big.id)).output.nbytes == 10_000
        assert [v.id for v in await local.jobs()] == [big.id]  # the newest stays, alone

    run(scenario)
    local.stop()


def test_the_worker_survives_unexpected_errors_and_running_out_of_memory():
    engine = FakeEngine()
    local = backend(engine)

    async def scenario():
        boom = await local.wait((await local.submit("txt2img", FakeRequest("boom"))).id)
        assert isinstance(boom.error, InternalError) and "secret" not in boom.error.message
        oom = await local.wait((await local.submit("txt2img", FakeRequest("oom"))).id)
        assert isinstance(oom.error, OutOfMemory) and status_for(oom.error) == 503
        after = await local.wait((await local.submit("txt2img", FakeRequest())).id)
        assert after.state == "done" and (await local.health()).alive

    run(scenario)
    local.stop()


def test_events_follow_a_job_to_its_end():
    engine = FakeEngine()
    local = backend(engine)

    async def scenario():
        view = await local.submit("txt2img", FakeRequest(prompt="hold", steps=2))
        events = []

        async def follow():
            async for event in local.events(view.id):
                events.append(event)

        follower = asyncio.ensure_future(follow())
        await until(lambda: events, "the first event")
        engine.release.set()
        await follower
        names = [e["event"] for e in events]
        assert names[0] == "state" and names[-1] == "done", names
        assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2]
        late = [e["event"] async for e in local.events(view.id)]
        assert late == ["state"]  # a finished job: its state, and the end

    run(scenario)
    local.stop()


def test_unknown_job_ids_are_not_found():
    local = backend()

    async def scenario():
        for job_id in ("nope", "x" * 1000, "../../etc"):
            with pytest.raises(JobNotFound):
                await local.get(job_id)
            with pytest.raises(JobNotFound):
                await local.cancel(job_id)

    run(scenario)
    local.stop()


def test_kept_files_are_bounded_in_count_bytes_and_age(monkeypatch):
    from fewstep.server import service

    store = service.FileStore(max_files=3, max_bytes=2500, ttl_s=60)
    tokens = [store.put(bytes([i]) * 1000, "image/png") for i in range(3)]
    assert store.get(tokens[0]) is None  # over 2500 bytes: the oldest went
    assert store.get(tokens[2]) == (bytes([2]) * 1000, "image/png")
    small = [store.put(b"s", "image/png") for _ in range(3)]
    assert [store.get(t) is not None for t in tokens[1:] + small] == [False] * 2 + [True] * 3
    now = service.time.monotonic()
    monkeypatch.setattr(service.time, "monotonic", lambda: now + 61)
    assert store.get(small[-1]) is None  # expired
