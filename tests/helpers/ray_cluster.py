"""Helpers of the Ray Serve tests: one small local Ray instance (2 CPUs, no dashboard) per test
module, the tiny model's service deployed on it, a gate that holds every replica inside a UNet
call (a file: the replicas are other processes), and a check that no Ray process is left.

Imported by the replicas too (the engine factory): keep its imports light."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

WAIT = 120.0  # upper bound of every wait in these tests (replicas load models on 2 cores)
RAY_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false"}


def gated_engine(settings, needs: dict, gate_dir: str):
    """Runs in a replica: the engine `fewstep serve` makes, with a hook that holds each UNet
    call while `gate_dir/hold` exists, after writing `gate_dir/held-<replica>` (its pid), and
    runs out of memory once when `gate_dir/oom` exists."""
    from ray import serve

    from fewstep.build import build_engine

    engine = build_engine(settings.engine_options(), settings=settings.limits(), **needs)
    replica = serve.get_replica_context().replica_id.unique_id
    gate = Path(gate_dir)

    def hold(module, args):
        if (gate / "oom").exists():  # fault injection: the next UNet call runs out of memory
            (gate / "oom").unlink(missing_ok=True)
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        if not (gate / "hold").exists():
            return
        (gate / f"held-{replica}").write_text(str(os.getpid()))
        end = time.monotonic() + WAIT
        while (gate / "hold").exists():
            if time.monotonic() > end:
                raise RuntimeError("the gate was never released")
            time.sleep(0.01)

    engine.base.unet.register_forward_pre_hook(hold)
    return engine


class FileGate:
    """The test side of `gated_engine`'s gate."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        for held in self.dir.glob("held-*"):
            held.unlink()
        (self.dir / "hold").touch()

    def open(self) -> None:
        (self.dir / "hold").unlink(missing_ok=True)

    def out_of_memory_once(self) -> None:
        (self.dir / "oom").touch()

    def oom_pending(self) -> bool:
        return (self.dir / "oom").exists()

    def held(self) -> dict[str, int]:
        """Replica name -> pid of the replicas holding a job at the gate."""
        return {p.name.removeprefix("held-"): int(p.read_text() or 0)
                for p in self.dir.glob("held-*") if p.read_text()}

    @contextlib.contextmanager
    def closed(self):
        self.close()
        try:
            yield self
        finally:
            self.open()


def service_settings(models, **extra):
    """`fewstep serve --ray` settings for the tiny model with two LoRAs (every replica checks
    its catalogue at start, so it holds only what the tests use)."""
    from fewstep.config import load
    from fewstep.server.ray_cli import RayServeSettings

    return load(RayServeSettings, {
        "model": str(models.sd15), "lcm_lora": str(models.lcm_sd15), "model_name": "tiny-sd15",
        "device": "cpu",
        "lora": {"style": str(models.style_sd15), "style-peft": str(models.style_sd15_peft)},
        **extra})


def ray_processes(root_pid: int) -> list:
    """Every process under `root_pid` (Ray's services, workers and their helpers: the test
    starts nothing else below it)."""
    import psutil

    try:
        return psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def session_of(processes) -> str | None:
    """The Ray session directory named on these processes' command lines."""
    import re

    import psutil

    for process in processes:
        with contextlib.suppress(psutil.Error):
            for arg in process.cmdline():
                found = re.search(r"(/[^=\s]*/session_\d[\w-]*)", arg)
                if found:
                    return found.group(1)
    return None


def processes_of_session(session: str) -> list:
    """Any process on this machine whose command line names the Ray session (also one that
    left its parent)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if any(session in arg for arg in process.cmdline()):
                found.append(process)
    return found


def wait_gone(processes, timeout: float = 30.0) -> list:
    """The processes still alive (not zombies) after `timeout`."""
    import psutil

    end = time.monotonic() + timeout
    alive = list(processes)
    while alive and time.monotonic() < end:
        alive = [p for p in alive if _alive(p, psutil)]
        if alive:
            time.sleep(0.2)
    return [p for p in alive if _alive(p, psutil)]


def _alive(process, psutil) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_leftovers(processes) -> None:
    """Last resort of a teardown: ends what is left of the processes this test started, by
    pid (never every Ray process of the machine)."""
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
