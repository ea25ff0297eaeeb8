"""benchmarks/peers.py, the parts that need none of the peers' packages: the weights every contender
loads (the LCM-LoRA fused in, the same weights as one original-layout file) and the table, which
keeps a contender that could not run with its reason instead of dropping it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("fewstep_peers_bench",
                                                  REPO / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(peers, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    fused = peers.export_fused(tiny.sd15, Path(tiny.lcm_sd15), out / "fused")
    single = peers.export_single_file(fused, out / "fused.safetensors")
    return fused, single


def _unet_out(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 16, 16, generator=gen)
    embeds = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(sample, torch.tensor(999), embeds, return_dict=False)[0]


def test_the_export_carries_the_lcm_lora_fused_and_the_lcm_scheduler(exported, tiny):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from fewstep.reference import recipe_pipeline

    fused, _ = exported
    pipe = StableDiffusionPipeline.from_pretrained(str(fused), safety_checker=None)
    recipe = recipe_pipeline("txt2img", str(tiny.sd15), str(tiny.lcm_sd15))
    base = StableDiffusionPipeline.from_pretrained(str(tiny.sd15), safety_checker=None)
    got, want = _unet_out(pipe.unet), _unet_out(recipe.unet)
    # the LoRA changes the output well beyond the tolerance: a missing fuse cannot pass
    assert (want - _unet_out(base.unet)).abs().max() > 1e-2
    assert (got - want).abs().max() < 1e-5
    assert isinstance(pipe.scheduler, LCMScheduler)
    # no adapter layers left behind: the peers load plain weights
    assert not any("lora" in k for k in pipe.unet.state_dict())


def test_the_text_encoder_is_written_with_the_published_key_prefix(exported, tiny):
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    fused, _ = exported
    keys = [k for f in (fused / "text_encoder").glob("*.safetensors") for k in load_file(str(f))]
    assert keys and all(k.startswith("text_model.") for k in keys)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        got = CLIPTextModel.from_pretrained(str(fused / "text_encoder"))(ids)[0]
        want = CLIPTextModel.from_pretrained(str(Path(tiny.sd15) / "text_encoder"))(ids)[0]
    assert torch.equal(got, want)


def test_the_single_file_holds_the_fused_weights(exported):
    from diffusers import StableDiffusionPipeline

    fused, single = exported
    loaded = StableDiffusionPipeline.from_single_file(str(single), config=str(fused),
                                                      local_files_only=True,
                                                      safety_checker=None)
    folder = StableDiffusionPipeline.from_pretrained(str(fused), safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(folder, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want if k in got), name
        assert set(want) <= set(got) | {"text_model.embeddings.position_ids"}, name


def _data(results: dict) -> dict:
    return {"machine": {"cpu": "Test CPU", "cores": 2, "memory_gb": 24.0, "system": "Linux"},
            "config": {"resolution": 256, "steps": 4, "repeats": 3, "models": "test"},
            "preparation": {"OpenVINO export (int8)": {"error": "Traceback\nValueError: boom"}},
            "versions": {"main": {"torch": "2.13.0"}, "peers": {"openvino": "2026.4.1"}},
            "results": results, "notes": ["a note"],
            "load_average_1min": {"start": 1.5, "end": 2.5}}


def _row(table: str, name: str) -> list[str]:
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_table_compares_with_the_recipe_and_keeps_contenders_that_did_not_run(peers):
    results = {
        "recipe": {"first": {"start_to_first_image_s": 20.0, "load_s": 4.0,
                             "warm_ms_p50": 12000.0, "warm_cpu_s_p50": 24.0,
                             "peak_rss_mb": 5000.0, "load_average_1min": [1.0, 1.2]}},
        "fewstep-auto": {"first": {"start_to_first_image_s": 40.0, "load_s": 30.0,
                                   "warm_ms_p50": 4000.0, "warm_cpu_s_p50": 8.0,
                                   "peak_rss_mb": 6500.0, "load_average_1min": [1.2, 1.3],
                                   "max_pixel_diff_vs_recipe": 2e-06,
                                   "details": {"fast_path": {"openvino": "on (f32; unet + vae "
                                                             "decoder; 256x256; cache=/x)"}}},
                         "second": {"start_to_first_image_s": 15.5, "peak_rss_mb": 6000.0}},
        "fewstep-fastest": {"first": {"warm_ms_p50": 6000.0, "details": {"fast_path": {
            "openvino": "skipped: needs 4.8 GiB free, 3.8 GiB are"}}}},
        "genai-int8": {"error": "the OpenVINO export it loads failed (ir_int8)"},
        "sdcpp-q8_0": {"first": {"error": "Traceback ...\nRuntimeError: made no image",
                                 "load_average_1min": [1.3, 1.3]}},
    }
    table = peers.markdown(_data(results))
    auto = _row(table, "fewstep-auto")
    assert auto[5:10] == ["4000.0", "3.0x", "8.0", "6500.0", "1.3x"]
    assert "second start (warm cache): 15.5 s" in auto[-1] and "2e-06" in auto[-1]
    # which path fewstep took is in the row: a fast path that was skipped must not pass unseen
    assert "OpenVINO on (f32; unet + vae decoder)" in auto[-1]
    assert "OpenVINO skipped: needs 4.8 GiB free" in _row(table, "fewstep-fastest")[-1]
    assert _row(table, "recipe")[6] == "1.0x"
    # the contenders that did not run stay in the table, with why
    assert "did not run: the OpenVINO export it loads failed" in _row(table, "genai-int8")[-1]
    sdcpp = _row(table, "sdcpp-q8_0")
    assert sdcpp[3] == "—" and "did not run: RuntimeError: made no image" in sdcpp[-1]
    assert "OpenVINO export (int8): failed: ValueError: boom" in table
    assert "Test CPU" in table and "openvino 2026.4.1" in table and "a note" in table
    assert "1.5 at the start, 2.5" in table


def test_an_unknown_contender_is_refused_before_anything_runs(peers, capsys, tmp_path):
    code = peers.main(["--contenders", "recipe,nope", "--workdir", str(tmp_path / "w")])
    assert code == 2
    assert "error: --contenders: unknown nope" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_the_written_results_name_no_folder_of_this_machine(peers, tmp_path):
    work = tmp_path / "work"
    data = _data({"recipe": {"first": {"warm_ms_p50": 1.0, "details": {
        "cache": str(work / "caches" / "recipe"), "cli": str(peers.REPO / "x" / "optimum-cli")}}}})
    peers.write(data, tmp_path / "out", "run", work)
    text = (tmp_path / "out" / "run.json").read_text()
    assert "<workdir>/caches/recipe" in text and "<repo>/x/optimum-cli" in text
    assert str(tmp_path) not in text and str(peers.REPO) not in text
    assert (tmp_path / "out" / "run.md").read_text().startswith("# Peers: SD1.5 256x256")
