"""`fewstep.loading`: hub failures are recognised by huggingface_hub's error classes (anywhere in
the chain that diffusers re-raises them in), never by names or message text; half-precision
loads take the fp16 variant where there is one and the plain weights where there is not."""

from __future__ import annotations

import pytest

from fewstep.build import build_engine
from fewstep.errors import NotFound, OfflineError
from fewstep.loading import hub_error, parse_ref


def _response(status: int):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://hub.invalid/x"))


def _raised_inside(inner: BaseException) -> OSError:
    """What diffusers does: raise an OSError while handling the hub's own error."""
    try:
        try:
            raise inner
        except Exception:
            raise OSError("owner/name does not appear to have a file named config.json")
    except OSError as outer:
        return outer


REF = parse_ref("owner/name", "model")


def test_missing_repo_and_gated_repo_by_class():
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    missing = RepositoryNotFoundError("nope", response=_response(404))
    assert isinstance(hub_error(REF, "model", _raised_inside(missing)), NotFound)
    gated = hub_error(REF, "model", GatedRepoError("gated", response=_response(403)))
    assert isinstance(gated, NotFound) and "gated" in gated.message


def test_offline_and_unreachable_by_class():
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    for inner in (LocalEntryNotFoundError("not cached"), OfflineModeIsEnabled("off"),
                  ConnectionError("down")):
        error = hub_error(REF, "controlnet", _raised_inside(inner))
        assert isinstance(error, OfflineError) and error.field == "controlnet"


@pytest.mark.parametrize("exc", [
    # look-alikes: the right names and texts, not the classes
    type("RepositoryNotFoundError", (Exception,), {})("Repository Not Found"),
    type("LocalEntryNotFoundError", (Exception,), {})("offline local_files_only"),
    ValueError("cannot find the requested files in the local cache; offline"),
])
def test_names_and_texts_are_not_recognised(exc):
    assert hub_error(REF, "model", exc) is None


def test_fp16_load_falls_back_when_no_variant(tiny):
    import torch

    engine = build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu",
                          dtype="fp16")
    assert engine.base.unet.dtype == torch.float16


@pytest.mark.parametrize("offline_env, why", [("1", "HF_HUB_OFFLINE is set"),
                                              (None, "the hub could not be reached")])
def test_an_unreachable_hub_fails_at_once_from_the_cache(monkeypatch, tmp_path, offline_env,
                                                         why):
    """Without a connection the hub is asked nothing (no retries): the cache answers, and the
    error says why and which option takes a local copy."""
    import time

    import huggingface_hub

    from fewstep import loading

    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(loading, "_hub_reachable", lambda: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    asked = []
    original = huggingface_hub.hf_hub_download

    def download(*args, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    for field, hint in (("model", "--model /path/to/"), ("lcm_lora", "--lcm-lora /path/to/"),
                        ("tiny_vae", "--tiny-vae /path/to/")):
        began = time.monotonic()
        with pytest.raises(OfflineError) as info:
            loading.hub_file(parse_ref("owner/name", field), "config.json", field)
        assert time.monotonic() - began < 5
        assert why in info.value.message and hint in info.value.message
        assert info.value.field == field
    assert asked and all(asked)  # local_files_only every time
