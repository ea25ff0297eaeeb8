"""The objects a service made while starting, kept out of the garbage collector's full passes.

A process holding a loaded pipeline has about half a million objects (torch, transformers and
diffusers modules and what their imports made: 524k for SD1.5 on a CPU), and a full collection
walks them all: 0.23 s on two cores, holding the interpreter lock, so the event loop and every
request's thread wait that long each time one runs. They live as long as the process, so once
the engine is built they are collected once and frozen (`gc.freeze`): later full passes walk
only what requests made."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Collect what the start left behind, then freeze the rest. Returns how many objects are
    frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
