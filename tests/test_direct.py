"""The same one-shot command again, on its converted models alone (`fewstep.direct`): the
engine's pixels and record, without importing diffusers; the engine whenever anything the
plan depends on changed, and when the loop cannot run."""

from __future__ import annotations

import json
import locale
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers.cli import model_flags

from fewstep import cli, direct
from fewstep.cli import main
from fewstep.records import read_record


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The OpenVINO cache folder of commands run with the fast path on, as a user has it.
    Afterwards the process's locale is the one it had: the models compiled ahead on two
    threads did not leave OpenVINO's "C" (set while it reads a blob), which makes Python read
    files as ASCII."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FEWSTEP_OPENVINO", "auto")  # the suite turns it off
    before = locale.setlocale(locale.LC_ALL)
    yield tmp_path / "cache" / "fewstep" / "compile" / "openvino"
    assert locale.setlocale(locale.LC_ALL) == before


@pytest.fixture
def runs(monkeypatch):
    """What each command ran on ("engine" or "direct") and the float images it saved."""
    import fewstep.build as build

    seen: list[tuple[str, np.ndarray]] = []
    engines = []
    real_build, real_save = build.build_engine, cli._save
    monkeypatch.setattr(build, "build_engine",
                        lambda *a, **k: engines.append(1) or real_build(*a, **k))

    def save(result, out):
        seen.append(("engine" if engines else "direct", result.images.copy()))
        engines.clear()
        return real_save(result, out)

    monkeypatch.setattr(cli, "_save", save)
    return seen


def _note(cache) -> dict:
    from fewstep.ahead import NOTE

    return json.loads((cache / NOTE).read_text())


def test_the_same_command_again_runs_on_its_converted_models_alone(tiny, tmp_path, cache,
                                                                   runs):
    """The first run (torch, then the fast path prepared) leaves a plan; the same command
    with another prompt and seed runs it, with the float pixels and the record of the
    engine's run of the same call on the same converted models."""
    common = ["txt2img", *model_flags(tiny), "--steps", "3", "--overwrite"]
    assert main([*common, "a cat", "--seed", "3", "--out", str(tmp_path / "a.png")]) == 0
    plan = _note(cache)["direct"]
    assert plan["steps"] == 3 and sorted(plan["models"]) == ["decoder", "text_encoder", "unet"]
    assert main([*common, "a dog", "--seed", "4", "--out", str(tmp_path / "b.png")]) == 0
    # the engine on the same converted models: the note without its plan
    note = _note(cache)
    del note["direct"]
    (cache / "last-one-shot.json").write_text(json.dumps(note))
    assert main([*common, "a dog", "--seed", "4", "--out", str(tmp_path / "c.png")]) == 0
    assert [kind for kind, _ in runs] == ["engine", "direct", "engine"]
    assert np.array_equal(runs[1][1], runs[2][1])
    assert read_record(tmp_path / "b.png") == read_record(tmp_path / "c.png")
    assert read_record(tmp_path / "b.png").request["prompt"] == "a dog"
    # the engine's run noted the plan again; a random seed is drawn and recorded
    assert main([*common, "a bird", "--out", str(tmp_path / "d.png")]) == 0
    assert runs[-1][0] == "direct"
    assert isinstance(read_record(tmp_path / "d.png").request["seed"], int)


def test_anything_the_plan_did_not_see_runs_on_the_engine(tiny, tmp_path, cache, runs,
                                                          monkeypatch):
    """Other steps, a LoRA stack, a changed model file or other library versions: the
    engine, which notes a new plan when it can; a loop that fails runs the engine too."""
    model = tmp_path / "model"
    shutil.copytree(tiny.sd15, model)
    flags = ["--model", str(model), "--lcm-lora", str(tiny.lcm_sd15), "--device", "cpu",
             "--quiet", "--overwrite"]

    def command(*extra) -> str:
        out = tmp_path / "out.png"
        assert main(["txt2img", "a cat", *flags, "--steps", "2", *extra, "--out",
                     str(out)]) == 0
        return runs[-1][0]

    assert command() == "engine"  # the first: nothing converted yet
    assert command() == "direct"
    assert command("--steps", "3") == "engine"  # (the last --steps counts) noted again
    assert command("--steps", "3") == "direct"
    assert command("--steps", "3", "--lora", str(tiny.style_sd15)) == "engine"
    # the note is the last run's, and a LoRA call's holds no plan
    assert command("--steps", "3") == "engine"
    assert command("--steps", "3") == "direct"
    weights = next((model / "unet").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert command("--steps", "3") == "engine"
    assert command("--steps", "3") == "direct"
    versions = direct._versions()
    monkeypatch.setattr(direct, "_versions", lambda: {**versions, "torch": "0"})
    assert command("--steps", "3") == "engine"
    monkeypatch.undo()

    def broken(self, *arrays):
        raise RuntimeError("Exception from src/inference: a broken blob")

    monkeypatch.setattr(direct._Model, "first", broken)
    assert command("--steps", "3") == "engine"  # and its file is written
    assert read_record(tmp_path / "out.png").request["steps"] == 3


def test_guidance_and_hub_references_run_on_the_engine(tiny, tmp_path, cache, runs):
    """Guidance above 1 (a doubled batch) leaves no plan; nor do hub references."""
    common = ["txt2img", "a cat", *model_flags(tiny), "--steps", "2", "--overwrite", "--out",
              str(tmp_path / "a.png")]
    for _ in range(2):
        assert main(common) == 0
    assert runs[-1][0] == "direct" and "direct" in _note(cache)
    for _ in range(3):
        assert main([*common, "--guidance", "2"]) == 0
        assert runs[-1][0] == "engine" and "direct" not in _note(cache)
    def options(model, lcm_lora):
        return type("Options", (), {"model": str(model), "model_config_dir": None,
                                    "lcm_lora": str(lcm_lora)})()

    assert direct._files(options(tiny.sd15, tiny.lcm_sd15))  # local: the files it depends on
    assert direct._files(options("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                 tiny.lcm_sd15)) is None
    assert direct._files(options(tiny.sd15, "auto")) is None  # the family's LCM-LoRA (hub)


def test_the_tokenizer_file_gives_the_pipelines_input_ids(tiny, tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny.sd15 / "tokenizer")
    spec = direct._save_tokenizer(tokenizer, tmp_path)
    prompts = ["", "a cat", "A CAT, on a mat!!!", "  spaces\tand\nnew lines  ",
               "naïve café façade — Ünïcödé 🐱", "<|endoftext|> a", " ".join(["word"] * 300)]
    for prompt in prompts:
        expected = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids
        assert np.array_equal(direct.token_ids(spec, prompt), expected), prompt


def test_the_loop_imports_neither_diffusers_nor_transformers(tiny, tmp_path, cache):
    common = ["txt2img", "a cat", *model_flags(tiny), "--steps", "2", "--overwrite"]
    assert main([*common, "--out", str(tmp_path / "a.png")]) == 0
    script = ("import sys; from fewstep.cli import main; "
              f"code = main({[*common, '--out', str(tmp_path / 'b.png')]!r}); "
              "print(code, sorted(m for m in ('diffusers', 'transformers', 'peft') "
              "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout + done.stderr
    assert "from the cache" in done.stderr
    assert read_record(tmp_path / "b.png").request["prompt"] == "a cat"
