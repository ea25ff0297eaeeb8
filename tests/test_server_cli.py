"""`python -m fewstep.server` as a process: SIGTERM during a job -> readiness false, new
requests 503, the job finishes, exit status 0. And the config file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from conftest_server import WAIT, free_port, tiny_env, wait_until

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_sigterm_drains_then_exits_cleanly(tmp_path):
    models, _ = tiny_env()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC, "FEWSTEP_API_KEY": ""}
    config = tmp_path / "serve.toml"
    config.write_text(f'model = "{models.sd15}"\nlcm_lora = "{models.lcm_sd15}"\n'
                      f'device = "cpu"\nqueue_size = 2\ngrace = 60\n'
                      f'[lora]\nstyle = "{models.style_sd15}"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "fewstep.server", "--config", str(config), "--port", str(port),
         "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, "the server to be ready", timeout=120, interval=0.2)
        assert httpx.get(url + "/v1/loras").json()["data"][0]["name"] == "style"
        accepted = httpx.post(url + "/v1/txt2img", params={"wait": "false"}, timeout=WAIT,
                              json={"prompt": "long", "steps": 40, "num_images": 2,
                                    "width": 64, "height": 64, "seed": 1})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        final = []

        def follow():
            with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=WAIT) as r:
                for line in r.iter_lines():
                    if line.startswith("event: ") and line[7:] in (
                            "done", "failed", "cancelled", "expired"):
                        final.append(line[7:])
                        return

        follower = threading.Thread(target=follow)
        follower.start()
        wait_until(lambda: httpx.get(f"{url}/v1/jobs/{job_id}").json()["step"] >= 1,
                   "the job to run")
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(url + "/readyz").status_code == 503,
                   "readiness to go false", timeout=10)
        refused = httpx.post(url + "/v1/txt2img", json={"prompt": "new", "width": 64,
                                                        "height": 64}, timeout=WAIT)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "shutting_down"
        assert "Retry-After" in refused.headers
        follower.join(WAIT)
        assert final == ["done"]  # the running job finished
        assert proc.wait(timeout=WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_config_file_and_flags(tmp_path):
    import argparse

    from fewstep.errors import InvalidRequest
    from fewstep.server.cli import add_serve_parser, build_catalog, read_config, resolve_options

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": "m", "port": 9000, "lora": {"a": "/x/a.safetensors"},
                               "controlnet": ["edges=/x/cn"], "queue-size": 3}))
    args = parser.parse_args(["serve", "--config", str(cfg), "--port", "9001",
                              "--lora", "b=/x/b.safetensors"])
    values = resolve_options(args)
    assert values["port"] == 9001 and values["queue_size"] == 3  # flags over the file
    assert values["lora"] == ["b=/x/b.safetensors"]
    catalog = build_catalog(values)
    assert catalog.loras == {"b": "/x/b.safetensors"} and catalog.controlnets == {
        "edges": "/x/cn"}
    assert catalog.redact("failed at /x/cn/config.json") == "failed at edges/config.json"
    bad = tmp_path / "bad.toml"
    bad.write_text('surprise = 1\n')
    with pytest.raises(InvalidRequest):
        read_config(str(bad))
    with pytest.raises(InvalidRequest):
        build_catalog({"lora": ["../up=/x"]})
