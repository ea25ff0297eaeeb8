"""Cross-request batching in the local backend: compatible queued jobs run as one pipeline call,
the head of the queue always runs next, a member's cancel does not stop the others; end to end,
8 concurrent same-shape requests form batches and each image equals its request's solo run."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np

from helpers.server import WAIT, Gate, decode, live_server, make_app, tiny_env
from helpers.fakes import FakeEngine, FakeRequest, FakeResult, encode, run

from fewstep.server.local import LocalBackend


class BatchingEngine(FakeEngine):
    """Plans a request to a call whose merge key is its `size` (a stand-in for the shape);
    `run` records each batch; a batch with the prompt "hold" waits for `release` (and "hold2"
    for `release2`) before its steps."""

    def __init__(self):
        super().__init__()
        self.batches: list[list[str]] = []
        self.held2, self.release2 = threading.Event(), threading.Event()

    def plan(self, request):
        super().plan(request)
        return SimpleNamespace(request=request, merge_key=lambda: (request.size,))

    def run(self, calls):
        prompts = [c.call.request.prompt for c in calls]
        self.batches.append(prompts)
        if "hold" in prompts:
            self.held.set()
            assert self.release.wait(WAIT)
        if "hold2" in prompts:
            self.held2.set()
            assert self.release2.wait(WAIT)
        results = []
        for c in calls:
            request = c.call.request
            for step in range(1, request.steps + 1):
                if c.progress is not None:
                    c.progress(step, request.steps)
                if c.cancel.is_set():
                    c.cancelled = True
            results.append(self._result(request))
        return results

    @staticmethod
    def _result(request):
        return FakeResult(request.prompt, request.size, request.payload)


def _backend(engine, **kw):
    local = LocalBackend(engine, encode, max_size=8, **kw)
    local.start()
    return local


def test_compatible_jobs_run_together_and_the_head_runs_first():
    engine = BatchingEngine()
    local = _backend(engine, max_batch=3)

    async def scenario():
        hold = await local.submit("txt2img", FakeRequest(prompt="hold", size=1))
        await asyncio.to_thread(engine.held.wait, WAIT)
        # queued behind the held job: two shapes, interleaved
        views = [await local.submit("txt2img", FakeRequest(prompt=p, size=s))
                 for p, s in (("a", 64), ("b", 32), ("c", 64), ("d", 64), ("e", 64))]
        engine.release.set()
        done = [await local.wait(v.id) for v in [hold, *views]]
        assert all(d.state == "done" for d in done)
        # the head ("a") takes compatible later jobs up to max_batch; "b" waits, then runs
        # before "e", which arrived after it
        assert engine.batches == [["hold"], ["a", "c", "d"], ["b"], ["e"]]

    run(scenario)
    local.stop()


def test_without_batching_jobs_run_one_by_one():
    engine = BatchingEngine()
    local = _backend(engine, max_batch=1)

    async def scenario():
        views = [await local.submit("txt2img", FakeRequest(prompt=p, size=64)) for p in "xyz"]
        for view in views:
            await local.wait(view.id)
        assert engine.batches == [["x"], ["y"], ["z"]]  # mergeable, but one at a time

    run(scenario)
    local.stop()


def test_a_cancelled_member_ends_cancelled_and_the_others_finish():
    engine = BatchingEngine()
    local = _backend(engine, max_batch=4)

    async def scenario():
        hold = await local.submit("txt2img", FakeRequest(prompt="hold", size=1))
        await asyncio.to_thread(engine.held.wait, WAIT)
        first = await local.submit("txt2img", FakeRequest(prompt="hold2", size=64))
        second = await local.submit("txt2img", FakeRequest(prompt="keep", size=64))
        engine.release.set()
        await asyncio.to_thread(engine.held2.wait, WAIT)
        assert engine.batches[-1] == ["hold2", "keep"]
        await local.cancel(first.id)
        engine.release2.set()
        done = [await local.wait(v.id) for v in (hold, first, second)]
        assert [d.state for d in done] == ["done", "cancelled", "done"]
        assert "cancelled" in done[1].error.message

    run(scenario)
    local.stop()


def test_eight_concurrent_requests_are_batched_and_equal_their_solo_runs():
    app = make_app(queue_size=16, max_batch=8)
    service = app.state.service
    _, engine = tiny_env()
    bodies = [{"prompt": f"a lighthouse, variant {i}", "seed": 100 + i, "width": 64,
               "height": 64, "steps": 2} for i in range(8)]
    with live_server(app) as url:
        solo = [decode(httpx.post(url + "/v1/txt2img", json=b, timeout=WAIT).json()
                       ["images"][0]["b64"]) for b in bodies]
        with Gate(engine) as gate, ThreadPoolExecutor(9) as pool:
            # one job holds the worker, so the 8 queue up and can be taken together
            blocker = pool.submit(httpx.post, url + "/v1/txt2img", timeout=WAIT,
                                  json={"prompt": "blocker", "seed": 1, "width": 32,
                                        "height": 32, "steps": 1})
            gate.wait_entered()
            futures = [pool.submit(httpx.post, url + "/v1/txt2img", json=b, timeout=WAIT)
                       for b in bodies]
            while service.backend.depth < len(bodies):
                threading.Event().wait(0.01)
            gate.release()
            responses = [f.result() for f in futures]
            assert blocker.result().status_code == 200
        metrics = httpx.get(url + "/metrics", timeout=WAIT).text
    for response, alone in zip(responses, solo):
        assert response.status_code == 200, response.text
        image = decode(response.json()["images"][0]["b64"])
        # the float images agree within 1e-3 (engine test); as PNGs, within one level
        assert np.abs(image.astype(int) - alone.astype(int)).max() <= 1
    batches = _histogram(metrics, "fewstep_batch_size")
    assert batches["count"] >= 2 and batches["sum"] > batches["count"]  # a batch above 1
    assert _histogram(metrics, "fewstep_batch_size", le="1.0") < batches["count"]


def _histogram(text: str, name: str, le: str | None = None):
    values = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_count"):
            values["count"] = float(line.split()[-1])
        elif line.startswith(f"{name}_sum"):
            values["sum"] = float(line.split()[-1])
        elif le is not None and line.startswith(f'{name}_bucket{{le="{le}"}}'):
            return float(line.split()[-1])
    return values
