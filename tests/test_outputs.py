"""Atomic writing: an error leaves no partial or half-numbered files."""

from pathlib import Path

import pytest

from fewstep import outputs
from fewstep.errors import InvalidRequest


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    targets = [(tmp_path / "a-1.png", b"one"), (tmp_path / "a-2.png", b"two")]
    real_replace = outputs.os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    with pytest.raises(OSError):
        outputs.write_atomically(targets)
    assert list(tmp_path.iterdir()) == []


def test_numbering_and_suffixes(tmp_path):
    assert outputs.numbered_paths(Path("x.png"), 1) == [Path("x.png")]
    assert [p.name for p in outputs.numbered_paths(Path("x.png"), 10)][:2] == ["x-01.png",
                                                                                 "x-02.png"]
    with pytest.raises(InvalidRequest):
        outputs.check_output_path(tmp_path / "x.gif", animation=False)
    with pytest.raises(InvalidRequest):
        outputs.check_output_path(tmp_path / "x.png", animation=True)
    with pytest.raises(InvalidRequest):
        outputs.check_output_path(tmp_path / "missing" / "x.png", animation=False)
