"""Load test of a running `fewstep serve` on this machine (loopback only), bounded in count
and time.

Sends --requests txt2img requests from --concurrency threads at once, with a few distinct seeds.
Every request must end in a 200 or a 429 (nothing lost, no other status, no timeout); every 200
must hold a decodable PNG of the asked size, and every image for the same seed must have the
same pixels as a reference made alone first (nothing corrupted or mixed up). Prints the queue
limit, the counts and the verdict; exits 1 on any lost or corrupted result.

    python scripts/load_test.py --url http://127.0.0.1:7860 --requests 40 --concurrency 12
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
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    deadline = time.monotonic() + args.max_seconds
    client = httpx.Client(base_url=args.url, headers=headers,
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
            if data["seed"] != seed or not np.array_equal(image, reference[seed]):
                corrupted += 1
    seconds = time.monotonic() - started
    print(f"requests: {args.requests} from {args.concurrency} threads in {seconds:.1f} s")
    print(f"200: {counts[200]}  429: {counts[429]}  other: "
          f"{sum(v for k, v in counts.items() if k not in (200, 429))}")
    print(f"lost: {lost}  corrupted: {corrupted}")
    ok = lost == 0 and corrupted == 0
    print("OK: zero lost or corrupted results" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
