"""`fewstep serve --ray` as a user runs it: it starts its own Ray instance, serves the tiny model
through Ray's HTTP entry, and on SIGTERM drains (readiness false, new work refused with a typed
503, the running job finishes), shuts Serve and Ray down, exits 0 and leaves no Ray process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from helpers.ray_cluster import (
    RAY_ENV,
    WAIT,
    kill_leftovers,
    processes_of_session,
    ray_processes,
    session_of,
    wait_gone,
)
from helpers.server import assert_typed_error, free_port, tiny_env, wait_until

GRACE = 60.0


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def served(tmp_path):
    models, _ = tiny_env()
    port = free_port()
    command = [sys.executable, "-m", "fewstep.server", "--ray", "--replicas", "1",
               "--cpus-per-replica", "0.5", "--port", str(port), "--model", str(models.sd15),
               "--lcm-lora", str(models.lcm_sd15), "--model-name", "tiny-sd15",
               "--lora", f"style={models.style_sd15}", "--device", "cpu",
               "--grace", str(GRACE), "--log-level", "warning"]
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen(command, env={**os.environ, **RAY_ENV}, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    seen = []
    try:
        end = time.monotonic() + 2 * WAIT
        while not _ready(url):
            assert process.poll() is None, _tail(log)
            assert time.monotonic() < end, "not ready in time\n" + _tail(log)
            time.sleep(0.5)
        seen.extend(ray_processes(process.pid))
        yield process, url, seen, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT)
        kill_leftovers(wait_gone(seen, timeout=5))
        log.close()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]


def test_sigterm_drains_and_leaves_no_ray_process(served):
    process, url, seen, log = served
    assert any(p.name() == "raylet" for p in seen), seen
    session = session_of(seen)
    assert session, seen
    # a new connection per request: an idle kept-alive one may be closed by the server (its
    # keep-alive timeout) just as the next request goes out, a reset no client retries
    client = httpx.Client(base_url=url, timeout=WAIT,
                          limits=httpx.Limits(max_keepalive_connections=0))
    first = client.post("/v1/txt2img", json={"prompt": "x", "seed": 1, "width": 64,
                                             "height": 64, "steps": 2})
    assert first.status_code == 200 and first.headers["X-Fewstep-Replica"]

    accepted = client.post("/v1/txt2img?wait=false",
                           json={"prompt": "long", "seed": 2, "width": 64, "height": 64,
                                 "steps": 40, "loras": [{"name": "style"}]})
    assert accepted.status_code == 202
    job_id = accepted.headers["X-Job-Id"]
    events: list[str] = []
    progressed = threading.Event()

    def follow():
        with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=WAIT) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    events.append(line.removeprefix("event: "))
                    if events[-1] == "progress":
                        progressed.set()

    follower = threading.Thread(target=follow)
    follower.start()
    assert progressed.wait(WAIT), events
    process.send_signal(signal.SIGTERM)
    # draining: not ready, new work refused, the running job goes on
    wait_until(lambda: client.get("/readyz").status_code == 503, "readiness to go false", WAIT)
    refused = client.post("/v1/txt2img", json={"prompt": "late", "width": 64, "height": 64,
                                               "steps": 2})
    assert_typed_error(refused, 503, kind="shutting_down")
    follower.join(WAIT)
    assert events[-1] == "done", events

    assert process.wait(GRACE + WAIT) == 0, _tail(log)
    left = wait_gone(seen + processes_of_session(session), timeout=30)
    assert not left, [(p.pid, p.name()) for p in left]
