"""Compiling a one-shot command's converted models while the command starts.

A one-shot command on a CPU spends its first seconds importing torch and diffusers (about 5 s on
two cores), then, at its first calls, compiling its converted models from their cached blobs
(the SD1.5 UNet: 4-6 s). The imports keep one core busy, the compile mostly the other. So a
command leaves a note in the cache: a digest of what it was asked (its task, engine options,
size, batch and guidance) and the fixed-shape IRs its calls compiled. The same command started
again (another prompt or seed is the same command) compiles those on two threads from its
first lines (the largest model on one, the rest on the other), beside the imports, and its
calls take them ready. The note also holds what `fewstep.direct` needs to repeat the command
without the engine.

The note only predicts: a compiled model is taken for the very IR file and settings it was
compiled from, which the builder finds by its own cache keys (digests of the weights). One
compiled for nothing (the weights changed) is dropped. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

NOTE = "last-one-shot.json"
_compiling: dict[tuple[str, str], Future] = {}  # (IR path, settings) -> its compiled model


def command_digest(task: str, values: dict[str, Any]) -> str:
    """What a command was asked, as a digest: the same for two runs that compile the same."""
    text = json.dumps({"task": task, "values": values}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _note_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / NOTE


def _key(ir: str | os.PathLike, settings: dict) -> tuple[str, str]:
    return str(Path(ir)), json.dumps(settings, sort_keys=True)


def read_note(folder: str | os.PathLike, digest: str) -> dict | None:
    """The last command's note in `folder` (the OpenVINO cache:
    `config.openvino_cache_dir`) when it was the command `digest`, else None."""
    try:
        note = json.loads(_note_path(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # none, or unreadable
    return note if isinstance(note, dict) and note.get("digest") == digest else None


def start(folder: str | os.PathLike, digest: str) -> int:
    """Begin compiling, on a thread, what the last command's note in `folder` lists when it
    was the same command. Returns how many models are being compiled (0: no note, or another
    command's)."""
    note = read_note(folder, digest)
    try:
        jobs = [(Path(item["ir"]), dict(item["settings"]), str(item["blobs"]))
                for item in note["compiled"]]
    except (KeyError, TypeError, AttributeError):
        return 0  # nothing ahead, the calls compile
    jobs = [job for job in jobs if job[0].is_file() and job[0].with_suffix(".bin").is_file()]
    futures = []
    for ir, settings, _ in jobs:
        future: Future = Future()
        _compiling[_key(ir, settings)] = future
        futures.append(future)
    if jobs:
        threading.Thread(target=_compile, args=(list(zip(jobs, futures)),),
                         name="fewstep-compile-ahead", daemon=True).start()
    return len(jobs)


def _compile(pairs) -> None:
    """Compile each (job, future): the largest model (the UNet, most of the time) on a thread
    of its own, the rest in order on another. On two cores both are ready sooner than one
    after the other (SD1.5 at 256x256: the UNet at 3.1-4.2 s against 4.7-5.7 s)."""
    try:
        import openvino as ov

        from .pages import releasing_blob_pages
    except Exception as error:  # openvino not importable: nothing is compiled
        for _, future in pairs:
            future.set_exception(error)
        return
    largest = max(range(len(pairs)), key=lambda i: _weights_size(pairs[i][0][0]))
    groups = [[pairs[largest]], [pair for i, pair in enumerate(pairs) if i != largest]]
    # the blob's pages are given back as its weights are copied: one copy resident
    with releasing_blob_pages():
        threads = [threading.Thread(target=_compile_group, args=(ov, group), daemon=True,
                                    name="fewstep-compile-ahead") for group in groups if group]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def _compile_group(ov, pairs) -> None:
    try:
        core = ov.Core()  # one per thread: the blob folder is a core's setting
    except Exception as error:
        for _, future in pairs:
            future.set_exception(error)
        return
    for (ir, settings, blobs), future in pairs:
        try:
            future.set_result(compile_ir(core, ir, settings, blobs))
        except Exception as error:  # the call compiles it again, and says why
            future.set_exception(error)


def compile_ir(core, ir: str | os.PathLike, settings: dict, blobs: str):
    """Compile the IR at `ir` on `core` (an `openvino.Core`) with `settings`, its blob kept in
    (or read from) the folder `blobs`, keeping the process's locale."""
    from .locale_guard import keeping_locale

    core.set_property({"CACHE_DIR": blobs})
    with keeping_locale():
        return core.compile_model(str(ir), "CPU", settings)


def _weights_size(ir: Path) -> int:
    try:
        return ir.with_suffix(".bin").stat().st_size
    except OSError:
        return 0


def take(ir: str | os.PathLike, settings: dict):
    """The model compiled ahead from the IR at `ir` with `settings` (waiting for it when still
    compiling), or None when none was (the caller compiles)."""
    future = _compiling.pop(_key(ir, settings), None)
    if future is None:
        return None
    try:
        return future.result()
    except Exception:
        return None


def keep_only(models: list[str | os.PathLike]) -> None:
    """Drop what was compiled ahead from any IR but the fixed-shape ones of `models` (the
    converted models the builder found for these weights): stale, it would only hold memory."""
    stems = tuple(Path(model).with_suffix("").name + "." for model in models)
    for key in list(_compiling):
        if not Path(key[0]).name.startswith(stems):
            del _compiling[key]


def remember(folder: str | os.PathLike, digest: str, compiled: list[dict],
             direct: dict | None = None) -> None:
    """Leave the note in `folder` for the next start of the same command: `compiled` lists
    the IRs its calls compiled ({"ir", "settings", "blobs", "part", "batch"}), `direct` what
    `fewstep.direct` needs to repeat it. Written whole or not at all."""
    if not compiled:
        return
    from .outputs import write_atomically

    note = {"digest": digest, "compiled": compiled}
    if direct is not None:
        note["direct"] = direct
    try:
        write_atomically([(_note_path(folder), json.dumps(note).encode("utf-8"))])
    except OSError:
        pass  # a read-only cache: the next start compiles at its calls
