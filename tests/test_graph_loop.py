"""The whole-loop text-to-image runner (fewstep.accel.graphs), on CPU with tiny models: its loop,
run eagerly (no CUDA graph on a CPU), gives the plain pipeline's pixels for SD1.5 and SDXL, solo
and batched; it reads nothing back from the device; the runner declines what it cannot run (and
the pipeline then gives the usual result); LoRA changes go through it with the plain pixels."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from fewstep.accel.graphs import GraphedTxt2ImgRunner
from fewstep.accel.syncs import SyncCounter
from fewstep.build import build_engine
from fewstep.engine import Job
from fewstep.errors import Cancelled
from fewstep.selftest import sample_image
from fewstep.tasks import ControlNetRequest, LoraRequest, Txt2ImgRequest

SIZE = 64
STEPS = 4


def _engines(tiny, family: str):
    model, lcm = {"sd15": (tiny.sd15, tiny.lcm_sd15), "sdxl": (tiny.sdxl, tiny.lcm_sdxl)}[family]
    common = dict(lcm_lora=str(lcm), device="cpu", dtype="fp32")
    # the same engine twice: the plain one runs every call on the pipeline
    plain = build_engine(model=str(model), speed="default", **common)
    looped = build_engine(model=str(model), speed="default", **common)
    runner = GraphedTxt2ImgRunner(((SIZE, SIZE, 1), (SIZE, SIZE, 2)), steps=(STEPS, 1),
                                  eager=True)
    status = runner.install(looped)
    assert status.startswith("on (4 eager loops")
    return plain, looped, runner


@pytest.fixture(scope="module")
def sd15(tiny):
    return _engines(tiny, "sd15")


@pytest.fixture(scope="module")
def sdxl(tiny):
    return _engines(tiny, "sdxl")


def _request(prompt="a lighthouse", seed=3, **extra):
    values = dict(prompt=prompt, seed=seed, steps=STEPS, width=SIZE, height=SIZE)
    values.update(extra)
    return Txt2ImgRequest(**values)


def _through_loop(engine, runner, requests):
    """Run `requests` as one call; checks that the runner (not the pipeline) ran it."""
    before = runner.replays
    results = engine.run([Job(engine.plan(r)) for r in requests])
    assert runner.replays == before + 1, runner.declined
    return np.concatenate([r.images for r in results])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("case", ["one image", "two requests", "two images", "one step"])
def test_loop_gives_the_pipelines_pixels(request, family, case):
    plain, looped, runner = request.getfixturevalue(family)
    if case == "one image":
        requests = [_request()]
    elif case == "one step":  # no step adds noise: the loop has no noise buffer
        requests = [_request(steps=1)]
    elif case == "two requests":  # batch 2: two prompts, two seeds, a generator each
        requests = [_request("a red house", 11), _request("a blue boat", 12)]
    else:  # batch 2 from one seed: one generator draws both images' noise
        requests = [_request(num_images=2, seed=7)]
    ours = _through_loop(looped, runner, requests)
    reference = np.concatenate([plain.generate(r).images for r in requests]) \
        if case != "two requests" else \
        np.concatenate([r.images for r in plain.run([Job(plain.plan(q)) for q in requests])])
    assert ours.shape == (len(requests) * (2 if case == "two images" else 1), SIZE, SIZE, 3)
    assert ours.dtype == np.float32
    assert np.array_equal(ours, reference), np.abs(ours - reference).max()
    if len(ours) == 2:
        assert not np.array_equal(ours[0], ours[1])


def test_loop_reads_nothing_back(sd15, sdxl):
    for _, _, runner in (sd15, sdxl):
        loop = runner.loops[(SIZE, SIZE, 2, STEPS)]
        counter = SyncCounter(keep_stacks=True)
        with torch.inference_mode(), counter:
            loop.run()  # all steps and the VAE decode
            assert counter.count == 0, "\n".join(counter.where[:3])
            loop.timesteps[0].item()  # what the stock scheduler does per step: counted
        assert counter.count == 1


def test_runner_declines_on_cpu_and_the_fast_path_says_why(tiny):
    engine = build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu",
                          dtype="fp32", speed="default", cuda_graph_loop="on")
    assert engine.fast_report.applied["cuda_graph_loop"] == "skipped: needs CUDA"
    runner = GraphedTxt2ImgRunner(((SIZE, SIZE, 1),))
    assert runner.install(engine) == "skipped: needs CUDA"
    assert runner(engine.base, [engine.plan(_request())], {}) is None
    assert runner.declined == "no loop was captured"
    assert engine.generate(_request()).images.shape == (1, SIZE, SIZE, 3)


def test_auto_captures_the_loop_only_where_it_was_measured_to_pay():
    from fewstep.build import _graph_loop
    from fewstep.config import EngineOptions

    def decide(device="cuda", calls=None, **fields):
        return _graph_loop(EngineOptions(model="m", **fields), device, calls)

    assert EngineOptions(model="m").cuda_graph_loop == "auto"
    # a service at speed default on CUDA: on (bitwise the pipeline's pixels, 3.85x on an H200)
    assert decide(speed="default") == (True, None)
    assert decide(speed="default", device="cuda:1") == (True, None)
    # a one-shot command, a CPU, a compiled UNet not yet measured inside the graph: off, and why
    assert decide(speed="default", calls=[]) == \
        (False, "off (auto: a one-shot command; capturing takes longer than it saves)")
    assert decide(speed="default", device="cpu") == (False, None)
    for speed in ("auto", "fastest"):
        on, why = decide(speed=speed)
        assert not on and f"speed {speed}" in why
    assert decide(speed="off") == (False, None)  # speed off asks for nothing beyond the recipe
    # asked for, it is on everywhere (the runner then says why it captures nothing on a CPU)
    assert decide(speed="auto", device="cpu", cuda_graph_loop="on") == (True, None)
    assert decide(speed="default", cuda_graph_loop="off") == (False, None)


def test_the_default_build_on_a_cpu_captures_nothing(tiny):
    engine = build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu",
                          dtype="fp32", speed="default")
    assert engine.fast_report.applied["cuda_graph_loop"] == "off"
    assert engine.fast_path.graph_runner is None


@pytest.mark.parametrize("optional", [True, False])
def test_a_failed_capture_leaves_an_optional_loop_off(tiny, monkeypatch, optional):
    from fewstep.accel import FastOptions, FastPath

    def fail(self, engine):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedTxt2ImgRunner, "install", fail)
    path = FastPath(FastOptions(cuda_graph_loop=True, graph_loop_optional=optional))
    build = dict(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu", dtype="fp32",
                 fast_path=path)
    if not optional:  # asked for by name: the start fails and says why
        with pytest.raises(RuntimeError, match="stream is capturing"):
            build_engine(**build)
        return
    engine = build_engine(**build)
    assert engine.fast_report.applied["cuda_graph_loop"] == (
        "skipped: the capture failed (RuntimeError: operation not permitted when stream is "
        "capturing)")
    assert path.graph_runner is None
    assert engine.generate(_request()).images.shape == (1, SIZE, SIZE, 3)


@pytest.mark.parametrize("case", ["controlnet", "guidance", "shape", "steps", "unfused loras"])
def test_ineligible_calls_run_on_the_pipeline(sd15, tiny, case, monkeypatch):
    plain, looped, runner = sd15
    loras = [LoraRequest(ref=str(tiny.style_sd15), weight=0.7)]
    if case == "controlnet":
        req = ControlNetRequest(prompt="edges", seed=5, steps=STEPS, width=SIZE, height=SIZE,
                                control_image=sample_image(), controlnet=str(tiny.controlnet))
        why = "not a text-to-image call"
    elif case == "guidance":  # classifier-free guidance doubles the UNet batch
        req = _request(guidance=2.0, negative_prompt="blur")
        why = "guidance above 1"
    elif case == "shape":
        req = _request(width=48, height=40)
        why = "no loop captured for 48x40x1"
    elif case == "steps":
        req = _request(steps=3)
        why = "3 steps"
    else:  # adapters computed beside the layers are not in a captured graph
        monkeypatch.setattr(type(looped), "fuses_loras", property(lambda self: False))
        req = _request(loras=loras)
        why = "LoRAs computed beside"
    before = runner.replays
    ours = looped.generate(req).images
    assert runner.replays == before and why in runner.declined
    assert np.abs(ours - plain.generate(req).images).max() <= 1e-4


def test_lora_changes_between_runs_keep_the_plain_pixels(sd15, tiny):
    plain, looped, runner = sd15
    stacks = [[LoraRequest(ref=str(tiny.style_sd15), weight=0.8)],
              [LoraRequest(ref=str(tiny.style_sd15), weight=0.3),
               LoraRequest(ref=str(tiny.style_sd15_peft), weight=0.6)],
              []]
    seen = []
    for loras in stacks:
        req = _request("switch", 9, loras=loras)
        ours = _through_loop(looped, runner, [req])
        # the fused stack was written into the weights the loop reads, in place
        reference = plain.generate(req).images
        assert np.array_equal(ours, reference), (loras, np.abs(ours - reference).max())
        seen.append(ours)
    assert not np.array_equal(seen[0], seen[2]) and not np.array_equal(seen[0], seen[1])


def test_results_do_not_share_the_loops_buffers(sd15):
    _, looped, runner = sd15
    before = runner.replays
    first = looped.generate(_request(seed=21)).images
    kept = first.copy()
    looped.generate(_request(seed=22))
    assert runner.replays == before + 2
    assert np.array_equal(first, kept)


def test_step_callback_runs_for_every_step_and_can_cancel(sd15):
    _, looped, runner = sd15
    steps, previews = [], []
    job = Job(looped.plan(_request()), progress=lambda k, total: steps.append((k, total)),
              preview=lambda k, image: previews.append(k))
    before = runner.replays
    looped.run([job])
    assert runner.replays == before + 1
    assert steps == [(k, STEPS) for k in range(1, STEPS + 1)] and previews == [1, 2, 3, 4]

    cancel = threading.Event()
    job = Job(looped.plan(_request()), progress=lambda k, total: k == 2 and cancel.set(),
              cancel=cancel)
    with pytest.raises(Cancelled, match="after step 2 of 4"):
        looped.run([job])


def test_guidance_embedding_of_lcm_distilled_unets(tmp_path):
    """A UNet with `time_cond_proj_dim` (an LCM-distilled model) gets the guidance as an
    embedding, not as a doubled batch: the loop fills it per call, as the pipeline does."""
    from diffusers import UNet2DConditionModel

    from fewstep.accel.graphs import Txt2ImgLoop
    from fewstep.accel.scheduler import StaticLCMScheduler
    from fewstep.testing import build_sd15_pipeline

    pipe = build_sd15_pipeline(tmp_path)
    torch.manual_seed(1)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    pipe.unet = UNet2DConditionModel(**{**config, "time_cond_proj_dim": 16})
    pipe.scheduler = StaticLCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        embeds = pipe.encode_prompt("a cat", "cpu", 1, False)[0]
        loop = Txt2ImgLoop(pipe, SIZE, SIZE, 2, STEPS)
        seen = []
        for guidance in (1.0, 3.0):
            arguments = dict(prompt_embeds=embeds, num_inference_steps=STEPS,
                             guidance_scale=guidance, output_type="np",
                             num_images_per_prompt=2, width=SIZE, height=SIZE)
            reference = pipe(**arguments, generator=torch.Generator().manual_seed(4)).images
            loop.load(pipe, {**arguments, "generator": torch.Generator().manual_seed(4)})
            assert loop.buffers.timestep_cond is not None
            loop.run()
            ours = loop.buffers.images.permute(0, 2, 3, 1).float().numpy().copy()
            assert np.array_equal(ours, reference), (guidance, np.abs(ours - reference).max())
            seen.append(ours)
    assert not np.array_equal(seen[0], seen[1])  # the embedding reached the UNet


def test_half_precision_sdxl_decodes_in_float32_like_the_pipeline(tiny):
    """SDXL in fp16 with `force_upcast`: the pipeline converts its VAE to float32 for the decode
    and back; the loop decodes with one float32 copy (weights that stay put), same pixels."""
    common = dict(lcm_lora=str(tiny.lcm_sdxl), device="cpu", dtype="fp16", speed="default")
    plain = build_engine(model=str(tiny.sdxl), **common)
    looped = build_engine(model=str(tiny.sdxl), **common)
    runner = GraphedTxt2ImgRunner(((SIZE, SIZE, 2), (SIZE, SIZE, 1)), steps=(STEPS,),
                                  eager=True)
    runner.install(looped)
    first, second = (runner.loops[(SIZE, SIZE, b, STEPS)] for b in (2, 1))
    assert first.decoder.dtype == torch.float32 and first.vae.dtype == torch.float16
    assert second.decoder is first.decoder  # one float32 copy for all the runner's loops
    requests = [_request("a red house", 11), _request("a blue boat", 12)]
    ours = _through_loop(looped, runner, requests)
    reference = np.concatenate([r.images for r in plain.run([Job(plain.plan(q))
                                                             for q in requests])])
    assert np.array_equal(ours, reference), np.abs(ours - reference).max()
