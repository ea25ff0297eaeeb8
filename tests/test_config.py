"""One configuration model: flags, FEWSTEP_* variables and the config file come from the same
fields, in that order of precedence, and a bad value from any of them names where it came from."""

import argparse
import json

import pytest

from fewstep.config import ServeSettings, Settings, add_arguments, given, load
from fewstep.errors import InvalidRequest


def _flags(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, ServeSettings)
    return given(parser.parse_args(list(argv)), ServeSettings)


def test_flags_over_environment_over_file_over_defaults(tmp_path, monkeypatch):
    config = tmp_path / "serve.toml"
    config.write_text('port = 9000\nqueue-size = 3\ngrace = 5\nmodel_config = "/cfg"\n'
                      'max_steps = 12\n[lora]\na = "/x/a.safetensors"\n')
    monkeypatch.setenv("FEWSTEP_QUEUE_SIZE", "4")
    monkeypatch.setenv("FEWSTEP_GRACE", "6")
    monkeypatch.setenv("FEWSTEP_MOTION_ADAPTER", '{"m": "/x/motion"}')
    settings = load(ServeSettings, _flags("--config", str(config), "--grace", "7",
                                          "--controlnet", "edges=/x/cn"))
    assert settings.port == 9000  # file
    assert settings.queue_size == 4  # environment over file
    assert settings.grace == 7.0  # flag over environment
    assert settings.model_config_dir == "/cfg"  # the file key earlier versions read
    assert settings.lora == {"a": "/x/a.safetensors"}
    assert settings.controlnet == {"edges": "/x/cn"}
    assert settings.motion_adapter == {"m": "/x/motion"}
    assert settings.body_timeout_s == 30.0 and settings.public_url is None
    assert settings.job_retention_bytes == 256 * 1024 * 1024
    assert settings.max_batch is None and settings.batch_wait_ms == 0.0
    assert settings.limits().max_steps == 12  # limits travel to the engine's Settings


def test_json_file_lists_and_the_limits_model(tmp_path, monkeypatch):
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"lora": ["a=/x/a", "b=/x/b"], "public_url":
                                  "https://fewstep.example/"}))
    settings = load(ServeSettings, {"config": str(config)})
    assert settings.lora == {"a": "/x/a", "b": "/x/b"}
    monkeypatch.setenv("FEWSTEP_MAX_STEPS", "9")
    assert Settings.from_env().max_steps == 9
    assert Settings.from_env(max_steps=3, max_frames=None).max_frames == 64
    assert Settings(max_pixels=64 * 32).max_pixels == 2048


@pytest.mark.parametrize("source, value, where", [
    ("flag", ["--port", "70000"], "--port"),
    ("flag", ["--port", "abc"], "--port"),
    ("flag", ["--queue-size", "0"], "--queue-size"),
    ("flag", ["--device", "foo"], "--device"),
    ("flag", ["--public-url", "ftp://x"], "--public-url"),
    ("flag", ["--lora", "../up=/x"], "--lora"),
    ("flag", ["--lora", "no-equals-sign"], "--lora"),
    ("flag", ["--grace", "nan"], "--grace"),
    ("flag", ["--max-batch", "0"], "--max-batch"),
    ("env", ("FEWSTEP_PORT", "-1"), "FEWSTEP_PORT"),
    ("env", ("FEWSTEP_LORA", "{not json"), "FEWSTEP_LORA"),
    ("env", ("FEWSTEP_MAX_STEPS", "0"), "FEWSTEP_MAX_STEPS"),
    ("file", "port = 65536\n", "port in "),
    ("file", "speed = \"warp\"\n", "speed in "),
    ("file", "surprise = 1\n", "unknown key 'surprise'"),
    ("file", "port = \n", "is not valid"),
])
def test_a_bad_value_names_its_option(tmp_path, monkeypatch, source, value, where):
    flags = {}
    if source == "flag":
        flags = _flags(*value)
    elif source == "env":
        monkeypatch.setenv(*value)
    else:
        config = tmp_path / "serve.toml"
        config.write_text(value)
        flags = {"config": str(config)}
    with pytest.raises(InvalidRequest) as info:
        load(ServeSettings, flags)
    assert where in info.value.message
    assert "\n" not in info.value.message


def test_flags_come_from_the_model():
    parser = argparse.ArgumentParser()
    add_arguments(parser, ServeSettings)
    options = {s for action in parser._actions for s in action.option_strings}
    for name in ServeSettings.model_fields:
        if name != "model_config_dir":
            assert f"--{name.replace('_', '-')}" in options
    assert "--model-config" in options and "--body-timeout-s" in options
    assert "FEWSTEP_JOB_RETENTION_BYTES" in parser.format_help()
