"""Shared fixtures: the tiny models are built once per test session (a few seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# engines run torch unless a test asks for OpenVINO (tests/test_openvino.py): every other test
# compares torch paths, and converting each test's engine would add seconds to each
os.environ.setdefault("FEWSTEP_OPENVINO", "off")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from fewstep.testing import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def sd15_engine(tiny):
    from fewstep.build import build_engine

    return build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu",
                        dtype="fp32")


@pytest.fixture(scope="session")
def coarse_adapter(tmp_path_factory):
    """An SD1.5 T2I-Adapter that downscales by 16 overall: sizes must be multiples of 16."""
    import torch
    from diffusers import T2IAdapter

    from fewstep.testing import _BLOCKS

    torch.manual_seed(0)
    adapter = T2IAdapter(in_channels=3, channels=list(_BLOCKS), num_res_blocks=1,
                         downscale_factor=8, adapter_type="full_adapter")
    assert adapter.total_downscale_factor == 16
    folder = tmp_path_factory.mktemp("coarse-adapter")
    adapter.save_pretrained(folder)
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """User errors are found before the model loads: loading one fails the test."""
    import fewstep.build

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(fewstep.build, "_load", refuse)


def pytest_configure(config):
    # tiny models: one thread is faster than two fighting over the cores (and the suite shares
    # the machine with other processes); FEWSTEP_TEST_THREADS overrides it
    import torch

    torch.set_num_threads(int(os.environ.get("FEWSTEP_TEST_THREADS", "1")))
