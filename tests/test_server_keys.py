"""API keys: one that no client could ever send is refused at start (flag, environment, config
file, and `create_app` itself); Bearer and Basic compare the same bytes, so a key that works
with one works with the other."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from helpers.server import make_app


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("INFO:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error")
    return lines[0]


BAD_KEYS = ["   ", "", " key", "key ", "two\nlines", "tab\tkey", "bell\x07", "ключ", "clé"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_that_can_never_match_fail_the_start(tiny, capsys, monkeypatch, no_loading, key):
    from fewstep.server.cli import main

    monkeypatch.delenv("FEWSTEP_API_KEY", raising=False)
    code = main(["--model", str(tiny.sd15), "--port", "0", "--api-key", key])
    assert code != 0
    line = _one_error_line(capsys.readouterr().err)
    assert "api-key" in line or "api_key" in line


@pytest.mark.parametrize("key", ["   ", "two\nlines", "ключ"])
def test_keys_from_the_environment_and_the_config_are_checked(tiny, tmp_path, capsys,
                                                              monkeypatch, no_loading, key):
    import json

    from fewstep.server.cli import main

    monkeypatch.setenv("FEWSTEP_API_KEY", key)
    assert main(["--model", str(tiny.sd15), "--port", "0"]) != 0
    assert "FEWSTEP_API_KEY" in _one_error_line(capsys.readouterr().err)
    monkeypatch.delenv("FEWSTEP_API_KEY")
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"api_key": key}))
    assert main(["--model", str(tiny.sd15), "--port", "0", "--config", str(config)]) != 0
    assert "api_key" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("key", ["   ", "two\nlines", "ключ"])
def test_create_app_refuses_such_keys(key):
    from fewstep.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as info:
        make_app(api_key=key)
    assert info.value.field == "api_key"


def test_printable_keys_work_with_bearer_and_basic():
    key = "k3y-with:colon and space~!"
    with TestClient(make_app(api_key=key), raise_server_exceptions=False) as client:
        assert client.get("/v1/status").status_code == 401
        bearer = client.get("/v1/status", headers={"Authorization": f"Bearer {key}"})
        assert bearer.status_code == 200
        basic = base64.b64encode(f"user:{key}".encode()).decode()
        assert client.get("/v1/status",
                          headers={"Authorization": f"Basic {basic}"}).status_code == 200


def test_both_schemes_compare_the_same_bytes():
    """A key's UTF-8 bytes, whether they arrive raw in a Bearer header (servers hand header
    bytes over as latin-1 text) or base64-encoded in Basic."""
    from fewstep.server.auth import key_matches

    key = "ключ"
    raw = key.encode("utf-8").decode("latin-1")  # how the ASGI header reaches the middleware
    basic = base64.b64encode(b"user:" + key.encode("utf-8")).decode()
    assert key_matches(f"Bearer {raw}", key)
    assert key_matches(f"Basic {basic}", key)
    assert not key_matches(f"Bearer {key}", key + "x")
    latin1 = base64.b64encode(b"user:" + key.encode("latin-1", "replace")).decode()
    assert not key_matches(f"Basic {latin1}", key)
