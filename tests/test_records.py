"""`fewstep.records`: the record is one typed, versioned model; a bad one is refused with an
error naming its field, before anything runs."""

import json

import pytest

from fewstep.errors import InvalidRequest
from fewstep.records import RECORD_VERSION, Record, parse_record


def _data(**changes):
    data = {"request": {"task": "txt2img", "prompt": "x", "seed": 1, "num_images": 2,
                        "loras": [{"ref": "/l/a.safetensors", "weight": 0.5}]},
            "model": "/m/model", "family": "sd15", "lcm_lora": "/m/lcm", "fewstep": "0.1.0"}
    return {**data, **changes}


def test_a_record_without_a_version_is_of_the_first():
    record = parse_record(json.dumps(_data()))
    assert record.version == 1 == RECORD_VERSION and record.task == "txt2img"
    assert "version" in record.to_dict() and "batch_index" not in record.to_dict()
    assert parse_record(record.at(1).to_json()) == record.at(1)


@pytest.mark.parametrize("changes, field", [
    ({"batch_index": 2}, "batch_index"),  # the request made 2 outputs: 0 and 1
    ({"batch_index": -1}, "batch_index"),
    ({"batch_index": "x"}, "batch_index"),
    ({"version": RECORD_VERSION + 1}, "version"),
    ({"request": {"task": "paint", "prompt": "x"}}, "request"),
    ({"model": None}, "model"),
])
def test_a_bad_record_names_its_field(changes, field):
    with pytest.raises(InvalidRequest) as info:
        parse_record(_data(**changes), "'x.png'")
    assert info.value.field == field and info.value.message.startswith("'x.png'")


@pytest.mark.parametrize("text", ["not json", "[1, 2]", json.dumps({"model": "m"})])
def test_text_that_is_no_record_is_refused(text):
    with pytest.raises(InvalidRequest) as info:
        parse_record(text)
    assert info.value.field == "path"


def test_references_are_found_and_replaced_by_path():
    record = Record(**_data(tiny_vae="/m/taesd"))
    assert record.references() == [("model", "model"), ("lcm_lora", "lcm"),
                                   ("tiny_vae", "tiny_vae"), ("request.loras.0.ref", "lora")]
    named = record.with_values({"request.loras.0.ref": "paper", "model": "dream"},
                               catalog_names=["model", "request.loras.0.ref"])
    assert named.request["loras"][0] == {"ref": "paper", "weight": 0.5}
    assert named.model == "dream" and record.model == "/m/model"  # a copy
    assert named.value("request.loras.0.ref") == "paper" and named.value("nope.0") is None
