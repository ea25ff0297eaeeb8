"""`fewstep`'s top level: every public name resolves, shows in `dir()` and tab completion, and
importing the package stays light."""

import subprocess
import sys

import pytest

import fewstep


def test_every_public_name_resolves_and_is_listed():
    listed = dir(fewstep)
    for name in fewstep.__all__:
        assert name in listed, name
        assert getattr(fewstep, name) is not None
    # the names a README reader meets first
    for name in ("Engine", "Job", "Result", "Txt2ImgRequest", "build_engine", "quiet_libraries"):
        assert name in fewstep.__all__ and name in listed


def test_job_is_the_engines_job():
    from fewstep.engine import Job

    assert fewstep.Job is Job


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="'Engin'"):
        fewstep.Engin  # noqa: B018


def test_importing_fewstep_does_not_import_torch():
    code = "import sys, fewstep; print('torch' in sys.modules, fewstep.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "False" and out[1]
