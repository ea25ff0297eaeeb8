"""The CLI, second pass: outputs get the permissions any other tool would give them (the umask;
an overwritten file keeps its own), a JPEG whose record cannot fit is refused before the work
(and the infotext is left out when only the record fits), and config files nested past
reason are one `error:` line."""

from __future__ import annotations

import json
import os
import stat

import pytest
from PIL import Image

from fewstep import outputs
from fewstep.cli import main


def _base(tiny):
    return ["--model", str(tiny.sd15), "--lcm-lora", str(tiny.lcm_sd15), "--device", "cpu",
            "--quiet", "--width", "64", "--height", "64", "--steps", "1", "--seed", "1"]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("INFO:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error")
    return lines[0]


@pytest.fixture
def umask():
    """Sets the process umask for a test, and restores it."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- permissions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_new_outputs_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    written = outputs.write_atomically([(tmp_path / "a-1.png", b"1"),
                                        (tmp_path / "a-2.png", b"2")])
    for path in written:
        assert _mode(path) == 0o666 & ~mask, oct(_mode(path))


def test_an_overwritten_output_keeps_its_mode(tmp_path, umask):
    umask(0o077)
    target = tmp_path / "kept.png"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    outputs.write_atomically([(target, b"new")])
    assert target.read_bytes() == b"new" and _mode(target) == 0o644


def test_cli_outputs_follow_the_umask(tiny, tmp_path, umask):
    umask(0o022)
    out = tmp_path / "cat.png"
    assert main(["txt2img", "a cat", *_base(tiny), "--out", str(out)]) == 0
    assert _mode(out) == 0o644
    os.chmod(out, 0o664)
    assert main(["txt2img", "a cat", *_base(tiny), "--out", str(out), "--overwrite"]) == 0
    assert _mode(out) == 0o664
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"]  # no temporary file left


# -- JPEG records ---------------------------------------------------------------------------------

LONG = "\U0001F431" * 4000  # within the prompt limit; 12 bytes each in the record's JSON


def test_a_jpeg_record_that_cannot_fit_is_refused_before_loading(tiny, tmp_path, capsys,
                                                                 no_loading):
    out = tmp_path / "long.jpg"
    code = main(["txt2img", LONG, *_base(tiny), "--negative", LONG, "--out", str(out)])
    assert code != 0
    line = _one_error_line(capsys.readouterr().err)
    assert "out" in line and ".png" in line
    assert list(tmp_path.iterdir()) == []


def test_a_jpeg_keeps_its_record_when_the_infotext_cannot_fit(tiny, tmp_path):
    """A record that fits alone: the infotext (A1111's copy of the prompt) is what gives way."""
    from fewstep.records import read_record

    prompt = "\U0001F431" * 2400  # 12 bytes each in the record, 4 in the infotext
    out = tmp_path / "cat.jpg"
    assert main(["txt2img", prompt, *_base(tiny), "--negative", "\U0001F436" * 2400,
                 "--out", str(out)]) == 0
    record = read_record(out)
    assert record.request["prompt"] == prompt
    with Image.open(out) as image:
        assert image.getexif().get_ifd(0x8769).get(outputs.EXIF_USER_COMMENT) is None


def test_a_jpeg_with_room_keeps_both(tmp_path):
    from fewstep.records import Record

    record = Record(request={"prompt": "a cat", "steps": 1, "guidance": 1.0, "seed": 1,
                             "task": "txt2img"}, model="m", family="sd15", fewstep="0",
                    width=8, height=8)
    data = outputs.encode_image(Image.new("RGB", (8, 8)), ".jpg", record)
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    with Image.open(path) as image:
        exif = image.getexif()
        assert json.loads(exif[outputs.EXIF_IMAGE_DESCRIPTION])["request"]["prompt"] == "a cat"
        assert exif.get_ifd(0x8769)[outputs.EXIF_USER_COMMENT].startswith(b"UNICODE")


# -- config files -------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [100_000, 5_000, 990])
@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_deeply_nested_config_files_are_one_line(tiny, tmp_path, capsys, monkeypatch,
                                                 no_loading, depth, suffix):
    from fewstep.server.cli import main as serve_main

    monkeypatch.delenv("FEWSTEP_API_KEY", raising=False)
    config = tmp_path / f"deep{suffix}"
    nested = "[" * depth + "]" * depth
    config.write_text(json.dumps({"lora": "PLACE"}).replace('"PLACE"', nested)
                      if suffix == ".json" else f"lora = {nested}\n")
    code = serve_main(["--model", str(tiny.sd15), "--port", "0", "--config", str(config)])
    assert code != 0
    assert "config" in _one_error_line(capsys.readouterr().err) or "lora" in capsys.readouterr().err


@pytest.mark.parametrize("depth", [100_000, 990])
def test_deeply_nested_catalogue_variables_are_one_line(tiny, capsys, monkeypatch, no_loading,
                                                        depth):
    from fewstep.server.cli import main as serve_main

    monkeypatch.delenv("FEWSTEP_API_KEY", raising=False)
    monkeypatch.setenv("FEWSTEP_LORA", '{"a": ' + "[" * depth + "]" * depth + "}")
    code = serve_main(["--model", str(tiny.sd15), "--port", "0"])
    assert code != 0
    assert "FEWSTEP_LORA" in _one_error_line(capsys.readouterr().err)
