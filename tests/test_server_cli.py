"""`python -m fewstep.server` as a process: its start-up line and nothing from the libraries
under it; SIGTERM during a job -> readiness false, new requests 503, the job finishes, exit
status 0. Start-up errors are one line, found before the model loads (or, for catalogue
entries that do not fit the model, before serving). And the config file."""

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
from helpers.cli import assert_no_library_noise, one_error_line

from helpers.server import WAIT, free_port, tiny_env, wait_until

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
        [sys.executable, "-m", "fewstep.server", "--config", str(config), "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, proc.stderr.read()
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
        log = proc.stderr.read()
        assert f"fewstep: serving sd15 (sd15, cpu, float32) at http://127.0.0.1:{port}" in log
        assert "fewstep: shutting down" in log and "fewstep: stopped" in log
        assert_no_library_noise(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_config_file_and_flags(tmp_path):
    import argparse

    from fewstep.errors import InvalidRequest
    from fewstep.server.catalog import Catalog
    from fewstep.server.cli import add_serve_parser, load_settings

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": "m", "port": 9000, "lora": {"a": "/x/a.safetensors"},
                               "controlnet": ["edges=/x/cn"], "queue-size": 3}))
    args = parser.parse_args(["serve", "--config", str(cfg), "--port", "9001",
                              "--lora", "b=/x/b.safetensors"])
    settings = load_settings(args)
    assert settings.port == 9001 and settings.queue_size == 3  # flags over the file
    assert settings.lora == {"b": "/x/b.safetensors"}
    catalog = Catalog.from_settings(settings)
    assert catalog.loras == {"b": "/x/b.safetensors"} and catalog.controlnets == {
        "edges": "/x/cn"}
    assert catalog.redact("failed at /x/cn/config.json") == "failed at edges/config.json"
    bad = tmp_path / "bad.toml"
    bad.write_text('surprise = 1\n')
    with pytest.raises(InvalidRequest):
        load_settings(parser.parse_args(["serve", "--config", str(bad)]))
    with pytest.raises(InvalidRequest):
        load_settings(parser.parse_args(["serve", "--lora", "../up=/x"]))


@pytest.fixture(scope="module")
def taken_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("args, expected", [
    (["--port", "70000"], "--port"),
    (["--port", "-1"], "--port"),
    (["--port", "abc"], "--port"),
    (["--port", "TAKEN"], "is in use"),
    (["--host", "no-such-host.invalid"], "host"),
    (["--host", "0.0.0.0"], "api-key"),
    (["--host", "192.0.2.1", "--api-key", "k"], "not an address of this machine"),
    (["--queue-size", "0"], "--queue-size"),
    (["--grace", "-1"], "--grace"),
    (["--max-steps", "0"], "--max-steps"),
    (["--device", "foo"], "--device"),
    (["--device", "cuda:3"], "CUDA"),
    (["--speed", "warp"], "invalid choice"),
    (["--log-level", "loud"], "invalid choice"),
    (["--public-url", "nope"], "--public-url"),
    (["--model", "MODELS/absent"], "no such file"),
    (["--lcm-lora", "MODELS/lcm-lora-sd15:9"], "within"),
    (["--lora", "../up=MODELS/style-sd15.safetensors"], "catalogue name"),
    (["--lora", "style=MODELS/absent.safetensors"], "lora.style"),
    (["--lora", "evil=MODELS/evil.ckpt"], "pickle"),
    (["--controlnet", "edges=MODELS/absent"], "controlnet.edges"),
    (["--config", "MODELS/absent.toml"], "no such file"),
    (["--no-such-flag"], "unrecognized"),
])
def test_start_up_errors_are_one_line_before_loading(tiny, taken_port, monkeypatch, capsys,
                                                     no_loading, args, expected):
    import torch

    from fewstep.server.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("FEWSTEP_API_KEY", raising=False)
    args = [a.replace("MODELS", str(tiny.root)).replace("TAKEN", str(taken_port))
            for a in args]
    try:
        code = main(["--model", str(tiny.sd15), "--port", "0", *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code != 0
    assert expected in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("kind, ref", [
    ("controlnet", "controlnet_sdxl"),
    ("adapter", "adapter_sdxl"),
    ("lora", "broken"),
])
def test_catalogue_entries_that_do_not_fit_fail_the_start(tiny, tmp_path, capsys, monkeypatch,
                                                          kind, ref):
    """Loaded and checked against the model at start-up: one line, and no server."""
    import uvicorn

    from fewstep.server.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("the service started with an entry that does not fit")

    monkeypatch.setattr(uvicorn.Server, "run", refuse)

    if ref == "broken":
        path = tmp_path / "broken.safetensors"
        path.write_bytes(tiny.style_sd15.read_bytes()[:200])  # truncated
    else:
        path = getattr(tiny, ref)
    code = main(["--model", str(tiny.sd15), "--lcm-lora", str(tiny.lcm_sd15), "--device", "cpu",
                 "--port", "0", f"--{kind}", f"x={path}"])
    assert code != 0
    line = one_error_line(capsys.readouterr().err)
    assert f"{kind}.x" in line


def test_service_options_come_from_the_settings():
    from fewstep.config import ServeSettings, load
    from fewstep.server.service import ServerOptions

    options = ServerOptions.from_settings(load(ServeSettings, {
        "api_key": "k", "queue_size": "3", "max_body_mb": "2", "timeout": "9", "grace": "4",
        "public_url": "https://fewstep.example", "body_timeout_s": "5",
        "job_retention_bytes": "1000", "max_batch": "2", "batch_wait_ms": "7"}))
    assert (options.api_key, options.queue_size, options.max_body_bytes) == ("k", 3, 2 * 2**20)
    assert (options.default_timeout_s, options.grace_s, options.public_url) == (
        9.0, 4.0, "https://fewstep.example")
    assert (options.body_timeout_s, options.job_retention_bytes) == (5.0, 1000)
    assert (options.max_batch, options.batch_wait_ms) == (2, 7.0)
