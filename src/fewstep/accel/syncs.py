"""Counting host syncs: the operations that make the host wait for the device.

`SyncCounter` is a TorchDispatchMode that counts, while `active`, the ops that read a value back
to the host (`.item()`, `bool(tensor)`, `.tolist()` go through `_local_scalar_dense` / `item` /
`is_nonzero`), the ops whose output size depends on the data (`nonzero`), and copies from an
accelerator to the CPU. On a CPU these are cheap, but they are the same calls that stall a GPU,
so a count taken on tiny CPU models proves a loop free of them."""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SCALAR_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal"}


class SyncCounter(TorchDispatchMode):
    def __init__(self, keep_stacks: bool = False, device_only: bool = False):
        super().__init__()
        self.device_only = device_only  # count reads of accelerator tensors only
        self.count = 0
        self.active = True
        self.keep_stacks = keep_stacks
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active and self._syncs(func, args, kwargs) and not (
                self.device_only and not _on_device(args)):
            self.count += 1
            if self.keep_stacks:
                self.where.append(f"{func}\n" + "".join(traceback.format_stack(limit=8)[:-2]))
        return func(*args, **kwargs)

    @staticmethod
    def _syncs(func, args, kwargs) -> bool:
        name = func.__name__.split(".")[0]
        if name in SCALAR_READS:
            return True
        if name in ("_to_copy", "copy_") and args:
            source = args[1] if name == "copy_" else args[0]
            target = args[0].device if name == "copy_" else kwargs.get("device")
            if isinstance(source, torch.Tensor) and source.device.type != "cpu" and \
                    target is not None and torch.device(target).type == "cpu":
                return True
        return False


def _on_device(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)


def count_loop_syncs(pipe, run) -> tuple[int, SyncCounter]:
    """Run `run()` and count the syncs from the first UNet call to the start of the VAE decode:
    the denoising loop."""
    counter = SyncCounter(keep_stacks=True)
    counter.active = False

    def start(*_args, **_kwargs):
        counter.active = True

    def stop(*_args, **_kwargs):
        counter.active = False

    handles = [pipe.unet.register_forward_pre_hook(start),
               pipe.vae.register_forward_pre_hook(stop)]
    decoder = getattr(pipe.vae, "decoder", None)
    if decoder is not None:
        handles.append(decoder.register_forward_pre_hook(stop))
    try:
        with counter:
            run()
    finally:
        for handle in handles:
            handle.remove()
    return counter.count, counter


@contextlib.contextmanager
def unet_batches(pipe):
    """A list that gets the batch of every call of `pipe`'s UNet made inside the block (1 per
    image at guidance <= 1: no classifier-free doubling)."""
    seen: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(int((args[0] if args else
                                                       kwargs["sample"]).shape[0])),
        with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
