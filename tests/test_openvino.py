"""OpenVINO for the UNet, the VAE decoder and the text encoders on a CPU, on the tiny models: the
base model's calls go through the converted models and give the plain engine's pictures; calls
the converted models cannot take (a LoRA stack, ControlNet residuals, another size) run on torch
and give the plain engine's pictures too; converted models are kept on disk and reused by the
next engine, whose torch weights then stay as loaded until torch runs them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.models import unet_fingerprint

from fewstep.build import build_engine
from fewstep.errors import InvalidRequest
from fewstep.selftest import sample_image
from fewstep.tasks import ControlNetRequest, LoraRequest, Txt2ImgRequest

pytest.importorskip("openvino")  # the `openvino` extra; the README's test set-up installs it

TOL = 1e-4  # float32 OpenVINO against torch (measured: 1e-6 on the tiny models)
SIZE = 64


def _engine(model, lcm, **options):
    return build_engine(model=str(model), lcm_lora=str(lcm), device="cpu", dtype="fp32", **options)


@pytest.fixture(scope="module")
def sd15(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ov-cache")
    plain = _engine(tiny.sd15, tiny.lcm_sd15, speed="off", openvino="off")
    converted = _engine(tiny.sd15, tiny.lcm_sd15, speed="auto", openvino="on",
                        compile_shapes=((SIZE, SIZE, 1), (SIZE, SIZE, 2)),
                        compile_cache=str(cache))
    return plain, converted, cache


def _txt2img(engine, seed=3, count=1, size=SIZE):
    return engine.generate(Txt2ImgRequest(prompt="a lighthouse", seed=seed, steps=4, width=size,
                                          height=size, num_images=count)).images


def _calls(engine):
    return dict(engine.fast_path.openvino.calls)


def _moved(before, after):
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_the_routing_hooks_are_named_and_removable(tiny, tmp_path):
    """The converted models take calls through named hooks in diffusers' hook registry, which
    come off again: then every call runs on torch."""
    engine = _engine(tiny.sd15, tiny.lcm_sd15, speed="auto", openvino="on",
                     compile_shapes=((SIZE, SIZE, 1),), compile_cache=str(tmp_path))
    parts = engine.fast_path.openvino
    unet, decoder = engine.base.unet, engine.base.vae.decoder
    for module in (unet, decoder):
        assert module._diffusers_hook.get_hook("fewstep.openvino") is not None
    converted = _txt2img(engine)
    parts.remove()
    for module in (unet, decoder):
        assert module._diffusers_hook.get_hook("fewstep.openvino") is None
    before = _calls(engine)
    plain = _txt2img(engine)
    assert _calls(engine) == before  # nothing went through the converted models
    assert np.abs(converted - plain).max() <= TOL


@pytest.mark.parametrize("count", [1, 2])
def test_base_model_calls_run_converted_and_keep_the_pictures(sd15, count):
    plain, converted, _ = sd15
    assert converted.fast_report.applied["openvino"].startswith("on (f32")
    before = _calls(converted)
    images = _txt2img(converted, count=count)
    moved = _moved(before, _calls(converted))
    assert moved.pop("text", 0) <= 1 and moved == {"unet": 4, "vae": 1}  # (a cached prompt)
    assert np.abs(images - _txt2img(plain, count=count)).max() <= TOL


def test_sdxl_runs_converted_with_its_pooled_embeddings(tiny, tmp_path):
    plain = _engine(tiny.sdxl, tiny.lcm_sdxl, speed="off", openvino="off")
    converted = _engine(tiny.sdxl, tiny.lcm_sdxl, speed="auto", openvino="on",
                        compile_shapes=((SIZE, SIZE, 1),), compile_cache=str(tmp_path))
    images = _txt2img(converted, seed=5)
    assert _calls(converted)["unet"] == 4 and _calls(converted)["unet_torch"] == 0
    assert np.abs(images - _txt2img(plain, seed=5)).max() <= TOL


def test_a_lora_stack_runs_on_torch_and_the_base_returns_after(sd15, tiny):
    plain, converted, _ = sd15

    def styled(engine):
        return engine.generate(Txt2ImgRequest(
            prompt="a lighthouse", seed=4, steps=4, width=SIZE, height=SIZE,
            loras=[LoraRequest(ref=str(tiny.style_sd15), weight=0.8)])).images

    before = _calls(converted)
    images = styled(converted)
    moved = _moved(before, _calls(converted))
    assert moved.get("unet_torch") == 4 and "unet" not in moved
    expected = styled(plain)
    assert np.abs(images - expected).max() <= TOL
    assert np.abs(images - _txt2img(plain, seed=4)).max() > 1e-3  # the LoRA did change it
    # the next request without LoRAs is the base model again: converted, and right
    before = _calls(converted)
    base = _txt2img(converted, seed=4)
    assert _moved(before, _calls(converted)).get("unet") == 4
    assert np.abs(base - _txt2img(plain, seed=4)).max() <= TOL


def test_controlnet_residuals_and_other_sizes_run_on_torch(sd15, tiny):
    plain, converted, _ = sd15

    def control(engine):
        return engine.generate(ControlNetRequest(
            prompt="a lighthouse", seed=6, steps=4, control_image=sample_image(1),
            controlnet=str(tiny.controlnet))).images

    before = _calls(converted)
    images = control(converted)
    assert _moved(before, _calls(converted)).get("unet_torch") == 4
    assert np.abs(images - control(plain)).max() <= TOL

    before = _calls(converted)
    images = _txt2img(converted, size=SIZE + 16)  # no converted model at 80x80
    moved = _moved(before, _calls(converted))
    assert moved.pop("text", 0) <= 1 and moved == {"unet_torch": 4, "vae_torch": 1}
    assert np.abs(images - _txt2img(plain, size=SIZE + 16)).max() <= TOL


def test_converted_upsamplings_run_as_phase_convolutions(sd15):
    """The converted UNet and decoder double their images without a doubled tensor
    (`fewstep.accel.subpixel`): no Interpolate in their graphs, and each upsampling's
    convolution became four. The pictures are checked above."""
    plain, _, cache = sd15
    for part, module in (("unet", plain.base.unet), ("decoder", plain.base.vae.decoder)):
        upsamplings = sum(type(m).__name__ == "Upsample2D" for m in module.modules())
        convolutions = sum(isinstance(m, torch.nn.Conv2d) and "lora_" not in name
                           for name, m in module.named_modules())  # (LoRAs earlier tests load)
        assert upsamplings  # the tiny models have some to rewrite
        graphs = list((cache / "openvino").glob(f"{part}-*.xml"))
        assert graphs
        for graph in graphs:
            text = graph.read_text(encoding="utf-8")
            assert 'type="Interpolate"' not in text, graph.name
            assert text.count('type="Convolution"') == convolutions + 3 * upsamplings, graph.name


def test_converted_models_are_reused_from_disk_and_keyed_by_weights(sd15, tiny):
    _, first, cache = sd15
    assert not any(first.fast_path.openvino.cached.values())  # converted on the first start
    files = sorted(p.name.split("-")[0] for p in (cache / "openvino").glob("*.xml"))
    assert files == ["decoder", "text_encoder", "unet"]
    assert not list((cache / "openvino").glob(".*"))  # no temporary left
    again = _engine(tiny.sd15, tiny.lcm_sd15, speed="auto", openvino="on",
                    compile_shapes=((SIZE, SIZE, 1),), compile_cache=str(cache))
    assert all(again.fast_path.openvino.cached.values())
    assert np.abs(_txt2img(again) - _txt2img(first)).max() == 0
    # LoRAs loaded ahead (as the service does with its catalogue) wrap layers, not weights
    preloaded = _engine(tiny.sd15, tiny.lcm_sd15, speed="auto", openvino="on",
                        compile_shapes=((SIZE, SIZE, 1),), compile_cache=str(cache),
                        loras={"lora.style": str(tiny.style_sd15)})
    assert all(preloaded.fast_path.openvino.cached.values())
    assert np.abs(_txt2img(preloaded) - _txt2img(first)).max() == 0
    # other weights (the LCM-LoRA fused at another strength): another UNet, converted anew
    other = _engine(tiny.sd15, f"{tiny.lcm_sd15}:0.5", speed="auto", openvino="on",
                    compile_shapes=((SIZE, SIZE, 1),), compile_cache=str(cache))
    assert other.fast_path.openvino.cached == {f"unet_{SIZE}x{SIZE}": False,
                                               f"decoder_{SIZE}x{SIZE}": True,
                                               "text_encoder": True}


def test_torch_weights_stay_as_loaded_until_torch_runs_them(tiny, tmp_path):
    """With every base call served by the converted models, torch's UNet keeps its weights as
    loaded (the LCM-LoRA not baked in, no copy made); a call torch runs bakes it first, and
    both paths keep the plain engine's pictures."""
    plain = _engine(tiny.sd15, tiny.lcm_sd15, speed="off", openvino="off")
    first = _engine(tiny.sd15, tiny.lcm_sd15, speed="auto", openvino="on",
                    compile_shapes=((SIZE, SIZE, 1),), compile_cache=str(tmp_path))
    assert first.baked  # a cold cache: converted from the baked weights
    warm = _engine(tiny.sd15, tiny.lcm_sd15, speed="auto", openvino="on",
                   compile_shapes=((SIZE, SIZE, 1),), compile_cache=str(tmp_path))
    assert not warm.baked and all(warm.fast_path.openvino.cached.values())
    loaded = unet_fingerprint(warm.base.unet)
    assert np.abs(_txt2img(warm) - _txt2img(plain)).max() <= TOL
    assert not warm.baked and torch.equal(unet_fingerprint(warm.base.unet), loaded)
    styled = Txt2ImgRequest(prompt="a lighthouse", seed=4, steps=4, width=SIZE, height=SIZE,
                            loras=[LoraRequest(ref=str(tiny.style_sd15), weight=0.8)])
    assert np.abs(warm.generate(styled).images - plain.generate(styled).images).max() <= TOL
    assert warm.baked and not torch.equal(unet_fingerprint(warm.base.unet), loaded)
    assert np.abs(_txt2img(warm) - _txt2img(plain)).max() <= TOL


def test_a_half_precision_engine_leaves_the_served_unet_as_loaded(tiny, tmp_path):
    """`fastest` runs torch in bf16: a base UNet the converted models serve is not copied to
    bf16 at start-up (1.7 GB for SD1.5), only once torch is to run it (after the bake)."""
    options = dict(speed="fastest", openvino="on", tiny_vae=str(tiny.tiny_vae),
                   compile_shapes=((SIZE, SIZE, 1),), compile_cache=str(tmp_path))
    _engine(tiny.sd15, tiny.lcm_sd15, **options)  # converts into the cache
    warm = _engine(tiny.sd15, tiny.lcm_sd15, **options)
    if warm.dtype != torch.bfloat16:
        pytest.skip("this CPU has no bf16: fastest stays in float32")
    assert not warm.baked and warm.base.unet.dtype == torch.float32
    assert warm.base.text_encoder.dtype == torch.bfloat16  # the rest converted at once
    assert np.isfinite(_txt2img(warm)).all() and warm.base.unet.dtype == torch.float32
    styled = Txt2ImgRequest(prompt="a lighthouse", seed=4, steps=4, width=SIZE, height=SIZE,
                            loras=[LoraRequest(ref=str(tiny.style_sd15), weight=0.8)])
    assert np.isfinite(warm.generate(styled).images).all()
    assert warm.baked and warm.base.unet.dtype == torch.bfloat16


def test_available_memory_is_memavailable_not_memfree():
    from fewstep.accel import openvino

    with open("/proc/meminfo") as meminfo:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo}
    available = openvino.available_memory()
    assert abs(available - fields["MemAvailable"]) < 256 * 2**20  # read a moment apart
    assert available >= fields["MemFree"]


def test_the_choice_and_its_errors(monkeypatch):
    from fewstep.accel import openvino

    assert openvino.choose("auto", "auto", "cpu", None) == ("f32", "on")
    assert openvino.choose("auto", "fastest", "cpu", "bf16") == ("bf16", "on")
    assert openvino.choose("auto", "default", "cpu", None)[0] is None
    assert openvino.choose("auto", "auto", "cuda", "fp16")[0] is None
    assert openvino.choose("on", "default", "cpu", None)[0] == "f32"
    assert openvino.choose("on", "off", "cpu", None)[0] is None
    with pytest.raises(InvalidRequest) as err:
        openvino.choose("on", "auto", "cuda:0", "fp16")
    assert err.value.field == "openvino" and "cuda:0" in str(err.value)
    with pytest.raises(InvalidRequest) as err:
        openvino.choose("sometimes", "auto", "cpu", None)
    assert err.value.field == "openvino" and "'sometimes'" in str(err.value)
    monkeypatch.setattr(openvino, "available", lambda: False)
    assert openvino.choose("auto", "auto", "cpu", None) == (None, "off (package not installed)")
    with pytest.raises(InvalidRequest) as err:
        openvino.choose("on", "auto", "cpu", None)
    assert err.value.field == "openvino" and "fewstep[openvino]" in str(err.value)


def test_the_report_says_why_it_is_off(tiny, monkeypatch):
    from fewstep.accel import openvino

    engine = _engine(tiny.sd15, tiny.lcm_sd15, speed="default", openvino="auto")
    assert engine.fast_report.applied["openvino"] == "off (speed default)"
    monkeypatch.setattr(openvino, "available", lambda: False)
    engine = _engine(tiny.sd15, tiny.lcm_sd15, speed="auto", openvino="auto")
    assert engine.fast_report.applied["openvino"] == "off (package not installed)"
    assert engine.fast_path.openvino is None


def test_not_enough_memory_skips_it(tiny, monkeypatch):
    from fewstep.accel import openvino

    monkeypatch.setattr(openvino, "enough_memory", lambda modules, copies: (False, "needs 9 GiB"))
    engine = _engine(tiny.sd15, tiny.lcm_sd15, speed="auto", openvino="on",
                     compile_shapes=((SIZE, SIZE, 1),))
    assert engine.fast_report.applied["openvino"] == "skipped: needs 9 GiB"
    assert engine.fast_path.openvino is None



def test_int8_weights_are_a_choice_and_change_the_pictures_a_little(tiny, tmp_path):
    """`--openvino int8`: the UNet's and text encoder's weights compressed to 8 bits (NNCF),
    kept in the cache under their own name; close to the full weights' pictures, not equal."""
    pytest.importorskip("nncf")
    full = _engine(tiny.sd15, tiny.lcm_sd15, speed="auto", openvino="on",
                   compile_shapes=((SIZE, SIZE, 1),), compile_cache=str(tmp_path))
    small = _engine(tiny.sd15, tiny.lcm_sd15, speed="auto", openvino="int8",
                    compile_shapes=((SIZE, SIZE, 1),), compile_cache=str(tmp_path))
    assert "int8 weights" in small.fast_report.applied["openvino"]
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "openvino").glob("*-int8-*.xml"))
    assert names == ["text_encoder", "unet"]  # the full VAE decoder gains nothing from it
    difference = np.abs(_txt2img(small) - _txt2img(full)).max()
    assert 0 < difference < 0.2


def test_int8_without_nncf_is_one_error_naming_the_option(tiny, monkeypatch):
    from fewstep.accel import openvino

    monkeypatch.setattr(openvino, "int8_available", lambda: False)
    with pytest.raises(InvalidRequest) as info:
        _engine(tiny.sd15, tiny.lcm_sd15, speed="auto", openvino="int8")
    assert info.value.field == "openvino" and "fewstep[int8]" in info.value.message


def _resident(buffer) -> int:
    """Resident bytes of the mapping that holds `buffer` (an mmap)."""
    address = np.frombuffer(buffer, dtype=np.uint8).ctypes.data  # read-only ones too
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                inside = start <= address < end
            elif inside and head[0] == "Rss:":
                return int(head[1]) * 1024
    return 0


def test_clean_pages_of_mapped_weight_files_are_given_back(tmp_path):
    """What was only read from a mapped weight file leaves the resident set (the kernel reads it
    again when touched); a mapping with a written page is left alone."""
    import mmap
    import os

    from fewstep.pages import release_clean_file_pages

    resident = _resident
    size = 8 * 2**20
    clean, dirty = tmp_path / "clean.safetensors", tmp_path / "dirty.safetensors"
    for path in (clean, dirty):
        with open(path, "wb") as file:  # on disk: clean in the page cache
            file.write(b"\1" * size)
            file.flush()
            os.fsync(file.fileno())
    with open(clean, "r+b") as a, open(dirty, "r+b") as b:
        read = mmap.mmap(a.fileno(), size, flags=mmap.MAP_PRIVATE)
        written = mmap.mmap(b.fileno(), size, flags=mmap.MAP_PRIVATE)
        assert sum(read[i] for i in range(0, size, 4096)) == size // 4096  # pages read
        written[0] = 7  # one copied page
        for i in range(0, size, 4096):
            written[i]
        assert resident(read) >= size and resident(written) >= size
        assert release_clean_file_pages((".safetensors",)) >= size
        assert resident(read) < size and resident(written) >= size
        assert read[5] == 1 and written[0] == 7  # the data is what it was
        read.close()
        written.close()


def test_pages_of_a_weight_file_just_written_are_given_back_too(tmp_path):
    """A blob another process has just written is dirty in the page cache until it reaches the
    disk: mapped privately and only read, its pages can be given back all the same (the next
    command right after the one that prepared the cache peaked 1.4 GB higher)."""
    import mmap

    from fewstep.pages import release_clean_file_pages

    size = 8 * 2**20
    path = tmp_path / "fresh.blob"
    path.write_bytes(b"\2" * size)  # no fsync: dirty in the page cache for a while
    with open(path, "rb") as file:
        # OpenVINO maps its blobs shared and read-only; a private mapping is the same case
        for flags in (mmap.MAP_SHARED, mmap.MAP_PRIVATE):
            read = mmap.mmap(file.fileno(), size, flags=flags, prot=mmap.PROT_READ)
            assert sum(read[i] for i in range(0, size, 4096)) == 2 * (size // 4096)
            assert release_clean_file_pages((".blob",)) >= size, flags
            assert read[7] == 2
            read.close()


def test_blob_pages_are_given_back_while_they_are_read(tmp_path):
    """While models are converted and compiled into the cache, the pages of blobs and IR
    weights mapped shared and read-only are given back as it goes, not only afterwards (a cold
    command's preparing peaked at 13.0 GB); the bytes read stay the file's, and a writable
    mapping is never touched."""
    import mmap
    import time

    from fewstep.pages import releasing_blob_pages

    size = 8 * 2**20
    blob, other = tmp_path / "model.blob", tmp_path / "state.blob"
    blob.write_bytes(bytes(range(256)) * (size // 256))
    other.write_bytes(b"\3" * size)
    with open(blob, "rb") as a, open(other, "r+b") as b:
        shared = mmap.mmap(a.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        private = mmap.mmap(b.fileno(), size, flags=mmap.MAP_PRIVATE)
        private[0] = 9  # a page of its own: dropping it would lose it
        with releasing_blob_pages(interval=0.01):
            total = 0
            for i in range(0, size, 4096):
                total += shared[i + 7]
                private[i]
            time.sleep(0.2)
            assert _resident(shared) < size // 2
            assert _resident(private) >= size
        assert total == 7 * (size // 4096)  # every page read as written
        assert private[0] == 9 and shared[4096 + 200] == 200
        shared.close()
        private.close()


# -- a one-shot command: compiled at its first call, for that call's batch ----------------------

def _one_shot(tiny, cache, count=1, seed=3):
    """What `fewstep txt2img` builds and runs: an engine for its one call (the cache only)."""
    from fewstep.build import inspect, prepare_next
    from fewstep.config import EngineOptions
    from fewstep.engine import Job

    blueprint = inspect(EngineOptions(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15),
                                      device="cpu", dtype="fp32", speed="auto", openvino="on",
                                      compile_cache=str(cache)))
    call = blueprint.plan(Txt2ImgRequest(prompt="a lighthouse", seed=seed, steps=4,
                                         width=SIZE, height=SIZE, num_images=count))
    engine = build_engine(blueprint, calls=[call])
    images = engine.run([Job(call)])[0].images
    prepare_next(engine, load=False)  # the command's last step
    return engine, images


def test_a_one_shot_command_compiles_for_its_own_batch(tiny, tmp_path):
    """The first run (on torch) writes, beside the converted models, each one fixed to the
    shapes its calls had, sharing the weights file (a link, not a copy), and their compiled
    blobs; the next run compiles each part for its call's batch from those, with the plain
    engine's pixels. A call of another batch is compiled for any batch, and right too."""
    plain = _engine(tiny.sd15, tiny.lcm_sd15, speed="off", openvino="off")
    first, torch_images = _one_shot(tiny, tmp_path)
    assert first.fast_path.openvino.calls["unet"] == 0  # a cold cache: torch ran it
    folder = tmp_path / "openvino"
    latent = SIZE // 2  # the tiny model's VAE scales by 2
    static = sorted(folder.glob(f"*.1x4x{latent}x{latent}*.xml"))
    assert [p.name.split("-")[0] for p in static] == ["decoder", "unet"]
    assert sorted(p.name.split("-")[0] for p in folder.glob("text_encoder-*.1x77.xml")) == \
        ["text_encoder"]
    for path in static:
        dynamic = path.with_name(path.name.split(".1x")[0] + ".bin")
        assert path.with_suffix(".bin").samefile(dynamic)  # one weights file on disk
    assert len(list((folder / "blobs" / "f32").glob("*.ok"))) == 3

    warm, images = _one_shot(tiny, tmp_path)
    parts = warm.fast_path.openvino
    assert parts.calls["unet"] == 4 and parts.calls["vae"] == 1 and parts.calls["text"] == 1
    assert [m.batch for m in (*parts.unet_models.values(), *parts.vae_models.values(),
                              *parts.text_models.values())] == [1, 1, 1]
    assert np.abs(images - _txt2img(plain)).max() <= TOL
    assert np.abs(images - torch_images).max() <= TOL

    other, two = _one_shot(tiny, tmp_path, count=2)
    assert [m.batch for m in other.fast_path.openvino.unet_models.values()] == [None]
    assert other.fast_path.openvino.calls["unet"] == 4
    assert np.abs(two - _txt2img(plain, count=2)).max() <= TOL


def test_prepare_compiles_for_one_shot_commands(tiny, tmp_path):
    """`fewstep prepare` (an engine converting ahead) also writes what a one-shot command's
    first call looks for, so that command compiles for its batch from the cache."""
    from fewstep.build import prepare_one_shots

    engine = _engine(tiny.sd15, tiny.lcm_sd15, speed="auto", openvino="on",
                     compile_shapes=((SIZE, SIZE, 1),), compile_cache=str(tmp_path))
    assert sorted(prepare_one_shots(engine, [1])) == [f"decoder_{SIZE}x{SIZE}", "text_encoder",
                                                      f"unet_{SIZE}x{SIZE}"]
    assert prepare_one_shots(engine, [1]) == []  # already there
    warm, _ = _one_shot(tiny, tmp_path)
    assert [m.batch for m in warm.fast_path.openvino.unet_models.values()] == [1]


def test_compiling_ahead_takes_only_what_the_note_of_the_same_command_lists(tmp_path):
    """`fewstep.ahead`: the note of another command, an unreadable note or a missing IR start
    nothing; a model compiled ahead is taken once, for its own IR and settings only; one that
    failed to compile is not taken (the call compiles it)."""
    import openvino as ov
    from openvino import opset13 as ops

    from fewstep import ahead

    x = ops.parameter([1, 4], ov.Type.f32)
    ir = tmp_path / "openvino" / "tiny.xml"
    ir.parent.mkdir()
    ov.save_model(ov.Model([ops.relu(x)], [x]), str(ir))
    broken = ir.with_name("broken.xml")
    broken.write_text("<net>not a model</net>")
    broken.with_suffix(".bin").write_bytes(b"")
    settings = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}
    entry = {"ir": str(ir), "settings": settings, "blobs": str(tmp_path / "blobs")}
    folder = ir.parent  # the OpenVINO cache
    ahead.remember(folder, "one", [entry, dict(entry, ir=str(broken)),
                                     dict(entry, ir=str(tmp_path / "gone.xml"))])
    assert ahead.start(folder, "another") == 0
    assert ahead.take(ir, settings) is None
    assert ahead.start(folder, "one") == 2  # the missing IR is left out
    assert ahead.take(ir, dict(settings, INFERENCE_NUM_THREADS=2)) is None  # other settings
    compiled = ahead.take(ir, settings)
    out = compiled.create_infer_request().infer([np.array([[-1, 2, -3, 4]], np.float32)])[0]
    assert out.tolist() == [[0, 2, 0, 4]]
    assert ahead.take(ir, settings) is None  # taken once
    assert ahead.take(broken, settings) is None  # it failed: the caller compiles
    assert ahead.start(folder, "one") == 2
    ahead.keep_only([ir.with_name("other.xml")])  # other weights: nothing of these is taken
    assert ahead.take(ir, settings) is None
    (folder / ahead.NOTE).write_text("{not json")
    assert ahead.start(folder, "one") == 0
    assert not list(folder.glob(".*.tmp"))
