"""`fewstep.build`: every check that configs and file headers allow comes before anything loads,
and what is built ahead is only what will run."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.cli import model_flags, one_error_line
from PIL import Image

from fewstep.build import build_engine, inspect
from fewstep.cli import main
from fewstep.errors import (InvalidRequest, LoraError, ModelError, NotFound, OfflineError,
                            UnsafeFormat)
from fewstep.selftest import sample_image
from fewstep.tasks import AnimateRequest, ControlNetRequest, T2IAdapterRequest, Txt2ImgRequest


# -- the blueprint: what the configs and headers say, nothing loaded --------------------------

@pytest.mark.parametrize("name, family, native, inpaint", [
    ("sd15", "sd15", 64, False), ("sdxl", "sdxl", 64, False), ("ssd1b", "ssd-1b", 64, False),
    ("sd15_inpaint", "sd15", 64, True), ("sd15_single_file", "sd15", 512, False),
])
def test_the_blueprint_reads_configs_and_headers_only(tiny, no_loading, name, family, native,
                                                      inpaint):
    blueprint = inspect(model=str(getattr(tiny, name)), lcm_lora="none", device="cpu")
    assert (blueprint.family.name, blueprint.inpaint_only) == (family, inpaint)
    # a single file without its configs: its family's size, the configs it will load with
    assert blueprint.native_size == native


def test_a_single_file_with_its_configs_takes_their_size(tiny, no_loading):
    blueprint = inspect(model=str(tiny.sd15_single_file), model_config_dir=str(tiny.sd15),
                        lcm_lora="none", device="cpu")
    assert blueprint.native_size == 64


def test_requests_are_planned_against_the_blueprint(tiny, no_loading, coarse_adapter):
    blueprint = inspect(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu")
    call = blueprint.plan(Txt2ImgRequest(prompt="x"))
    assert (call.width, call.height) == (64, 64) and call.seed is not None
    # a T2I-Adapter's own downscale factor, read from its config (it is not loaded)
    with pytest.raises(InvalidRequest) as info:
        blueprint.plan(T2IAdapterRequest(prompt="x", control_image=sample_image(),
                                         adapter=str(coarse_adapter), width=72, height=64))
    assert info.value.field == "width" and "multiple of 16" in info.value.message
    with pytest.raises(ModelError) as info:
        inspect(model=str(tiny.sd15_inpaint), lcm_lora="none", device="cpu").plan(
            Txt2ImgRequest(prompt="x"))
    assert info.value.field == "model"


# -- misfits are refused before anything loads ------------------------------------------------

def test_unknown_and_unsafe_models(tmp_path, monkeypatch):
    with pytest.raises(NotFound) as info:
        build_engine(model=str(tmp_path / "nope"))
    assert info.value.field == "model"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(UnsafeFormat):
        build_engine(model=str(ckpt))
    with pytest.raises(UnsafeFormat):
        build_engine(model=str(tmp_path / "weights.bin"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:
        build_engine(model="some-org/not-cached-model")
    assert "--model /path/to/diffusers-folder" in info.value.message


def test_lcm_lora_of_another_family_is_refused(tiny):
    from fewstep.errors import LoraError

    with pytest.raises(LoraError):
        build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sdxl), device="cpu")


def test_family_detection(tiny):
    from fewstep.families import detect_family
    import json

    names = [detect_family(json.loads((p / "unet" / "config.json").read_text())).name
             for p in (tiny.sd15, tiny.sdxl, tiny.ssd1b, tiny.sd15_inpaint)]
    assert names == ["sd15", "sdxl", "ssd-1b", "sd15"]


def test_a_family_that_does_not_fit_the_model_is_refused_before_loading(tiny):
    with pytest.raises(ModelError) as info:
        build_engine(model=str(tiny.sdxl), family="sd15", lcm_lora=str(tiny.lcm_sd15), device="cpu")
    assert info.value.field == "family" and "sdxl" in info.value.message
    with pytest.raises(ModelError) as info:
        build_engine(model=str(tiny.sd15), family="sdxl", lcm_lora=str(tiny.lcm_sdxl), device="cpu")
    assert info.value.field == "family"
    # SSD-1B shares SDXL's layout: naming the other one only changes the defaults
    engine = build_engine(model=str(tiny.ssd1b), family="sdxl", lcm_lora="none", device="cpu",
                          speed="off")
    assert engine.family.name == "sdxl"



def test_a_lora_of_another_family_is_refused_before_loading(tiny, no_loading):
    with pytest.raises(LoraError) as info:
        build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu",
                     loras={"lora.style": str(tiny.style_sdxl_ldm)})
    assert info.value.field == "lora.style"
    with pytest.raises(LoraError) as info:  # the LCM-LoRA too
        build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sdxl), device="cpu")
    assert info.value.field == "lcm_lora"


def test_a_motion_lora_passes_the_check_and_preloads_only_with_animations(tiny):
    engine = build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu",
                          speed="off", loras={"lora.motion": str(tiny.motion_lora)})
    assert not engine.current_loras
    result = engine.generate(AnimateRequest(prompt="x", seed=1, steps=2, num_frames=2,
                                            motion_adapter=str(tiny.motion_adapter),
                                            loras=[{"ref": str(tiny.motion_lora)}]))
    assert result.images.shape[:2] == (1, 2)


@pytest.mark.parametrize("kind, given, other", [
    ("controlnet", "adapter_sd15", "--adapter"),
    ("adapter", "controlnet", "--controlnet"),
    ("motion_adapter", "controlnet", "--controlnet"),
])
def test_a_component_of_the_wrong_kind_is_refused_in_one_line(tiny, no_loading, kind, given,
                                                              other):
    with pytest.raises(ModelError) as info:
        build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu",
                     components={kind: {f"{kind}.x": str(getattr(tiny, given))}})
    assert info.value.field == f"{kind}.x" and other in info.value.message


def test_a_loaded_engine_refuses_the_wrong_kind_too(sd15_engine, tiny):
    with pytest.raises(ModelError) as info:
        sd15_engine.generate(ControlNetRequest(prompt="x", seed=1, control_image=sample_image(),
                                               controlnet=str(tiny.adapter_sd15)))
    assert info.value.field == "controlnet" and "--adapter" in info.value.message


@pytest.mark.parametrize("args, field", [
    (["txt2img", "x", "--lora", "MODELS/style-sdxl-ldm.safetensors"], "--lora (the first)"),
    (["txt2img", "x", "--lcm-lora", "MODELS/lcm-lora-sdxl"], "--lcm-lora"),
    (["controlnet", "x", "--control-image", "INPUT", "--controlnet",
      "MODELS/t2i-adapter-sd15"], "--controlnet"),
    (["controlnet", "x", "--control-image", "INPUT", "--controlnet",
      "MODELS/controlnet-sdxl"], "--controlnet"),
    (["t2i-adapter", "x", "--control-image", "INPUT", "--adapter", "MODELS/controlnet"],
     "--adapter"),
    (["t2i-adapter", "x", "--control-image", "INPUT", "--adapter", "COARSE", "--width", "72",
      "--height", "64"], "--width"),
    (["animate", "x", "--motion-adapter", "MODELS/controlnet", "--out", "OUT/x.gif"],
     "--motion-adapter"),
])
def test_a_command_refuses_misfits_before_loading(tiny, tmp_path, capsys, no_loading,
                                                  coarse_adapter, args, field):
    image = tmp_path / "input.png"
    sample_image().save(image)
    out = tmp_path / "out"
    out.mkdir()
    args = [a.replace("MODELS", str(tiny.root)).replace("INPUT", str(image))
            .replace("OUT", str(out)).replace("COARSE", str(coarse_adapter)) for a in args]
    if "--out" not in args:
        args += ["--out", str(out / "x.png")]
    assert main([args[0], *model_flags(tiny), *args[1:]]) != 0
    assert f"({field})" in one_error_line(capsys.readouterr().err)
    assert list(out.iterdir()) == []


# -- what a one-shot command builds ahead: its own call, nothing else ---------------------------

@pytest.fixture
def converted(tmp_path, monkeypatch):
    """The sizes of the UNets and VAE decoders a command converted to OpenVINO."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FEWSTEP_OPENVINO", "auto")  # as a user has it (the suite turns it off)
    folder = tmp_path / "cache" / "fewstep" / "compile" / "openvino"
    # part[-WxH]-key-ovVERSION[.SHAPES].xml -> part[-WxH] (with .SHAPES: the same model fixed
    # to a call's shapes, sharing its weights file)
    return lambda: sorted({p.name.rsplit("-ov", 1)[0].rsplit("-", 1)[0]
                           for p in folder.glob("*.xml")})


def test_a_command_converts_the_size_it_generates(tiny, tmp_path, converted):
    """No --width: the model's native size (64 for the tiny model), not the family's 512."""
    out = tmp_path / "cat.png"
    assert main(["txt2img", "a cat", *model_flags(tiny), "--steps", "2", "--openvino", "on",
                 "--out", str(out)]) == 0
    assert converted() == ["decoder-64x64", "text_encoder", "unet-64x64"]


def test_a_command_runs_on_torch_then_prepares_the_next_run(tiny, tmp_path, converted,
                                                             capsys):
    """A cold cache: the image comes first, on torch (a conversion would not pay back within
    one call), then the converted models are prepared; the next run takes them from the cache
    with the same pixels. --no-prepare leaves the cache as it was."""
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    common = ["txt2img", "a cat", *model_flags(tiny), "--steps", "2", "--seed", "3"]
    assert main([*common, "--no-prepare", "--out", str(first)]) == 0
    assert converted() == [] and "prepared after it" in capsys.readouterr().err
    assert main([*common, "--overwrite", "--out", str(first)]) == 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    done = next(i for i, line in enumerate(lines) if line.startswith("done"))
    assert any("preparing the fast path" in line for line in lines[done:])  # after the image
    assert "fast path ready" in err and converted() == [
        "decoder-64x64", "text_encoder", "unet-64x64"]
    assert main([*common, "--out", str(second)]) == 0
    assert "from the cache" in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_the_fastest_preset_runs_then_prepares_from_float32_weights(tiny, tmp_path, converted,
                                                                   capsys):
    """Its torch run would be in half precision; the converted models are made from the
    float32 weights after it (tracing half weights with float32 inputs failed), their compiled
    blobs written for the next run, which starts from the cache."""
    common = ["txt2img", "a cat", *model_flags(tiny), "--steps", "2", "--seed", "3",
              "--speed", "fastest", "--tiny-vae", str(tiny.tiny_vae), "--width", "32",
              "--height", "32"]
    assert main([*common, "--out", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err
    assert "fast path ready" in err and converted() == [
        "decoder-32x32", "text_encoder", "unet-32x32"], err
    blobs = tmp_path / "cache" / "fewstep" / "compile" / "openvino" / "blobs"
    # compiled now, imported next time: each part for any batch, and for this call's batch
    assert len(list(blobs.rglob("*.blob"))) == 6 and len(list(blobs.rglob("*.ok"))) == 3
    assert main([*common, "--out", str(tmp_path / "b.png")]) == 0
    err = capsys.readouterr().err
    assert "from the cache" in err and "preparing" not in err
    assert np.isfinite(np.asarray(Image.open(tmp_path / "b.png"), dtype=float)).all()


def test_prepare_builds_ahead_for_a_model_and_sizes(tiny, converted, capsys):
    assert main(["prepare", *model_flags(tiny)[:-1], "--size", "64x48", "--size",
                 "32x32"]) == 0
    assert converted() == ["decoder-32x32", "decoder-64x48", "text_encoder", "unet-32x32",
                           "unet-64x48"]
    err = capsys.readouterr().err
    assert "converting the UNet for 64x48" in err and "prepared in" in err
    assert main(["prepare", *model_flags(tiny)[:-1], "--size", "64x48"]) == 0
    assert "openvino: on" in capsys.readouterr().err and "converting" not in err.split(
        "prepared in")[1]


def test_an_animation_builds_nothing_ahead(tiny, tmp_path, converted, capsys):
    """Its motion UNet is a copy the converted base UNet would never serve."""
    out = tmp_path / "cat.gif"
    assert main(["animate", "a cat", *model_flags(tiny), "--motion-adapter", str(tiny.motion_adapter),
                 "--steps", "2", "--num-frames", "2", "--openvino", "on",
                 "--out", str(out)]) == 0
    assert out.exists() and converted() == []


def test_the_same_command_again_compiles_its_models_while_it_starts(tiny, tmp_path, converted,
                                                                    monkeypatch, capsys):
    """A command's first run prepares the fast path and notes what its calls compile; the same
    command again (another prompt and seed) compiles those beside its imports, and its calls
    take them, with the pixels of a run that compiled at its calls. Another command (another
    size) compiles nothing ahead."""
    from fewstep import ahead

    taken, started = [], []
    take, start = ahead.take, ahead.start
    monkeypatch.setattr(ahead, "take", lambda ir, settings: taken.append(
        take(ir, settings)) or taken[-1])
    monkeypatch.setattr(ahead, "start", lambda *a: started.append(start(*a)) or started[-1])
    common = ["txt2img", *model_flags(tiny), "--steps", "2", "--overwrite"]
    assert main([*common, "a cat", "--seed", "3", "--out", str(tmp_path / "a.png")]) == 0
    # nothing noted yet; the fast path prepared after the image compiled its own
    assert started == [0] and taken == [None] * 3
    assert main([*common, "a dog", "--seed", "4", "--out", str(tmp_path / "b.png")]) == 0
    assert started == [0, 3] and len(taken) == 6 and all(m is not None for m in taken[3:])
    assert "from the cache" in capsys.readouterr().err
    # the same call compiled at its calls (nothing noted: the note's file removed)
    note = tmp_path / "cache" / "fewstep" / "compile" / "openvino" / ahead.NOTE
    note.unlink()
    assert main([*common, "a dog", "--seed", "4", "--out", str(tmp_path / "c.png")]) == 0
    assert started[-1] == 0 and taken[6:] == [None] * 3
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")),
                          np.asarray(Image.open(tmp_path / "c.png")))
    assert note.is_file()  # noted again
    assert main([*common, "a dog", "--width", "32", "--height", "32", "--out",
                 str(tmp_path / "d.png")]) == 0
    assert started[-1] == 0  # another size: another command
