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


# -- A1111 infotext ------------------------------------------------------------------------
# AUTOMATIC1111's reader (modules/infotext_utils.py, parse_generation_parameters), reduced to
# its parsing: the prompt lines, "Negative prompt:", and the last line of `key: value` fields,
# where a value holding a comma or a colon is JSON-quoted.

import json as _json
import re

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return _json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str) -> dict:
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for k, v in re_param.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        m = re_imagesize.match(v)
        if m is not None:
            res[f"{k}-1"] = m.group(1)
            res[f"{k}-2"] = m.group(2)
        else:
            res[k] = v
    return res


def _record(model="/models/dreamshaper-7", **request):
    from fewstep.records import Record

    base = {"task": "txt2img", "prompt": "a lighthouse, at dusk: oil",
            "negative_prompt": "blur, noise", "steps": 4, "guidance": 1.5, "seed": 42,
            "num_images": 1, "loras": []}
    return Record(request={**base, **request}, model=model, family="sd15", width=512,
                  height=768, lcm_lora="/models/lcm-lora-sdv1-5", lcm_weight=1.0,
                  fewstep="0.1.0")


def test_infotext_with_several_loras_parses_field_by_field():
    record = _record(loras=[{"ref": "/l/papercut.safetensors", "weight": 0.8},
                            {"ref": "ink", "weight": 1.0},
                            {"ref": "owner/repo/pixel-art.safetensors", "weight": -0.5}],
                     num_images=2, strength=0.6)
    parsed = parse_generation_parameters(outputs.a1111_parameters(record, 1))
    assert parsed["Prompt"] == ("a lighthouse, at dusk: oil <lora:papercut:0.8> <lora:ink:1> "
                                "<lora:pixel-art:-0.5>")
    assert parsed["Negative prompt"] == "blur, noise"
    assert parsed["Steps"] == "4" and parsed["Sampler"] == "LCM"
    assert parsed["CFG scale"] == "1.5" and parsed["Seed"] == "42"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "768")
    assert parsed["Model"] == "dreamshaper-7"
    assert parsed["Batch size"] == "2" and parsed["Batch pos"] == "1"
    assert parsed["Denoising strength"] == "0.6"
    assert parsed["LCM-LoRA"] == "lcm-lora-sdv1-5: 1"
    assert parsed["Version"] == "fewstep 0.1.0"


def test_infotext_quotes_values_with_commas_and_colons():
    record = _record(model="/models/a, b: c")
    parsed = parse_generation_parameters(outputs.a1111_parameters(record))
    assert parsed["Model"] == "a, b: c" and parsed["Seed"] == "42"
    assert parsed["Prompt"] == "a lighthouse, at dusk: oil"  # no tags without LoRAs


def test_infotext_tags_use_catalogue_names_in_service_records():
    from fewstep.server.catalog import Catalog

    catalog = Catalog(model_name="dream", loras={"paper": "/l/papercut.safetensors"},
                      hidden={"dream": "/models/dreamshaper-7",
                              "lcm-lora": "/models/lcm-lora-sdv1-5"})
    record = _record(loras=[{"ref": "/l/papercut.safetensors", "weight": 0.7}])
    parsed = parse_generation_parameters(outputs.a1111_parameters(catalog.redact_record(record)))
    assert parsed["Prompt"].endswith("<lora:paper:0.7>")
    assert parsed["Model"] == "dream"


def test_unwritable_folder_is_refused(tmp_path):
    with pytest.raises(InvalidRequest, match="cannot write"):
        outputs.check_output_path("/proc/x.png", animation=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidRequest, match="not a folder"):
        outputs.check_output_path(blocker / "x.png", animation=False)
    with pytest.raises(InvalidRequest, match="usable path"):
        outputs.check_output_path(str(tmp_path / "a\0b.png"), animation=False)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # the probe is gone
