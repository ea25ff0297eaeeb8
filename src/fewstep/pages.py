"""Giving back the pages of weight files the process no longer reads.

OpenVINO compiles a converted model from its cached blob, which it maps from disk, and at the
first inference copies the weights into its own layouts; the mapped blob stays resident (3.3
GB for the SD1.5 UNet) though nothing reads it again. torch's weights are mapped from their
.safetensors files too, and reading a few values of each (the cache keys) makes their pages
resident. Clean file-backed pages can be dropped at any time: the kernel reads them again from
the file if they are touched. `release_clean_file_pages` drops them for mappings of weight
files that hold no written page (so no data can be lost), on Linux; elsewhere it does nothing.

Dropping them only afterwards leaves both copies resident for a moment. `releasing_blob_pages`
drops the pages of blobs and IR weights mapped shared and read-only, which can hold nothing but
the file's own bytes, four times a second while a step runs: used where models are converted and
compiled into the cache. Not while OpenVINO loads a blob and copies its weights at the first call
(6.7 GB at that peak against 4.3 GB after, SD1.5 at 256x256): a warm one-shot command doing so
peaked at 4.8 GB but took 19.8 s inside `fewstep bench` (whose own process holds GBs) against
15 s alone; pages dropped while still being read may leave the page cache and come from disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading

WEIGHT_FILES = (".blob", ".bin", ".safetensors")
_MADV_DONTNEED = 4


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


@contextlib.contextmanager
def releasing_blob_pages(interval: float = 0.25, suffixes: tuple[str, ...] = (".blob", ".bin")):
    """While the body runs, a thread gives back the resident pages of `suffixes` files mapped
    shared and read-only (OpenVINO's blobs and IR weights) every `interval` seconds: what is
    still to be read comes back from the page cache when touched (a minor fault), what was
    copied already is not kept twice. Does nothing off Linux."""
    if not sys.platform.startswith("linux"):
        yield
        return
    try:
        madvise = _madvise()
    except (OSError, AttributeError):
        yield
        return
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            for start, end in _shared_read_only(suffixes):
                madvise(start, end - start, _MADV_DONTNEED)

    thread = threading.Thread(target=run, name="fewstep-blob-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _shared_read_only(suffixes: tuple[str, ...]) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of `suffixes` files that are shared and
    read-only (no page of them can differ from the file)."""
    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) > 5 and parts[1] == "r--s" and parts[5].endswith(suffixes):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    found.append((start, end))
    except OSError:
        return []
    return found


def release_clean_file_pages(suffixes: tuple[str, ...] = WEIGHT_FILES) -> int:
    """Drop the resident pages of mapped files ending in `suffixes` whose mapping holds no
    written (dirty or copied) page. Returns the bytes released (0 where unsupported)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        madvise = _madvise()
        mappings = _clean_mappings(suffixes)
    except (OSError, AttributeError, ValueError):
        return 0
    released = 0
    for start, end, resident in mappings:
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            released += resident
    return released


def _clean_mappings(suffixes: tuple[str, ...]) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of mappings of `suffixes` files with no written page."""
    found = []
    current = None
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                if current is not None and current["keep"]:
                    found.append(current)
                path = head[5] if len(head) > 5 else ""
                start, end = (int(x, 16) for x in head[0].split("-"))
                # a mapping this process cannot write through: read-only or private (whose
                # written pages are its own copies, counted as Anonymous)
                current = {"range": (start, end), "keep": path.endswith(suffixes),
                           "rss": 0, "unwritten": head[1][1] != "w" or head[1].endswith("p")}
            elif current is not None:
                key = head[0].rstrip(":")
                if key == "Rss":
                    current["rss"] = int(head[1]) * 1024
                elif key == "Anonymous" and int(head[1]) > 0:
                    current["keep"] = False  # a page this process wrote: dropping it loses it
                elif key in ("Private_Dirty", "Shared_Dirty") and int(head[1]) > 0 and \
                        not current["unwritten"]:
                    # dirty pages of a mapping this process cannot write are the file's own,
                    # written by another process and not on disk yet (a blob just cached):
                    # they stay in the page cache; a writable shared mapping's may be ours
                    current["keep"] = False
    if current is not None and current["keep"]:
        found.append(current)
    return [(m["range"][0], m["range"][1], m["rss"]) for m in found if m["rss"]]
