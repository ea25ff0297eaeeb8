"""Keeping the process's C locale through OpenVINO's cached compiles.

OpenVINO (2026.4) sets the process-wide C locale to "C" while it writes or reads a compiled
blob (`CACHE_DIR`) and then puts back the locale it found. Two such compiles at once (compiling
ahead runs two threads) can each find the other's "C", and the last one out leaves it: Python
then opens text files as ASCII (`locale.getpreferredencoding()`), and any library that opens a
file without naming its encoding fails at its first non-ASCII byte, long after the compiles.
`keeping_locale()` goes around every compile: the first of overlapping ones notes the locale,
the last one out puts it back. Nothing here imports torch or OpenVINO.
"""

from __future__ import annotations

import contextlib
import locale
import threading

_lock = threading.Lock()
_inside = 0
_noted: str | None = None


def _current() -> str | None:
    try:
        return locale.setlocale(locale.LC_ALL)  # (no value: reads it)
    except locale.Error:
        return None


@contextlib.contextmanager
def keeping_locale():
    """Around an OpenVINO compile: the process's locale as it was before the first of the
    compiles running at once, once the last of them is done."""
    global _inside, _noted
    with _lock:
        if _inside == 0:
            _noted = _current()
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0 and _noted is not None and _current() != _noted:
                try:
                    locale.setlocale(locale.LC_ALL, _noted)
                except locale.Error:
                    pass
