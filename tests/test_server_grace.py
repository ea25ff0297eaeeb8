"""SIGTERM's grace period holds even when the running step cannot be interrupted (one step of a
large request on a CPU can take minutes, and torch cannot be stopped inside an operation): the
process exits a few seconds after the grace period, with status 0, instead of waiting for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from helpers.server import WAIT, free_port, tiny_env, wait_until

SRC = str(Path(__file__).resolve().parents[1] / "src")

# a step that never ends and never looks at its cancel flag
STUCK = """
import sys, time
import fewstep.engine

def stuck(self, jobs):
    print("stuck step started", file=sys.stderr, flush=True)
    time.sleep(3600)

fewstep.engine.Engine.run = stuck
from fewstep.server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_exits_soon_after_the_grace_period_whatever_runs(tmp_path):
    from fewstep.server.shutdown import STOP_MARGIN_S

    models, _ = tiny_env()
    launcher = tmp_path / "stuck_serve.py"
    launcher.write_text(STUCK)
    port, grace = free_port(), 1.0
    env = {**os.environ, "PYTHONPATH": SRC, "FEWSTEP_API_KEY": "", "FEWSTEP_OPENVINO": "off"}
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, str(launcher), "--model", str(models.sd15), "--lcm-lora",
         str(models.lcm_sd15), "--device", "cpu", "--speed", "off", "--port", str(port),
         "--grace", str(grace)], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                return httpx.get(url + "/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, "the server to be ready", timeout=180, interval=0.2)
        accepted = httpx.post(url + "/v1/txt2img?wait=false", timeout=WAIT,
                              json={"prompt": "x", "width": 64, "height": 64, "steps": 1})
        assert accepted.status_code == 202, accepted.text
        wait_until(lambda: "stuck step started" in Path(log.name).read_text(),
                   "the step to start")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=WAIT)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = Path(log.name).read_text()
    assert code == 0, text
    # the grace period, the margin given to a cancelled step, and a few seconds of slack; the
    # shutdown used to wait on the step three times over (drain, server, lifespan)
    assert took < grace + STOP_MARGIN_S + 4, (took, text)
    assert "could not be interrupted" in text, text
    assert "terminate called" not in text and "Traceback" not in text, text
