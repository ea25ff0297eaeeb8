"""The job queue under load and faults, on a real uvicorn server on 127.0.0.1: interleaved
LoRA stacks give the same pixels as each request alone; queue full -> 429 at once; a start
deadline passed while queued -> 504 and never run; cancel and disconnect stop a job; an
out-of-memory error -> 503 and the next request succeeds."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from helpers.server import (
    WAIT,
    Gate,
    assert_typed_error,
    decode,
    live_server,
    make_app,
    tiny_env,
    unet_raises,
    wait_until,
)

SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def server():
    # one job per pipeline call: a batch's pixels agree with each job alone within a level
    # (test_server_batching), and the LoRA test below compares pixels exactly
    app = make_app(queue_size=2, max_batch=1)
    with live_server(app) as url:
        yield url, app.state.service


def post(url, body, path="/v1/txt2img", timeout=WAIT, **kw):
    return httpx.post(url + path, json=body, timeout=timeout, **kw)


def test_interleaved_lora_stacks_equal_each_alone(server):
    url, _ = server
    stacks = [
        [],
        [{"name": "style", "weight": 1.0}],
        [{"name": "style-peft", "weight": 0.7}, {"name": "style", "weight": -0.5}],
        [{"name": "style", "weight": 0.3}],
    ]
    bodies = [{"prompt": "a red house", "seed": 11, "loras": s, **SMALL} for s in stacks]
    alone = []
    for body in bodies:
        response = post(url, body)
        assert response.status_code == 200, response.text
        alone.append(decode(response.json()["images"][0]["b64"]))
    assert not np.array_equal(alone[0], alone[1])  # the LoRAs do change the picture
    assert not np.array_equal(alone[1], alone[3])
    order = [1, 0, 2, 3, 2, 1, 0, 3]  # concurrent, with the stacks switching every job

    def run(i):
        for _ in range(50):  # queue of 2: retry 429s, bounded
            response = post(url, bodies[i])
            if response.status_code != 429:
                return i, response
            time.sleep(0.05)
        raise AssertionError("never admitted")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, order))
    for i, response in results:
        assert response.status_code == 200, response.text
        assert np.array_equal(decode(response.json()["images"][0]["b64"]), alone[i]), i


def test_queue_full_is_429_at_once_with_retry_after(server):
    url, service = server
    _, engine = tiny_env()
    with Gate(engine) as gate, ThreadPoolExecutor(3) as pool:
        running = pool.submit(post, url, {"prompt": "hold", **SMALL})
        gate.wait_entered()
        queued = [pool.submit(post, url, {"prompt": f"q{i}", **SMALL}) for i in range(2)]
        wait_until(lambda: service.backend.depth == 2, "two queued jobs")
        start = time.monotonic()
        response = post(url, {"prompt": "one too many", **SMALL})
        elapsed = time.monotonic() - start
        assert_typed_error(response, 429, kind="queue_full")
        assert int(response.headers["Retry-After"]) >= 1
        assert elapsed < 5.0, elapsed  # answered while the worker is still held
        assert not running.done()
        gate.release()
        assert running.result(WAIT).status_code == 200
        assert all(f.result(WAIT).status_code == 200 for f in queued)
    metrics = httpx.get(url + "/metrics").text
    assert 'fewstep_errors_total{kind="queue_full"}' in metrics


def test_deadline_passed_while_queued_is_504_and_never_runs(server):
    url, service = server
    _, engine = tiny_env()
    seen = []
    with Gate(engine) as gate, ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, url, {"prompt": "hold", **SMALL})
        gate.wait_entered()
        response = post(url, {"prompt": "late", "timeout_s": 0.3, **SMALL})
        assert_typed_error(response, 504, kind="deadline_exceeded")
        seen.append(response.headers["X-Job-Id"])
        assert not running.done()  # the 504 came while the worker was still busy
        gate.release()
        assert running.result(WAIT).status_code == 200
    job = httpx.get(f"{url}/v1/jobs/{seen[0]}").json()
    assert job["state"] == "expired" and job["started"] is None and job["step"] == 0


def test_cancel_stops_a_running_job_and_the_next_one_runs(server):
    url, _ = server
    _, engine = tiny_env()
    with Gate(engine) as gate:
        accepted = post(url, {"prompt": "long", "steps": 8, "width": 64, "height": 64},
                        params={"wait": "false"})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        gate.wait_entered()
        assert httpx.delete(f"{url}/v1/jobs/{job_id}").status_code == 200
        gate.release()
    wait_until(lambda: httpx.get(f"{url}/v1/jobs/{job_id}").json()["state"] == "cancelled",
               "the job to be cancelled")
    job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
    assert job["error"]["type"] == "cancelled"
    # the first step was under way when the cancel came: it ran, and job and message say so
    assert job["step"] == 1 and job["total"] == 8
    assert job["error"]["message"] == "cancelled after step 1 of 8"
    assert post(url, {"prompt": "next", **SMALL}).status_code == 200


def jobs(url) -> dict:
    return {j["id"]: j for j in httpx.get(url + "/v1/jobs").json()}


def test_disconnect_cancels_queued_and_running_jobs(server):
    url, service = server
    _, engine = tiny_env()
    before = set(jobs(url))
    with Gate(engine) as gate:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its job runs
            post(url, {"prompt": "running", "steps": 8, "width": 64, "height": 64},
                 timeout=httpx.Timeout(WAIT, read=1.0))
        assert gate.entered.is_set()
        with pytest.raises(httpx.ReadTimeout):  # ... and while its job waits
            post(url, {"prompt": "queued", **SMALL}, timeout=httpx.Timeout(WAIT, read=0.5))
        new = [j for i, j in jobs(url).items() if i not in before]
        assert len(new) == 2
        running, queued = new
        wait_until(lambda: jobs(url)[queued["id"]]["state"] == "cancelled",
                   "the queued job to be cancelled")
        assert service.backend.running.cancel.is_set()
        gate.release()
    wait_until(lambda: jobs(url)[running["id"]]["state"] == "cancelled",
               "the running job to stop")
    assert jobs(url)[running["id"]]["step"] < 8 and jobs(url)[queued["id"]]["started"] is None
    assert post(url, {"prompt": "after", **SMALL}).status_code == 200


# What each device raises when an allocation fails: CUDA's typed error, and on a CPU a plain
# RuntimeError from torch's allocator (which once answered 500 internal_error).
FAILED_ALLOCATIONS = {
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory (injected)"),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                "can't allocate memory: you tried to allocate 1073741824 bytes "
                                "(injected)"),
    "python": lambda: MemoryError("injected"),
}


@pytest.mark.parametrize("device", sorted(FAILED_ALLOCATIONS))
def test_out_of_memory_is_503_and_the_worker_goes_on(server, device):
    url, _ = server
    _, engine = tiny_env()
    with unet_raises(engine, FAILED_ALLOCATIONS[device]):
        response = post(url, {"prompt": "big", **SMALL})
    error = assert_typed_error(response, 503, kind="out_of_memory")
    assert "injected" not in error["message"]
    after = post(url, {"prompt": "small", **SMALL})
    assert after.status_code == 200, after.text
    assert httpx.get(url + "/healthz").status_code == 200


def test_job_events_stream_progress(server):
    url, _ = server
    _, engine = tiny_env()
    with Gate(engine) as gate:
        accepted = post(url, {"prompt": "sse", "steps": 3, "width": 64, "height": 64},
                        params={"wait": "false"})
        job_id = accepted.json()["id"]
        events = []

        def read():
            with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=WAIT) as r:
                name = None
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        events.append((name, json.loads(line[6:])))
                        if name in ("done", "failed", "cancelled", "expired"):
                            return

        reader = threading.Thread(target=read)
        reader.start()
        wait_until(lambda: events, "the first event")
        gate.release()
        reader.join(WAIT)
        assert not reader.is_alive()
    names = [n for n, _ in events]
    assert names[0] == "state" and names[-1] == "done", names
    steps = [e["step"] for n, e in events if n == "progress"]
    assert steps == [1, 2, 3], names
    previews = [e for n, e in events if n == "preview"]
    assert [e["step"] for e in previews] == [1, 2, 3], names
    import base64
    import io

    from PIL import Image

    preview = Image.open(io.BytesIO(base64.b64decode(previews[-1]["image"])))
    assert preview.size == (32, 32)  # latent resolution of a 64x64 image
    result = httpx.get(f"{url}/v1/jobs/{job_id}").json()["result"]
    assert result["images"] and result["seed"] >= 0
