"""What users see: no warnings or progress bars from the libraries under fewstep, from the CLI
or from library code that builds an engine; and importing fewstep changes nothing global."""

import os
import subprocess
import sys
from pathlib import Path

from helpers.cli import assert_no_library_noise

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run(code_or_args, tmp_path, module=False):
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)  # as a user's shell has them: unset
    argv = ["-m", "fewstep.cli", *code_or_args] if module else ["-c", code_or_args]
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)


def test_cli_shows_no_library_chatter(tiny, tmp_path):
    # two LoRAs, one without text-encoder weights: peft and diffusers both have words for it
    done = _run(["txt2img", "x", "--model", str(tiny.sd15), "--lcm-lora", str(tiny.lcm_sd15),
                 "--lora", str(tiny.style_sd15), "--lora", str(tiny.style_sd15_peft),
                 "--device", "cpu", "--seed", "1", "--steps", "2", "--out", "x.png"],
                tmp_path, module=True)
    assert done.returncode == 0, done.stderr
    assert_no_library_noise(done.stderr)
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        line for line in done.stderr.splitlines() if line.startswith("done 1 file(s), seed 1")]


def test_library_users_get_quiet_from_building_an_engine(tiny, tmp_path):
    done = _run(f"""
from fewstep import build_engine, LoraRequest, Txt2ImgRequest
engine = build_engine(model={str(tiny.sd15)!r}, lcm_lora={str(tiny.lcm_sd15)!r}, device="cpu")
engine.generate(Txt2ImgRequest(prompt="x", seed=1, steps=2, loras=[
    LoraRequest(ref={str(tiny.style_sd15)!r}), LoraRequest(ref={str(tiny.style_sd15_peft)!r})]))
""", tmp_path)
    assert done.returncode == 0, done.stderr
    assert_no_library_noise(done.stderr)
    assert done.stderr.strip() == ""


def test_importing_fewstep_changes_nothing_global(tmp_path):
    done = _run("""
import logging, os, warnings
before = (list(warnings.filters), dict(os.environ),
          [logging.getLogger(n).level for n in ("diffusers", "transformers", "peft", "fewstep")])
import fewstep, fewstep.cli, fewstep.config, fewstep.logs, fewstep.records, fewstep.server.cli
after = (list(warnings.filters), dict(os.environ),
         [logging.getLogger(n).level for n in ("diffusers", "transformers", "peft", "fewstep")])
assert before == after
print("unchanged")
""", tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "unchanged", done.stderr


def test_loading_passes_no_deprecated_arguments(tiny):
    """diffusers 0.42 takes `dtype=`; `torch_dtype=` is deprecated."""
    import warnings

    import torch
    from diffusers import ControlNetModel, StableDiffusionPipeline

    from fewstep.families import family_by_name
    from fewstep.loading import load_component, load_pipeline, parse_ref

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline(StableDiffusionPipeline, parse_ref(str(tiny.sd15), "model"),
                      config_ref=None, family=family_by_name("sd15"), torch_dtype=torch.float32)
        load_component(ControlNetModel, parse_ref(str(tiny.controlnet), "controlnet"),
                       torch_dtype=torch.float32, field="controlnet")
    deprecated = [str(w.message) for w in caught if "deprecated" in str(w.message).lower()]
    assert deprecated == []
