"""A service freezes the objects its start made, so full garbage collections (which hold the
interpreter lock, and with it the event loop) walk only what requests make."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

from helpers.server import tiny_env

from fewstep.server.heap import freeze_startup_objects

SRC = str(Path(__file__).resolve().parents[1] / "src")

# `fewstep serve` up to the point where it would serve: how many objects are frozen there
LAUNCHER = """
import gc, os, sys
import uvicorn
import fewstep.server.cli as cli

def report(self, sockets=None):
    print("frozen", gc.get_freeze_count(), flush=True)
    os._exit(0)  # the service's worker threads would hold a normal exit

uvicorn.Server.run = report  # the service's server is a uvicorn.Server
sys.exit(cli.main(sys.argv[1:]))
"""


class _Cycle:
    pass


def test_start_up_garbage_is_collected_then_the_rest_frozen():
    garbage = _Cycle()
    garbage.me = garbage  # only a full collection frees a cycle
    dead = weakref.ref(garbage)
    del garbage
    kept = _Cycle()
    try:
        frozen = freeze_startup_objects()
        assert dead() is None  # collected before freezing, not kept for ever
        # (frozen objects that other threads of this process drop still leave the count)
        assert frozen > 1000 and gc.get_freeze_count() > 1000
        assert any(o is kept for o in gc.get_objects()) is False  # frozen: out of the walks
    finally:
        gc.unfreeze()  # the test process goes on collecting as before


def test_the_service_freezes_its_start_up_objects_before_serving(tmp_path):
    models, _ = tiny_env()
    launcher = tmp_path / "serve_until_ready.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "PYTHONPATH": SRC, "FEWSTEP_API_KEY": "", "FEWSTEP_OPENVINO": "off"}
    done = subprocess.run(
        [sys.executable, str(launcher), "--model", str(models.sd15), "--lcm-lora",
         str(models.lcm_sd15), "--device", "cpu", "--speed", "off", "--port", "0"],
        env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = [int(line.split()[1]) for line in done.stdout.splitlines()
              if line.startswith("frozen ")]
    # torch, diffusers and the engine: hundreds of thousands of objects
    assert counts and counts[0] > 100_000, done.stdout
