"""Which CPU technique pays for the SD1.5 UNet or VAE decoder, and what it does to the output.

    PYTHONPATH=src python scripts/cpu_speed_probe.py --model /tmp/fsbench/sd15/model \\
        --part unet --variants eager,cl,compile-freeze-cl,bf16-cl --rounds 3

The model folder is one `fewstep bench` wrote (`--workdir`, then `sd15/model`). Each variant is
built first (its build time, compiling included, is reported), then the variants are timed in
turns, one call each per round, so a shared machine's load falls on all of them alike. Reported
per variant: the fastest and the median call, and the largest difference of its output from the
plain float32 model's (UNet: the noise prediction, with the reference's largest value for scale;
VAE: the decoded image in 0..1).

Variants (joined with '-'): `eager` (plain), `cl` (channels_last weights and input), `bf16`,
`compile` (torch.compile, inductor C++), `freeze` (with `torch._inductor.config.freezing`: the
weights become constants, so LoRA weight changes written in place would not be seen), and
`openvino-f32` / `openvino-bf16` (OpenVINO's CPU plugin with that inference precision; needs
the `openvino` package)."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def _inputs(part: str, latent: int):
    gen = torch.Generator().manual_seed(0)
    if part == "unet":
        return (torch.randn(1, 4, latent, latent, generator=gen), torch.tensor(759),
                torch.randn(1, 77, 768, generator=gen))
    return (torch.randn(1, 4, latent, latent, generator=gen),)


class _Unet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, e):
        return self.unet(x, t, e, return_dict=False)[0]


class _Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return (self.vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)


def _load(part: str, model: str) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if part == "unet":
        return _Unet(UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval())
    return _Decoder(AutoencoderKL.from_pretrained(model, subfolder="vae").eval())


def build(variant: str, base: torch.nn.Module, inputs):
    """A callable for `variant` and the seconds it took to make (compiling: its first call)."""
    start = time.perf_counter()
    flags = set(variant.split("-"))
    if "openvino" in flags:
        import openvino as ov

        precision = "bf16" if "bf16" in flags else "f32"
        with torch.no_grad():
            converted = ov.convert_model(base, example_input=inputs)
        compiled = ov.Core().compile_model(converted, "CPU",
                                           {"INFERENCE_PRECISION_HINT": precision})
        request = compiled.create_infer_request()
        arrays = [x.numpy() for x in inputs]

        def call():
            return torch.from_numpy(request.infer(arrays)[0].copy())

        call()
        return call, time.perf_counter() - start
    dtype = torch.bfloat16 if "bf16" in flags else torch.float32
    # a copy only when the weights change (memory: an SD1.5 UNet is 3.4 GB in float32)
    module = copy.deepcopy(base).to(dtype) if ("cl" in flags or "bf16" in flags) else base
    args = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
    if "cl" in flags:
        module = module.to(memory_format=torch.channels_last)
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
    fn = module
    if "compile" in flags:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = "freeze" in flags
        fn = torch.compile(module, dynamic=False)

    def call():
        with torch.inference_mode():
            return fn(*args).float()

    call()
    return call, time.perf_counter() - start


def peak(rounds: int) -> int:
    """GFLOP/s of a 2048x2048 matrix product: what this CPU's cores reach in practice."""
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 2048, dtype=dtype)
        b = torch.randn(2048, 2048, dtype=dtype)
        torch.mm(a, b)
        times = []
        for _ in range(max(rounds, 3) * 3):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        flop = 2 * 2048**3
        print(json.dumps({"part": "peak", "dtype": str(dtype).removeprefix("torch."),
                          "best_gflop_s": round(flop / min(times) / 1e9, 1),
                          "median_gflop_s": round(flop / statistics.median(times) / 1e9, 1),
                          "threads": torch.get_num_threads()}), flush=True)
    return 0


def flops(part: str, resolution: int) -> float:
    """GFLOP of one call (torch's flop counter, on the meta device: no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from fewstep.bench.models import SD15_UNET, SD_VAE

    latent = resolution // 8
    with torch.device("meta"):
        inputs = ((torch.empty(1, 4, latent, latent), torch.tensor(759), torch.empty(1, 77, 768))
                  if part == "unet" else (torch.empty(1, 4, latent, latent),))
        model = (_Unet(UNet2DConditionModel(**SD15_UNET)) if part == "unet"
                 else _Decoder(AutoencoderKL(**SD_VAE)))
        with FlopCounterMode(display=False) as counter:
            model(*inputs)
    return counter.get_total_flops() / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a diffusers SD1.5 folder (not for --part peak)")
    p.add_argument("--part", choices=("unet", "vae", "peak"), default="unet",
                   help="peak: the matrix-multiply rate in float32 and bfloat16 (the ceiling)")
    p.add_argument("--variants", default="eager,cl,compile-freeze-cl,bf16-cl")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.part == "peak":
        return peak(args.rounds)
    if not args.model:
        p.error("--model: the SD1.5 folder is needed for --part unet and vae")
    inputs = _inputs(args.part, args.resolution // 8)
    base = _load(args.part, args.model)
    with torch.inference_mode():
        reference = base(*inputs).float()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    calls, report = {}, {}
    for variant in variants:
        calls[variant], built = build(variant, base, inputs)
        out = calls[variant]()
        report[variant] = {"build_s": round(built, 1),
                           "max_abs_diff": float((out - reference).abs().max()),
                           "times": []}
        print(json.dumps({"built": variant, **{k: v for k, v in report[variant].items()
                                                if k != "times"}}), flush=True)
    for _ in range(args.rounds):
        for variant in variants:
            start = time.perf_counter()
            calls[variant]()
            report[variant]["times"].append(time.perf_counter() - start)
    scale = float(reference.abs().max())
    gflop = flops(args.part, args.resolution)
    for variant in variants:
        times = report[variant].pop("times")
        print(json.dumps({"part": args.part, "variant": variant, "resolution": args.resolution,
                          "best_s": round(min(times), 3),
                          "median_s": round(statistics.median(times), 3),
                          "gflop": round(gflop, 1),
                          "best_gflop_s": round(gflop / min(times), 1),
                          "reference_max": round(scale, 4), **report[variant],
                          "threads": torch.get_num_threads()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
