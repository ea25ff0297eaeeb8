"""The benchmark's code runs end to end on the tiny models (a smoke run, not a measurement)."""

from __future__ import annotations

import json

import pytest

from fewstep import bench


def test_bench_tiny_smoke(tmp_path):
    out = tmp_path / "results"
    json_path = tmp_path / "bench.json"
    code = bench.main(["--tiny", "--family", "sd15", "--resolution", "32", "--steps", "2",
                       "--batch", "1,2", "--repeats", "2", "--device", "cpu",
                       "--cold-start", "", "--workdir", str(tmp_path / "work"),
                       "--out", str(out), "--json", str(json_path), "--name", "smoke"])
    assert code == 0
    data = json.loads(json_path.read_text())
    assert data["device"] and data["versions"]["torch"] and data["versions"]["diffusers"]
    assert data["config"]["family"] == "sd15" and data["config"]["batch"] == [1, 2]
    for mode in ("recipe", "default", "fastest"):
        r = data["results"][mode]
        for key in ("latency_ms_p50", "latency_ms_p90", "images_per_s", "peak_memory_mb"):
            assert isinstance(r[key], (int, float)) and r[key] > 0, (mode, key)
        assert set(r["images_per_s_by_batch"]) == {"1", "2"}
        assert r["image_finite"]
    for mode in ("default", "fastest"):
        ratio = data["ratios"][mode]
        assert ratio["latency_speedup"] == pytest.approx(
            data["results"]["recipe"]["latency_ms_p50"] / data["results"][mode]["latency_ms_p50"],
            rel=1e-2)
        assert ratio["throughput_ratio"] > 0 and ratio["memory_ratio"] > 0
    # fewstep's default equals the recipe on the same weights; guidance 1 does not double
    assert data["agreement"]["default"] <= 1e-4
    assert data["results"]["recipe"]["breakdown"]["unet_batch_per_image_at_guidance_1"] == 1
    assert data["results"]["fastest"]["fast_path"]["applied"]["tiny_vae"].endswith("taesd")
    assert "| recipe |" in (out / "smoke.md").read_text()
    assert (out / "smoke.png").stat().st_size > 0


def test_ssd1b_config_has_published_sizes():
    """The SSD-1B UNet config gives the published sizes (meta device: no memory used)."""
    import torch
    from diffusers import UNet2DConditionModel

    from fewstep.families import LCM_TARGET_SUFFIXES

    with torch.device("meta"):
        unet = UNet2DConditionModel(**bench.SSD1B_UNET)
    params = sum(p.numel() for p in unet.parameters())
    lora = 0
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(LCM_TARGET_SUFFIXES):
            lora += bench.LCM_RANK * (m.in_features + m.out_features)
        elif isinstance(m, torch.nn.Conv2d) and name.endswith(LCM_TARGET_SUFFIXES):
            lora += bench.LCM_RANK * (m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                                      + m.out_channels)
    assert 1.30e9 < params < 1.36e9
    assert 104e6 < lora < 106e6  # "105M for SSD-1B"
