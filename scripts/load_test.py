"""Load test of a running `fewstep serve` on this machine (loopback only), bounded in count
and time.

Sends --requests txt2img requests from --concurrency threads at once, with a few distinct seeds.
Every request must end in a 200 or a 429 (nothing lost, no other status, no timeout); every 200
must hold a decodable PNG of the asked size, and every image for the same seed must match a
reference made alone first (nothing corrupted or mixed up; a request run in a batch may differ
from its solo run by one 8-bit level). Prints the queue limit, the counts, the throughput and
the verdict; exits 1 on any lost or corrupted result.

    python scripts/load_test.py --url http://127.0.0.1:7860 --requests 40 --concurrency 12

`--compare-batching` serves tiny random-weight models in this process twice, without batching
(`max_batch` 1) and with it (`--max-batch`, default 4), and reports the throughput of each:

    python scripts/load_test.py --compare-batching --requests 32 --concurrency 16

`--ray` serves tiny models on a local Ray instance (Ray Serve,
`fewstep.server.deployments`) with 1 and
then 2 engine replicas of one CPU each, and reports the throughput of each (needs the ray
extra; the ratio is what matters):

    python scripts/load_test.py --ray --requests 32 --concurrency 16
"""

from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image


def loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pixels(b64text: str, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64text))) as im:
        im.load()
        if im.size != (size, size):
            raise ValueError(f"size {im.size}, expected {size}x{size}")
        return np.asarray(im.convert("RGB"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:7860")
    p.add_argument("--compare-batching", action="store_true",
                   help="serve tiny models here, without and with batching, and compare")
    p.add_argument("--max-batch", type=int, default=4, help="with --compare-batching")
    p.add_argument("--ray", action="store_true",
                   help="serve tiny models on Ray Serve with 1 and 2 replicas, and compare")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--seeds", type=int, default=3, help="distinct seeds (images compared)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=120.0, help="whole-run time limit")
    p.add_argument("--api-key")
    args = p.parse_args(argv)
    if not loopback(args.url):
        print("refusing: the load test only targets a loopback address", file=sys.stderr)
        return 2
    if not (1 <= args.requests <= 1000 and 1 <= args.concurrency <= 64):
        print("refusing: 1..1000 requests and 1..64 threads", file=sys.stderr)
        return 2
    if args.compare_batching:
        return compare_batching(args)
    if args.ray:
        return compare_replicas(args)
    return 0 if load(args.url, args)["ok"] else 1


def load(url: str, args) -> dict:
    """Run the load against `url`; print and return the counts and the throughput."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    deadline = time.monotonic() + args.max_seconds
    client = httpx.Client(base_url=url, headers=headers,
                          timeout=httpx.Timeout(args.max_seconds))
    status = client.get("/v1/status").json()
    print(f"queue limit: {status['queue_limit']}")

    def body(seed):
        return {"prompt": "load test", "seed": seed, "width": args.size, "height": args.size,
                "steps": args.steps}

    reference = {}
    for seed in range(args.seeds):
        response = client.post("/v1/txt2img", json=body(seed))
        response.raise_for_status()
        reference[seed] = pixels(response.json()["images"][0]["b64"], args.size)

    def one(i):
        seed = i % args.seeds
        left = deadline - time.monotonic()
        if left <= 0:
            return i, seed, None, "skipped (time limit)"
        try:
            response = client.post("/v1/txt2img", json=body(seed), timeout=left)
        except httpx.HTTPError as exc:
            return i, seed, None, f"lost ({type(exc).__name__})"
        return i, seed, response, None

    counts: Counter = Counter()
    lost = corrupted = 0
    started = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        for future in as_completed([pool.submit(one, i) for i in range(args.requests)]):
            i, seed, response, problem = future.result()
            if response is None:
                counts[problem] += 1
                lost += 1
                continue
            counts[response.status_code] += 1
            if response.status_code == 429:
                if "Retry-After" not in response.headers:
                    corrupted += 1
                continue
            if response.status_code != 200:
                lost += 1
                continue
            data = response.json()
            try:
                image = pixels(data["images"][0]["b64"], args.size)
            except Exception:  # noqa: BLE001
                corrupted += 1
                continue
            if data["seed"] != seed or \
                    np.abs(image.astype(int) - reference[seed].astype(int)).max() > 1:
                corrupted += 1
    seconds = time.monotonic() - started
    print(f"requests: {args.requests} from {args.concurrency} threads in {seconds:.1f} s")
    print(f"200: {counts[200]}  429: {counts[429]}  other: "
          f"{sum(v for k, v in counts.items() if k not in (200, 429))}")
    print(f"lost: {lost}  corrupted: {corrupted}")
    images_per_s = counts[200] / seconds if seconds > 0 else 0.0
    print(f"throughput: {images_per_s:.2f} images/s")
    ok = lost == 0 and corrupted == 0
    print("OK: zero lost or corrupted results" if ok else "FAIL")
    return {"ok": ok, "images_per_s": images_per_s, "seconds": seconds, "ok_count": counts[200]}


def compare_batching(args) -> int:
    """The same load on tiny models served here, with max_batch 1 and then --max-batch."""
    import contextlib
    import socket
    import tempfile
    import threading
    from pathlib import Path

    import uvicorn

    from fewstep.build import build_engine
    from fewstep.server.app import create_app
    from fewstep.server.catalog import Catalog
    from fewstep.server.service import ServerOptions
    from fewstep.testing import build_tiny_models

    @contextlib.contextmanager
    def serve(engine, max_batch):
        app = create_app(engine, Catalog(model_name="tiny"),
                         ServerOptions(queue_size=64, max_batch=max_batch))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(30)
            sock.close()

    with tempfile.TemporaryDirectory() as tmp:
        models = build_tiny_models(Path(tmp))
        engine = build_engine(model=str(models.sd15), lcm_lora=str(models.lcm_sd15),
                              device="cpu")
        rows = []
        for max_batch in (1, args.max_batch):
            print(f"-- max_batch {max_batch}")
            with serve(engine, max_batch) as url:
                rows.append((max_batch, load(url, args)))
    base = rows[0][1]["images_per_s"] or float("nan")
    print("\n| max_batch | images/s | vs no batching |\n|---:|---:|---:|")
    for max_batch, row in rows:
        print(f"| {max_batch} | {row['images_per_s']:.2f} | {row['images_per_s'] / base:.2f}x |")
    return 0 if all(row["ok"] for _, row in rows) else 1


def compare_replicas(args, replica_counts=(1, 2)) -> int:
    """The same load on tiny models served on a local Ray instance, with 1 and 2 replicas."""
    import os
    import socket
    import tempfile
    from pathlib import Path

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from fewstep.config import load
    from fewstep.server.deployments import build_app
    from fewstep.server.ray_cli import RayServeSettings, make_spec
    from fewstep.testing import build_tiny_models

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = build_tiny_models(Path(tmp))
        ray.init(address="local", num_cpus=max(replica_counts), include_dashboard=False,
                 log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for replicas in replica_counts:
                print(f"-- {replicas} replica(s)")
                settings = load(RayServeSettings, {
                    "model": str(models.sd15), "lcm_lora": str(models.lcm_sd15),
                    "device": "cpu", "model_name": "tiny", "queue_size": 64,
                    "replicas": str(replicas), "cpus_per_replica": 1})
                serve.run(build_app(make_spec(settings, cluster_gpus=0)), name="fewstep",
                          route_prefix="/")
                rows.append((replicas, load(f"http://127.0.0.1:{port}", args)))
                serve.delete("fewstep")
        finally:
            serve.shutdown()
            ray.shutdown()
    base = rows[0][1]["images_per_s"] or float("nan")
    print("\n| replicas | images/s | vs 1 replica |\n|---:|---:|---:|")
    for replicas, row in rows:
        print(f"| {replicas} | {row['images_per_s']:.2f} | {row['images_per_s'] / base:.2f}x |")
    return 0 if all(row["ok"] for _, row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
