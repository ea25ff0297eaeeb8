"""The CLI end to end on tiny models: files, metadata, numbering, animations, errors."""

import json

import numpy as np
import pytest
from helpers.cli import model_flags, one_error_line
from PIL import Image

from fewstep.cli import main
from fewstep.selftest import sample_image, sample_mask


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    sample_image().save(folder / "image.png")
    sample_mask().save(folder / "mask.png")
    sample_mask(32).save(folder / "small-mask.png")
    sample_image(size=4).save(folder / "tiny.png")
    return folder


def test_txt2img_writes_png_with_parameters(tiny, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code = main(["txt2img", "a cat", *model_flags(tiny), "--seed", "42", "--negative", "dog",
                 "--lora", f"{tiny.style_sd15}:0.7", "--out", str(out)])
    assert code == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    text = image.text["parameters"]
    assert text.startswith("a cat <lora:style-sd15:0.7>\nNegative prompt: dog\nSteps: 4, "
                           "Sampler: LCM, CFG scale: 1.0, Seed: 42, Size: 64x64")
    record = json.loads(image.text["fewstep"])
    assert record["request"]["seed"] == 42 and record["request"]["loras"][0]["weight"] == 0.7
    assert "no effect" in capsys.readouterr().err  # the negative-prompt warning


def test_png_record_reproduces_the_image(tiny, tmp_path, sd15_engine):
    from fewstep.tasks import REQUESTS

    out = tmp_path / "a.png"
    assert main(["txt2img", "a tree", *model_flags(tiny), "--out", str(out)]) == 0  # random seed
    record = json.loads(Image.open(out).text["fewstep"])["request"]
    request = REQUESTS[record.pop("task")].build(**record)
    again = sd15_engine.generate(request).pil_images()[0]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(Image.open(out).convert("RGB")))


def test_num_images_writes_numbered_files(tiny, tmp_path):
    out = tmp_path / "many.png"
    assert main(["txt2img", "x", *model_flags(tiny), "--num-images", "3", "--seed", "1",
                 "--out", str(out)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["many-1.png", "many-2.png", "many-3.png"]
    first, second = (np.asarray(Image.open(tmp_path / n)) for n in names[:2])
    assert np.abs(first.astype(int) - second.astype(int)).max() > 0


def test_every_task_command(tiny, tmp_path, inputs):
    img, mask = str(inputs / "image.png"), str(inputs / "mask.png")
    runs = {
        "i2i.png": ["img2img", "x", "--image", img, "--strength", "0.5"],
        "inp.png": ["inpaint", "x", "--image", img, "--mask", mask],
        "cn.png": ["controlnet", "x", "--control-image", img, "--controlnet",
                   str(tiny.controlnet), "--canny-low", "50"],
        "t2i.png": ["t2i-adapter", "x", "--control-image", img, "--adapter",
                    str(tiny.adapter_sd15), "--no-canny"],
    }
    for name, args in runs.items():
        assert main([*args, *model_flags(tiny), "--seed", "3", "--out", str(tmp_path / name)]) == 0
        assert Image.open(tmp_path / name).size == (64, 64)


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_animate_writes_gif_and_mp4(tiny, tmp_path, suffix):
    out = tmp_path / f"anim{suffix}"
    assert main(["animate", "x", *model_flags(tiny), "--motion-adapter", str(tiny.motion_adapter),
                 "--lora", f"{tiny.motion_lora}:1.2", "--num-frames", "4", "--width", "64",
                 "--height", "64", "--steps", "2", "--seed", "5", "--out", str(out)]) == 0
    import imageio.v3 as iio

    frames = iio.imread(out, index=None)
    assert frames.shape[0] == 4 and frames.shape[1:3] == (64, 64)


@pytest.mark.parametrize("args, expected", [
    (["txt2img", "x", "--width", "63"], "multiple of 8"),
    (["txt2img", "x", "--width", "4096", "--height", "4096"], "over the limit"),
    (["txt2img", "x", "--steps", "0"], "steps"),
    (["txt2img", "x", "--steps", "abc"], "steps"),
    (["txt2img", "x", "--steps", "500"], "at most"),
    (["txt2img", "x", "--guidance", "nan"], "guidance"),
    (["txt2img", "x", "--num-images", "100"], "(--num-images)"),
    (["txt2img", "x", "--seed", "-1"], "seed"),
    (["txt2img", "x", "--lora", "missing.safetensors"], "no such file"),
    (["txt2img", "x", "--lora", "evil.ckpt"], "pickle"),
    (["txt2img", "x", "--lora", "MODELS/style-sd15.safetensors:9"], "within"),
    (["txt2img", "x", "--lcm-lora", "MODELS/lcm-lora-sd15:nan"], "(--lcm-lora)"),
    (["txt2img", "x", "--tiny-vae", "MODELS/absent"], "(--tiny-vae)"),
    (["txt2img", "x", "--device", "foo"], "--device"),
    (["txt2img", "x", "--dtype", "fp64"], "invalid choice"),
    (["txt2img", "x", "--speed", "warp"], "invalid choice"),
    (["txt2img", "x", "--no-such-option"], "unrecognized"),
    (["txt2img"], "required"),
    (["img2img", "x", "--image", "INPUTS"], "no such file"),
    (["img2img", "x", "--image", "MODELS/style-sd15.safetensors"], "not a readable"),
    (["inpaint", "x", "--image", "INPUTS/image.png", "--mask", "INPUTS/absent.png"], "mask"),
    (["inpaint", "x", "--image", "INPUTS/image.png", "--mask", "INPUTS/small-mask.png"],
     "mask"),
    (["img2img", "x", "--image", "INPUTS/image.png", "--strength", "0.1"], "strength"),
    (["img2img", "x", "--image", "INPUTS/tiny.png"], "image"),
    (["controlnet", "x", "--control-image", "INPUTS/image.png", "--controlnet",
      "MODELS/absent"], "controlnet"),
    (["controlnet", "x", "--control-image", "INPUTS/image.png", "--controlnet",
      "MODELS/controlnet", "--canny-low", "250"], "canny"),
    (["animate", "x", "--motion-adapter", "MODELS/motion-adapter", "--num-frames", "999",
      "--out", "OUT/x.gif"], "(--num-frames)"),
    (["animate", "x", "--motion-adapter", "MODELS/motion-adapter", "--out", "OUT/x.png"],
     "suffix"),
])
def test_user_errors_are_one_line_before_loading(tiny, tmp_path, inputs, args, expected,
                                                 capsys, no_loading):
    out = tmp_path / "out"
    out.mkdir()
    args = [a.replace("INPUTS", str(inputs)).replace("MODELS", str(tiny.root))
            .replace("OUT", str(out)) for a in args]
    if "--out" not in args:
        args += ["--out", str(out / "x.png")]
    try:
        code = main([args[0], *model_flags(tiny), *args[1:]])  # the case's flags win
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code != 0
    assert list(out.iterdir()) == []
    line = one_error_line(capsys.readouterr().err)
    assert expected in line


@pytest.mark.parametrize("where", ["proc", "file-parent", "missing-folder", "folder"])
def test_unwritable_out_is_refused_before_loading(tiny, tmp_path, where, capsys, no_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    (tmp_path / "taken.png").mkdir()
    out = {"proc": "/proc/fewstep.png",  # no file can be created there, even by root
           "file-parent": str(blocker / "x.png"),
           "missing-folder": str(tmp_path / "missing" / "x.png"),
           "folder": str(tmp_path / "taken.png")}[where]
    assert main(["txt2img", "x", *model_flags(tiny), "--out", out]) == 2
    assert "out" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "taken.png"]


def test_unwritable_numbered_output_is_refused(tiny, tmp_path, capsys, no_loading):
    (tmp_path / "many-2.png").mkdir()
    assert main(["txt2img", "x", *model_flags(tiny), "--num-images", "2", "--out",
                 str(tmp_path / "many.png")]) == 2
    assert "many-2.png" in one_error_line(capsys.readouterr().err)


def test_unavailable_cuda_is_refused_before_loading(tiny, tmp_path, monkeypatch, capsys,
                                                    no_loading):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = [a if a != "cpu" else "cuda:0" for a in model_flags(tiny)]
    assert main(["txt2img", "x", *base, "--out", str(tmp_path / "x.png")]) == 2
    assert "CUDA is not available" in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_bad_output_suffix_is_refused_before_loading(tmp_path, capsys):
    assert main(["txt2img", "x", "--model", "/does/not/matter", "--out",
                 str(tmp_path / "x.txt")]) == 2
    assert "suffix" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_message(tmp_path, capsys):
    assert main(["txt2img", "x", "--model", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "x.png")]) != 0
    assert "no such file or folder" in capsys.readouterr().err


def test_pickle_model_is_refused(tmp_path, capsys):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"x")
    assert main(["txt2img", "x", "--model", str(path), "--out", str(tmp_path / "x.png")]) == 2
    assert "pickle" in capsys.readouterr().err


def test_selftest_command_is_wired():
    from fewstep.cli import build_parser

    assert build_parser().parse_args(["selftest"]).command == "selftest"


def test_progress_bar_run(tiny, tmp_path):
    args = [a for a in model_flags(tiny) if a != "--quiet"]
    assert main(["txt2img", "x", *args, "--seed", "1", "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").is_file()


@pytest.mark.parametrize("speed", ["off", "fastest"])
def test_speed_presets(tiny, tmp_path, speed):
    out = tmp_path / f"{speed}.png"
    extra = ["--tiny-vae", str(tiny.tiny_vae)] if speed == "fastest" else []
    assert main(["txt2img", "x", *model_flags(tiny), "--speed", speed, *extra, "--seed", "1",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)


def test_default_speed_keeps_the_plain_picture(tiny, sd15_engine):
    from fewstep.build import build_engine
    from fewstep.tasks import Txt2ImgRequest

    plain = build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu",
                         speed="off")
    request = Txt2ImgRequest(prompt="x", seed=9)
    assert sd15_engine.speed == "auto"  # the default preset keeps the picture on CPU
    np.testing.assert_allclose(sd15_engine.generate(request).images,
                               plain.generate(request).images, atol=1e-4)


def test_bench_command_is_wired(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0 and "--resolution" in capsys.readouterr().out


@pytest.mark.parametrize("argv, missing, extra", [
    (["serve", "--model", "x"], "uvicorn", "serve"),
    (["serve", "--model", "x"], "fastapi", "serve"),
    (["bench", "--family", "sd15"], "psutil", "bench"),
])
def test_a_missing_extra_says_what_to_install(monkeypatch, capsys, argv, missing, extra,
                                              no_loading):
    import sys

    monkeypatch.setitem(sys.modules, missing, None)  # as if it were not installed
    assert main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f'pip install "fewstep[{extra}]"' in line and missing in line


def test_server_module_says_what_to_install(monkeypatch, capsys):
    import sys

    from fewstep.server.cli import main as server_main

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert server_main(["--model", "x"]) == 1
    assert 'pip install "fewstep[serve]"' in one_error_line(capsys.readouterr().err)


def test_extras_are_declared():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    names = {e: " ".join(v) for e, v in extras.items()}
    assert all(m in names["serve"] for m in ("fastapi", "uvicorn", "prometheus-client"))
    assert "psutil" in names["bench"] and "matplotlib" in names["bench"]
    assert any(d.startswith("pydantic-settings") for d in project["project"]["dependencies"])


def test_selftest_folder_that_cannot_be_made(monkeypatch, capsys):
    import fewstep.selftest

    monkeypatch.setattr(fewstep.selftest, "run_selftest", lambda keep: pytest.fail("ran"))
    assert main(["selftest", "--keep", "/proc/fewstep-models"]) == 1
    assert "--keep" in one_error_line(capsys.readouterr().err)


def test_the_default_output_is_never_overwritten(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["txt2img", "x", *model_flags(tiny), "--steps", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fewstep-2.png", "fewstep.png"]
    assert main(["txt2img", "x", *model_flags(tiny), "--steps", "1", "--num-images", "2"]) == 0
    # several images: the first base name whose numbered files are all free
    assert {"fewstep-2-1.png", "fewstep-2-2.png"} <= {p.name for p in tmp_path.iterdir()}


def test_a_named_output_that_exists_needs_overwrite(tiny, tmp_path, capsys, no_loading):
    out = tmp_path / "mine.png"
    out.write_bytes(b"keep me")
    assert main(["txt2img", "x", *model_flags(tiny), "--out", str(out)]) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr().err)
    assert out.read_bytes() == b"keep me"


def test_overwrite_replaces_a_named_output(tiny, tmp_path):
    out = tmp_path / "mine.png"
    out.write_bytes(b"old")
    assert main(["txt2img", "x", *model_flags(tiny), "--steps", "1", "--out", str(out),
                 "--overwrite"]) == 0
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize("args, flag", [
    (["--num-images", "100"], "--num-images"),
    (["--negative", "x" * 5000], "--negative"),
    (["--lora", "MODELS/style-sd15.safetensors:9"], "--lora (the first)"),
])
def test_errors_name_the_flag_not_the_field(tiny, tmp_path, capsys, no_loading, args, flag):
    args = [a.replace("MODELS", str(tiny.root)) for a in args]
    assert main(["txt2img", "x", *model_flags(tiny), *args, "--out",
                 str(tmp_path / "x.png")]) != 0
    line = one_error_line(capsys.readouterr().err)
    assert f"({flag})" in line and "num_images" not in line and "negative_prompt" not in line
    assert line.count(flag.split()[0]) == 1  # named once, not again in the message


def test_a_settings_file_given_as_the_model_config_is_refused(tiny, tmp_path, capsys,
                                                              no_loading):
    settings = tmp_path / "serve.toml"
    settings.write_text('model = "x"\n')
    assert main(["txt2img", "x", *model_flags(tiny), "--config", str(settings), "--out",
                 str(tmp_path / "x.png")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "(--config)" in line and "fewstep serve --config" in line
