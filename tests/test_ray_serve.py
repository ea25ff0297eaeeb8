"""The service on Ray Serve, through its one HTTP entry, on a local Ray instance limited to 2
CPUs with 2 engine replicas of the tiny model: the same answers as the single-process service,
the real `openai` SDK, an A1111 client and httpx; work spread over both replicas (named in
X-Fewstep-Replica); a typed 429 with Retry-After when every replica is full; a killed replica
replaced while its running job gets a typed 503 and the others succeed. Ray starts once for the
module; the replicas' UNet calls can be held at a gate (a file) to set up those states."""

from __future__ import annotations

import base64
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from fastapi.testclient import TestClient
from PIL import Image

from helpers.ray_cluster import (
    RAY_ENV,
    WAIT,
    FileGate,
    gated_engine,
    kill_leftovers,
    ray_processes,
    service_settings,
    wait_gone,
)
from helpers.server import (
    assert_typed_error,
    decode,
    free_port,
    sample_image,
    tiny_env,
    wait_until,
)

QUEUE_SIZE = 3  # each replica holds 1 running + 3 waiting; 3 more may wait at the ingress
SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def ray_service(tmp_path_factory):
    import functools

    import ray
    from ray import serve

    from fewstep.server.deployments import build_app
    from fewstep.server.ray_cli import make_spec

    models, _ = tiny_env()
    gate = FileGate(tmp_path_factory.mktemp("gate"))
    tests_dir = str(Path(__file__).resolve().parent)
    saved = {k: os.environ.get(k) for k in (*RAY_ENV, "PYTHONPATH")}
    os.environ.update(RAY_ENV)  # the Ray processes inherit these (and find helpers.ray_cluster)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = ray_processes(os.getpid())
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = service_settings(models, queue_size=QUEUE_SIZE, replicas="2",
                                    cpus_per_replica=0.5)
        spec = make_spec(settings, cluster_gpus=0)
        spec.engine_factory = functools.partial(gated_engine, gate_dir=str(gate.dir))
        serve.run(build_app(spec), name="fewstep", route_prefix="/")
        yield f"http://127.0.0.1:{port}", gate, settings
    finally:
        gate.open()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            kill_leftovers(wait_gone(started, timeout=20))
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="module")
def url(ray_service):
    return ray_service[0]


@pytest.fixture(scope="module")
def gate(ray_service):
    return ray_service[1]


@pytest.fixture(scope="module")
def single_process(ray_service):
    """The single-process service as `fewstep serve` makes it from the same settings (over
    the same tiny model)."""
    from fewstep.server.app import create_app
    from fewstep.server.catalog import Catalog
    from fewstep.server.service import ServerOptions

    settings = ray_service[2]
    _, engine = tiny_env()
    app = create_app(engine, Catalog.from_settings(settings, engine),
                     ServerOptions.from_settings(settings))
    with TestClient(app, base_url="http://127.0.0.1") as local:  # a loopback Host
        yield local


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=WAIT) as c:
        yield c


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_catalogue_and_errors(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"ready": True}
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny-sd15" and models["data"][0]["family"] == "sd15"
    assert models["loras"] == ["style", "style-peft"]
    assert client.get("/v1/status").json()["queue_limit"] == 2 * QUEUE_SIZE + QUEUE_SIZE
    page = client.get("/")  # the studio page comes through the same entry
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # typed errors come from the same app, with no Ray text
    assert_typed_error(client.post("/v1/txt2img", json={"prompt": "x", "width": 63}),
                       422, "width")
    error = assert_typed_error(client.post("/v1/txt2img", json={
        "prompt": "x", "loras": [{"name": "../../etc/passwd"}]}), 422, "loras.0.name")
    assert "ray" not in error["message"].lower()
    assert_typed_error(client.post("/v1/txt2img", json={
        "prompt": "x", "loras": [{"name": "nope"}], **SMALL}), 404, "loras.0.name")
    assert_typed_error(client.get("/v1/jobs/0123456789abcdef"), 404, "job_id")
    assert_typed_error(client.get("/no/such/route"), 404, "path")


def test_same_answers_as_the_single_process_service(client, single_process):
    body = {"prompt": "a lighthouse", "seed": 7, **SMALL,
            "loras": [{"name": "style", "weight": 0.8}]}
    through_ray = client.post("/v1/txt2img", json=body)
    assert through_ray.status_code == 200, through_ray.text
    assert through_ray.headers["X-Fewstep-Replica"]
    alone = single_process.post("/v1/txt2img", json=body)
    assert alone.status_code == 200
    ray_json, local_json = through_ray.json(), alone.json()
    assert np.array_equal(decode(ray_json["images"][0]["b64"]),
                          decode(local_json["images"][0]["b64"]))
    assert ray_json["params"] == local_json["params"]
    assert ray_json["seed"] == local_json["seed"] == 7

    # img2img with an uploaded image: the request (with its image) crosses to a replica
    image = sample_image(64)
    upload = {"params": '{"prompt": "a boat", "seed": 3, "steps": 2, "strength": 0.5}'}
    files = {"image": ("in.png", _png(image), "image/png")}
    through_ray = client.post("/v1/img2img/upload", data=upload, files=files)
    alone = single_process.post("/v1/img2img/upload", data=upload, files=files)
    assert through_ray.status_code == alone.status_code == 200, through_ray.text
    assert np.array_equal(decode(through_ray.json()["images"][0]["b64"]),
                          decode(alone.json()["images"][0]["b64"]))


def test_jobs_and_events_through_ray(client):
    accepted = client.post("/v1/txt2img?wait=false", json={"prompt": "x", "seed": 1, **SMALL})
    assert accepted.status_code == 202
    job_id = accepted.headers["X-Job-Id"]
    assert accepted.headers["X-Fewstep-Replica"]
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
    assert events[0] == "state" and events[-1] == "done", events
    assert "progress" in events
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "done" and job["result"]["images"]
    assert job_id in [j["id"] for j in client.get("/v1/jobs").json()]


def test_openai_sdk_and_a1111_client(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused-on-loopback", max_retries=0)
    raw = client.images.with_raw_response.generate(
        model="tiny-sd15", prompt="a fox", n=2, size="64x64", response_format="b64_json",
        extra_body={"seed": 4, "steps": 2})
    assert raw.headers["X-Fewstep-Replica"]
    result = raw.parse()
    assert len(result.data) == 2
    first = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert first.size == (64, 64)
    by_url = client.images.generate(model="tiny-sd15", prompt="a fox", n=2, size="64x64",
                                    response_format="url", extra_body={"seed": 4, "steps": 2})
    fetched = httpx.get(url + by_url.data[0].url, timeout=WAIT)
    assert fetched.status_code == 200
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(fetched.content)).convert("RGB")),
                          np.asarray(first.convert("RGB")))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    edited = client.images.edit(model="tiny-sd15", prompt="a hat",
                                image=("in.png", _png(sample_image(64)), "image/png"),
                                mask=("mask.png", _png(mask), "image/png"), size="64x64",
                                response_format="b64_json", extra_body={"steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).size == (64, 64)
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="x", size="64x64")

    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]),
                            sampler="LCM", steps=2)
    assert [m["model_name"] for m in api.get_sd_models()] == ["tiny-sd15"]
    plain = api.txt2img(prompt="a boat", seed=9, width=64, height=64, cfg_scale=1.0)
    styled = api.txt2img(prompt="a boat <lora:style:0.9>", seed=9, width=64, height=64,
                         cfg_scale=1.0)
    assert plain.image.size == (64, 64) and plain.info["seed"] == 9
    assert styled.info["loras"] == [{"ref": "style", "weight": 0.9}]
    assert not np.array_equal(np.asarray(plain.image), np.asarray(styled.image))
    with pytest.raises(RuntimeError) as info:
        api.txt2img(prompt="<lora:unknown:1>", width=64, height=64)
    assert info.value.args[0] == 404 and "Traceback" not in info.value.args[1]


def test_concurrent_requests_use_both_replicas(client):
    def one(seed):
        return client.post("/v1/txt2img", json={"prompt": "many", "seed": seed, **SMALL})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    replicas = {r.headers["X-Fewstep-Replica"] for r in responses}
    assert len(replicas) == 2, replicas
    seeds = [r.json()["seed"] for r in responses]
    assert seeds == list(range(8))


def test_full_replicas_give_a_typed_429_with_retry_after(client, gate):
    capacity = 2 * (QUEUE_SIZE + 1)  # both replicas: one running, QUEUE_SIZE waiting
    body = {"prompt": "hold", **SMALL}
    accepted = []
    waiting = []
    with gate.closed():
        for _ in range(capacity):
            response = client.post("/v1/txt2img?wait=false", json=body)
            assert response.status_code == 202, response.text
            accepted.append(response.headers["X-Job-Id"])
        wait_until(lambda: len(gate.held()) == 2, "both replicas holding a job", WAIT)
        # QUEUE_SIZE more wait at the ingress for a replica slot (their answer waits too)
        pool = ThreadPoolExecutor(QUEUE_SIZE)
        waiting = [pool.submit(client.post, "/v1/txt2img", json=body)
                   for _ in range(QUEUE_SIZE)]
        wait_until(lambda: client.get("/v1/status").json()["queue_depth"]
                   == capacity - 2 + QUEUE_SIZE, "the overflow to wait at the ingress", WAIT)
        refused = client.post("/v1/txt2img", json=body)
        error = assert_typed_error(refused, 429, kind="queue_full")
        assert int(refused.headers["Retry-After"]) >= 1
        assert "backpressure" not in error["message"].lower()
        also = client.post("/v1/txt2img?wait=false", json=body)
        assert_typed_error(also, 429, kind="queue_full")
    assert [f.result(WAIT).status_code for f in waiting] == [200] * QUEUE_SIZE
    pool.shutdown()
    for job_id in accepted:
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["state"] == "done",
                   f"job {job_id} to finish", WAIT)


def test_cancel_reaches_the_replica(client, gate):
    with gate.closed():
        accepted = client.post("/v1/txt2img?wait=false", json={"prompt": "c", **SMALL})
        job_id = accepted.headers["X-Job-Id"]
        wait_until(lambda: gate.held(), "the job to run", WAIT)
        cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    # the replica stopped it: both replicas take work again at once
    test_concurrent_requests_use_both_replicas(client)


def test_out_of_memory_on_one_replica_is_a_typed_503_and_the_service_goes_on(client, gate):
    gate.out_of_memory_once()
    failed = client.post("/v1/txt2img", json={"prompt": "too big", **SMALL})
    assert_typed_error(failed, 503, kind="out_of_memory")
    assert not gate.oom_pending()
    assert failed.headers["X-Fewstep-Replica"]
    test_concurrent_requests_use_both_replicas(client)  # both replicas still work


def test_a_client_that_goes_away_cancels_its_job_on_the_replica(url, client, gate):
    with gate.closed():
        def impatient():
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/txt2img", json={"prompt": "impatient", **SMALL},
                           timeout=httpx.Timeout(WAIT, read=2.0))

        thread = threading.Thread(target=impatient)
        thread.start()
        wait_until(lambda: gate.held(), "the job to run", WAIT)
        (job,) = [j for j in client.get("/v1/jobs").json() if j["state"] == "running"]
        thread.join(WAIT)  # the client has gone
        wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled",
                   "the job to be cancelled", WAIT)
        looked_up = client.get(f"/v1/jobs/{job['id']}")
        assert looked_up.headers["X-Fewstep-Replica"] in gate.held()


def test_killed_replica_is_replaced(client, gate):
    """Runs last: it leaves a fresh replica in place of a killed one."""
    from ray import serve

    result = {}
    with gate.closed():
        def running():
            result["response"] = client.post("/v1/txt2img", json={"prompt": "dies", **SMALL})

        thread = threading.Thread(target=running)
        thread.start()
        wait_until(lambda: len(gate.held()) == 1, "the first job at the gate", WAIT)
        (victim, pid), = gate.held().items()
        other = client.post("/v1/txt2img?wait=false", json={"prompt": "lives", "seed": 5,
                                                            **SMALL})
        assert other.status_code == 202
        other_id = other.headers["X-Job-Id"]
        os.kill(pid, 9)
        thread.join(WAIT)
        assert not thread.is_alive(), "the request on the killed replica hangs"
    error = assert_typed_error(result["response"], 503, kind="replica_unavailable")
    assert "ray" not in error["message"].lower() and "actor" not in error["message"].lower()
    assert result["response"].headers["Retry-After"]
    wait_until(lambda: client.get(f"/v1/jobs/{other_id}").json()["state"] in
               ("done", "failed"), "the other job to end", WAIT)
    assert client.get(f"/v1/jobs/{other_id}").json()["state"] == "done"

    # every request succeeds meanwhile; the replacement shows up as a name never seen before
    serving: set[str] = set()

    def replaced() -> bool:
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda s: client.post(
                "/v1/txt2img", json={"prompt": "after", "seed": s, **SMALL}), range(4)))
        assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
        serving.update(r.headers["X-Fewstep-Replica"] for r in responses)
        return len(serving - {victim}) == 2

    wait_until(replaced, "the killed replica to be replaced", WAIT, interval=0.5)
    assert victim not in serving
    deployment = serve.status().applications["fewstep"].deployments["EngineReplica"]
    states = {getattr(k, "value", k): n for k, n in deployment.replica_states.items()}
    assert states.get("RUNNING") == 2, states


def test_serve_ray_joins_a_cluster_and_leaves_it_running(ray_service, tmp_path):
    """Runs after the others: `fewstep serve --ray --ray-address` on this module's Ray instance
    (Serve stopped first, so fewstep starts it); SIGTERM removes what fewstep started and
    leaves the cluster it joined running."""
    import signal
    import subprocess
    import sys
    import time

    import ray
    from ray import serve

    from fewstep.server.ray_cli import _serve_running

    serve.shutdown()
    models, _ = tiny_env()
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "fewstep.server", "--ray", "--ray-address",
         ray.get_runtime_context().gcs_address, "--replicas", "1", "--cpus-per-replica", "0.5",
         "--port", str(port), "--model", str(models.sd15), "--lcm-lora", str(models.lcm_sd15),
         "--device", "cpu", "--grace", "10", "--log-level", "warning"],
        env={**os.environ, **RAY_ENV}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + WAIT
        while True:
            assert process.poll() is None, log.seek(0) or log.read()[-3000:]
            assert time.monotonic() < end, "not ready in time"
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        answer = httpx.post(url + "/v1/txt2img", json={"prompt": "x", **SMALL}, timeout=WAIT)
        assert answer.status_code == 200 and answer.headers["X-Fewstep-Replica"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0, log.seek(0) or log.read()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert ray.cluster_resources().get("CPU") == 2  # the joined cluster still runs
    assert not _serve_running(serve)  # fewstep started Serve there: it stopped it
