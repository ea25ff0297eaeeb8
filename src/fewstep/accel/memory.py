"""Giving back the pages of weight files the process no longer reads.

OpenVINO compiles a converted model from its cached blob, which it maps from disk, and at the
first inference copies the weights into its own layouts; the mapped blob stays resident (3.3
GB for the SD1.5 UNet) though nothing reads it again. torch's weights are mapped from their
.safetensors files too, and reading a few values of each (the cache keys) makes their pages
resident. Clean file-backed pages can be dropped at any time: the kernel reads them again from
the file if they are touched. `release_clean_file_pages` drops them for mappings of weight
files that hold no written page (so no data can be lost), on Linux; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import sys

WEIGHT_FILES = (".blob", ".bin", ".safetensors")
_MADV_DONTNEED = 4


def release_clean_file_pages(suffixes: tuple[str, ...] = WEIGHT_FILES) -> int:
    """Drop the resident pages of mapped files ending in `suffixes` whose mapping holds no
    written (dirty or copied) page. Returns the bytes released (0 where unsupported)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
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
