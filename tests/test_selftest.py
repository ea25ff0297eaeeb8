"""`fewstep selftest`: a line per case as it finishes, the engine of each model built for its
cases' calls (nothing built ahead that they do not run)."""

import re

import fewstep.selftest as selftest


def test_each_case_is_reported_as_it_finishes(monkeypatch, capsys, tmp_path):
    every = selftest.cases()
    picked = [every[0], every[3]]  # SD1.5 txt2img and img2img: one engine
    monkeypatch.setattr(selftest, "cases", lambda: picked)
    built = []
    original = selftest._engine_for

    def engine_for(case, models, together):
        engine = original(case, models, together)
        built.append(engine)
        return engine

    monkeypatch.setattr(selftest, "_engine_for", engine_for)
    assert selftest.run_selftest(tmp_path / "models") == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if re.match(r"\[\d/2\]", line)]
    assert len(lines) == 2 and lines[0].startswith("[1/2] sd15 txt2img: pass (max |diff|")
    assert lines[1].startswith("[2/2] sd15 img2img: pass")
    assert "2 passed, 0 failed" in out
    assert len(built) == 1  # one engine for the model's two cases
