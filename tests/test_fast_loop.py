"""The fast denoising loop, on CPU with tiny models: the sync-free LCM scheduler gives bitwise the
stock scheduler's steps; the loop reads nothing back from the device; batched calls give each
request's own picture; a UNet compiled ahead for declared shapes never compiles inside a request,
and LoRA changes keep its graphs valid."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from fewstep.accel.scheduler import StaticLCMScheduler
from fewstep.accel.syncs import count_loop_syncs
from fewstep.build import build_engine
from fewstep.engine import Job
from fewstep.selftest import sample_image
from fewstep.tasks import ControlNetRequest, Img2ImgRequest, LoraRequest, Txt2ImgRequest

BATCH_TOL = 1e-3  # the bound for a batched image against its solo run


def _schedulers():
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    return LCMScheduler(**config), StaticLCMScheduler(**config)


@pytest.mark.parametrize("steps,begin", [(4, None), (8, None), (1, None), (4, 1), (6, 3)])
def test_static_scheduler_equals_stock_step_by_step(steps, begin):
    stock, static = _schedulers()
    for scheduler in (stock, static):
        scheduler.set_timesteps(steps)
        if begin is not None:  # what img2img pipelines do for a strength below 1
            scheduler.set_begin_index(begin)
    assert torch.equal(stock.timesteps, static.timesteps)
    rng = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=rng)
    a = b = sample
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in stock.timesteps[begin or 0:]:
        output = torch.randn(2, 4, 8, 8, generator=rng)
        a, den_a = stock.step(output, t, a, generator=gen_a, return_dict=False)
        b, den_b = static.step(output, t, b, generator=gen_b, return_dict=False)
        assert torch.equal(a, b) and torch.equal(den_a, den_b)
    # the same random numbers were used: both generators are in the same state afterwards
    assert torch.equal(gen_a.get_state(), gen_b.get_state())


def test_static_scheduler_draws_per_sample_generators_like_stock():
    stock, static = _schedulers()
    for scheduler in (stock, static):
        scheduler.set_timesteps(4)
    sample = torch.zeros(2, 4, 8, 8)
    gens = [[torch.Generator().manual_seed(s) for s in (1, 2)] for _ in range(2)]
    a = b = sample
    for t in stock.timesteps:
        output = torch.ones(2, 4, 8, 8)
        a = stock.step(output, t, a, generator=gens[0], return_dict=False)[0]
        b = static.step(output, t, b, generator=gens[1], return_dict=False)[0]
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def engines(tiny):
    common = dict(lcm_lora=str(tiny.lcm_sd15), device="cpu", dtype="fp32")
    return (build_engine(model=str(tiny.sd15), speed="off", **common),
            build_engine(model=str(tiny.sd15), speed="default", **common))


@pytest.mark.parametrize("make", [
    lambda: Txt2ImgRequest(prompt="a lighthouse", seed=3, steps=4, width=64, height=64),
    lambda: Img2ImgRequest(prompt="a lighthouse", seed=3, steps=4, image=sample_image(),
                           strength=0.75),
], ids=["txt2img", "img2img"])
def test_denoising_loop_reads_nothing_back(engines, make):
    plain, fast = engines
    stock_reads, _ = count_loop_syncs(plain.base, lambda: plain.generate(make()))
    fast_reads, counter = count_loop_syncs(fast.base, lambda: fast.generate(make()))
    assert stock_reads > 0  # the stock scheduler's .item() calls are seen by the counter
    assert fast_reads == 0, "\n".join(counter.where[:3])
    assert np.abs(plain.generate(make()).images - fast.generate(make()).images).max() <= 1e-4


def _jobs(engine, requests):
    return [Job(engine.plan(r)) for r in requests]


@pytest.mark.parametrize("task", ["txt2img", "img2img", "controlnet"])
def test_batched_call_equals_each_request_alone(engines, tiny, task):
    _, engine = engines
    prompts = ["a red house", "a blue boat", "a green tree"]
    if task == "txt2img":
        requests = [Txt2ImgRequest(prompt=p, seed=10 + i, width=64, height=64)
                    for i, p in enumerate(prompts)]
    elif task == "img2img":
        requests = [Img2ImgRequest(prompt=p, seed=10 + i, image=sample_image(i))
                    for i, p in enumerate(prompts)]
    else:
        requests = [ControlNetRequest(prompt=p, seed=10 + i, control_image=sample_image(i),
                                      controlnet=str(tiny.controlnet))
                    for i, p in enumerate(prompts)]
    jobs = _jobs(engine, requests)
    assert len({job.call.merge_key() for job in jobs}) == 1
    batched = engine.run(jobs)
    assert len(batched) == 3
    for request, result in zip(requests, batched):
        alone = engine.generate(request)
        assert result.record.request["seed"] == alone.record.request["seed"]
        assert np.abs(result.images - alone.images).max() <= BATCH_TOL
    assert not np.allclose(batched[0].images, batched[1].images)


def test_calls_that_differ_are_not_merged(engines):
    _, engine = engines
    a = engine.plan(Txt2ImgRequest(prompt="a", seed=1, width=64, height=64))
    b = engine.plan(Txt2ImgRequest(prompt="b", seed=2, width=64, height=64, steps=2))
    c = engine.plan(Txt2ImgRequest(prompt="c", seed=3, width=64, height=64, num_images=2))
    assert a.merge_key() != b.merge_key() and c.merge_key() is None
    with pytest.raises(ValueError):
        engine.run([Job(a), Job(b)])


def test_cancelled_member_of_a_batch_is_marked_and_others_finish(engines):
    import threading

    _, engine = engines
    cancel = threading.Event()
    jobs = _jobs(engine, [Txt2ImgRequest(prompt=p, seed=1, width=64, height=64)
                          for p in ("a", "b")])
    jobs[0].cancel = cancel
    jobs[0].progress = lambda step, total: cancel.set()
    results = engine.run(jobs)
    assert jobs[0].cancelled and not jobs[1].cancelled
    assert results[1].images.shape == (1, 64, 64, 3)


# -- compiled ahead (torch.compile on CPU) ----------------------------------------------------

@pytest.fixture(scope="module")
def compiled(tiny, tmp_path_factory):
    """An engine whose UNet is compiled ahead for 64x64 batch 1, with two LoRAs preloaded."""
    from fewstep.accel import FastOptions, FastPath

    path = FastPath(FastOptions(compile_unet=True, compile_shapes=((64, 64, 1),),
                                compile_cache_dir=str(tmp_path_factory.mktemp("inductor"))))
    engine = build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu",
                          dtype="fp32", fast_path=path,
                          loras={"lora.a": str(tiny.style_sd15),
                                 "lora.b": str(tiny.style_sd15_peft)})
    return engine, path


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["stats"].values()) and counters["stats"]["unique_graphs"]


def test_new_shape_runs_at_once_without_compiling(compiled, engines):
    engine, path = compiled
    assert path.report.seconds["warmup"] > 0
    plain, _ = engines
    before = _graphs()
    request = Txt2ImgRequest(prompt="new shape", seed=4, width=48, height=40, steps=2)
    image = engine.generate(request).images
    assert _graphs() == before  # nothing compiled for 48x40
    assert np.abs(image - plain.generate(request).images).max() <= BATCH_TOL
    # the warmed shape uses its graph: running it under "fail_on_recompile" does not raise
    with _no_recompile(engine):
        engine.generate(Txt2ImgRequest(prompt="warm shape", seed=4, width=64, height=64,
                                       steps=2))


@contextlib.contextmanager
def _no_recompile(engine):
    """Calls inside raise instead of compiling or falling back to eager for a changed graph."""
    remove = engine.add_call_context(lambda: torch.compiler.set_stance("fail_on_recompile"))
    try:
        yield
    finally:
        remove()


def test_lora_changes_keep_the_compiled_graph_valid(compiled, engines, tiny):
    engine, _ = compiled
    plain, _ = engines
    stacks = [[LoraRequest(ref=str(tiny.style_sd15), weight=0.8)],
              [LoraRequest(ref=str(tiny.style_sd15), weight=0.3),
               LoraRequest(ref=str(tiny.style_sd15_peft), weight=0.6)],
              []]
    for loras in stacks:
        request = Txt2ImgRequest(prompt="switch", seed=9, width=64, height=64, steps=2,
                                 loras=loras)
        before = _graphs()
        # a stack change writes new values into the same weights: the warmed graph stays
        # valid, so this call may not fall back to a recompile (it would raise)
        with _no_recompile(engine):
            image = engine.generate(request).images
        assert _graphs() == before
        assert np.abs(image - plain.generate(request).images).max() <= BATCH_TOL, loras


def test_several_images_per_request_match_the_recipe(tiny):
    from fewstep.reference import recipe_arguments, recipe_call, recipe_pipeline

    engine = build_engine(model=str(tiny.sd15), lcm_lora=str(tiny.lcm_sd15), device="cpu",
                          dtype="fp32")
    request = Txt2ImgRequest(prompt="two of them", seed=8, width=64, height=64, num_images=2)
    ours = engine.generate(request).images
    pipe = recipe_pipeline("txt2img", str(tiny.sd15), str(tiny.lcm_sd15))
    reference = recipe_call(pipe, request.prompt, 8, **recipe_arguments(request))
    assert ours.shape == reference.shape == (2, 64, 64, 3)
    assert np.abs(ours - reference).max() <= 1e-3
