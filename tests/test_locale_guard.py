"""OpenVINO's cached compiles set the process's C locale to "C" for a while and put back what
they found; two at once (compiling ahead runs two threads) can leave "C", after which Python
opens text files as ASCII. `keeping_locale` puts the locale back once the last is done."""

from __future__ import annotations

import locale
import threading

import pytest

from fewstep.locale_guard import keeping_locale


@pytest.fixture
def utf8_locale():
    before = locale.setlocale(locale.LC_ALL)
    locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
    yield locale.setlocale(locale.LC_ALL)
    locale.setlocale(locale.LC_ALL, before)


def _overlapping(guard) -> str:
    """Two compiles as OpenVINO's cache does them (note the locale, set "C", put the noted one
    back), the second starting inside the first and ending after it: the locale left."""
    first_in, first_out = threading.Event(), threading.Event()

    def compile_like_openvino(entered, wait_for, done):
        with guard():
            found = locale.setlocale(locale.LC_ALL)
            locale.setlocale(locale.LC_ALL, "C")
            if entered is not None:
                entered.set()
            if wait_for is not None:
                assert wait_for.wait(10)
            locale.setlocale(locale.LC_ALL, found)
            if done is not None:
                done.set()

    second_in = threading.Event()
    first = threading.Thread(target=compile_like_openvino, args=(first_in, second_in, first_out))
    second = threading.Thread(target=lambda: (
        first_in.wait(10), compile_like_openvino(second_in, first_out, None)))
    first.start()
    second.start()
    first.join(20)
    second.join(20)
    return locale.setlocale(locale.LC_ALL)


def test_overlapping_compiles_leave_the_locale_they_found(utf8_locale):
    import contextlib

    assert _overlapping(contextlib.nullcontext) == "C"  # what OpenVINO alone leaves
    locale.setlocale(locale.LC_ALL, utf8_locale)
    assert _overlapping(keeping_locale) == utf8_locale
    assert locale.getpreferredencoding(False).lower().replace("-", "") == "utf8"


def test_a_locale_set_between_compiles_is_kept(utf8_locale):
    """Only what the compiles changed is put back: a locale set while none runs stays."""
    with keeping_locale():
        pass
    locale.setlocale(locale.LC_NUMERIC, "C.UTF-8")
    changed = locale.setlocale(locale.LC_ALL)
    with keeping_locale():
        locale.setlocale(locale.LC_ALL, "C")
    assert locale.setlocale(locale.LC_ALL) == changed
