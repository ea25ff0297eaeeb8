"""The peers' benchmark: fewstep against the CPU engines a user would pick instead, side by side in
one run, at the same precision on the same weights (the real SD1.5 architecture with random
weights, the LCM-LoRA fused in, 4 steps, guidance 1, batch 1).

    python benchmarks/peers.py --resolution 256            # the real models (tens of minutes)
    python benchmarks/peers.py --tiny --resolution 64      # smoke run on the tiny test models

Contenders (`--contenders`, all by default):

* `recipe`: the LCM-LoRA guide's diffusers code (`fewstep.reference`), the LoRA left unfused,
* `fewstep-auto`, `fewstep-fastest`: `fewstep.build_engine(speed=...)` as a user makes it, the
  size built ahead as the CLI does; started twice on one cache folder (empty, then warm),
* `genai-*`: OpenVINO GenAI's `Text2ImagePipeline` (its C++ loop) on the model exported by
  optimum-intel, f32 / bf16 inference precision / int8 weights,
* `optimum-*`: optimum-intel's `OVStableDiffusionPipeline` (what FastSD CPU runs), reshaped to the
  size and compiled as FastSD CPU does, f32 / int8 weights,
* `sdcpp-*`: stable-diffusion.cpp (PyPI `stable-diffusion-cpp-python`, compiled from source at
  install time) on the same weights as one original-layout .safetensors file, f32 / q8_0.

Each contender runs in its own process: process start to first image, the warm latency of a few
more calls (p50) and the process's peak resident memory (VmHWM). The peers' packages are
installed on demand, at pinned versions, into a separate virtual environment
(`benchmarks/.peers-venv`, git-ignored); fewstep's own environment runs the recipe and fewstep.
Results: `benchmarks/results/peers-<machine>-sd15-<size>.{json,md}`."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS_VENV = HERE / ".peers-venv"
RESULTS = HERE / "results"
MARK = "PEERS-CHILD "
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEED = 42

# the peers' packages; optimum-intel 2.2 caps huggingface-hub below what fewstep's diffusers
# needs, hence a venv of their own with the diffusers / transformers optimum-intel accepts
PEER_PACKAGES = (
    "torch==2.13.0",
    "openvino==2026.4.1",
    "openvino-genai==2026.4.1.0",
    "openvino-tokenizers==2026.4.1.0",
    "optimum==2.3.0",
    "optimum-intel[openvino]==2.2.0",
    "nncf==3.4.0",
    "diffusers==0.39.0",
    "transformers==5.5.4",
    "huggingface-hub==1.21.0",
    "accelerate==1.16.0",
    "stable-diffusion-cpp-python==0.4.7",
)
# what each process reports as its versions
MAIN_VERSIONS = ("fewstep", "torch", "diffusers", "transformers", "openvino")
PEER_VERSIONS = ("torch", "diffusers", "transformers", "openvino", "openvino-genai",
                 "openvino-tokenizers", "optimum", "optimum-intel", "nncf",
                 "stable-diffusion-cpp-python")


@dataclass(frozen=True)
class Contender:
    name: str
    engine: str
    precision: str
    weights: str  # what it loads
    env: str  # "main": fewstep's environment; "peers": the peers' venv
    note: str = ""


CONTENDERS = (
    Contender("recipe", "diffusers, the LCM-LoRA guide's code", "f32",
              "diffusers folder + LCM-LoRA (peft, unfused)", "main"),
    Contender("fewstep-auto", "fewstep build_engine(speed='auto')", "f32",
              "diffusers folder + LCM-LoRA (fused at load)", "main"),
    Contender("fewstep-fastest", "fewstep build_engine(speed='fastest')", "bf16 + tiny VAE",
              "diffusers folder + LCM-LoRA (fused at load) + taesd", "main",
              "tiny VAE: not the recipe's pixels"),
    Contender("genai-f32", "OpenVINO GenAI Text2ImagePipeline", "f32",
              "OpenVINO IR of the fused model (optimum-cli, fp32)", "peers"),
    Contender("genai-bf16", "OpenVINO GenAI Text2ImagePipeline", "bf16",
              "OpenVINO IR of the fused model (optimum-cli, fp32)", "peers",
              "bf16 inference precision hint"),
    Contender("genai-int8", "OpenVINO GenAI Text2ImagePipeline", "int8 weights",
              "OpenVINO IR, int8 weights (optimum-cli --weight-format int8, NNCF)", "peers",
              "OpenVINO's default inference precision on this CPU for the rest"),
    Contender("optimum-f32", "optimum-intel OVStableDiffusionPipeline", "f32",
              "OpenVINO IR of the fused model (optimum-cli, fp32)", "peers",
              "reshaped to the size (batch free) and compiled, as FastSD CPU does"),
    Contender("optimum-int8", "optimum-intel OVStableDiffusionPipeline", "int8 weights",
              "OpenVINO IR, int8 weights (optimum-cli --weight-format int8, NNCF)", "peers",
              "reshaped and compiled as FastSD CPU does; OpenVINO's default precision otherwise"),
    Contender("sdcpp-f32", "stable-diffusion.cpp", "f32",
              "original-layout .safetensors of the fused model", "peers",
              "its own CLIP tokenizer (same 77-token shapes)"),
    Contender("sdcpp-q8_0", "stable-diffusion.cpp", "q8_0 weights",
              "original-layout .safetensors, quantized to q8_0 at load", "peers",
              "its own CLIP tokenizer (same 77-token shapes)"),
)
BY_NAME = {c.name: c for c in CONTENDERS}
# they keep what they built for the next start
TWICE = ("fewstep-auto", "fewstep-fastest")


def prompt(i: int) -> str:
    # a different prompt per call: no prompt cache flatters anyone
    return PROMPT if i == 0 else f"{PROMPT}, variant {i}"


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory (VmHWM: this process only, not a parent it forked
    from, which getrusage's ru_maxrss can include)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _versions(names) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# -- the weights every contender loads -------------------------------------------------------

def export_fused(model: Path, lora: Path, out: Path) -> Path:
    """The base pipeline with the LCM-LoRA fused into its UNet and LCMScheduler set, saved as a
    diffusers folder. The text encoder is written with the `text_model.` key prefix that
    published checkpoints carry, so older transformers (the peers' venv) read the same weights."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    pipe = StableDiffusionPipeline.from_pretrained(str(model), torch_dtype=torch.float32,
                                                   safety_checker=None)
    pipe.load_lora_weights(str(lora), adapter_name="lcm")
    pipe.fuse_lora(adapter_names=["lcm"], lora_scale=1.0)
    pipe.unload_lora_weights()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    for weights in (tmp / "text_encoder").glob("*.safetensors"):
        state = load_file(str(weights))
        if not all(k.startswith("text_model.") for k in state if k != "text_projection.weight"):
            state = {k if k.startswith("text_model.") else f"text_model.{k}": v
                     for k, v in state.items()}
            save_file(state, str(weights), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def export_single_file(fused: Path, path: Path) -> Path:
    """The fused model as one original-layout .safetensors checkpoint (stable-diffusion.cpp's
    input), written by fewstep's inverse of `from_single_file`."""
    import torch
    from diffusers import StableDiffusionPipeline

    from fewstep.testing_checkpoint import save_sd15_single_file

    pipe = StableDiffusionPipeline.from_pretrained(str(fused), torch_dtype=torch.float32,
                                                   safety_checker=None)
    return save_sd15_single_file(pipe, path)


def prepare_weights(args) -> dict[str, str]:
    """In fewstep's environment: the models (real architecture or tiny), the fused folder and the
    single file. Reused when already in the workdir."""
    import torch

    from fewstep.bench.models import build_real, build_tiny

    work = Path(args.workdir)
    started = time.perf_counter()
    if args.tiny:
        model, lora, taesd = build_tiny(work / "tiny", "sd15")
    else:
        model, lora, taesd = build_real("sd15", work / "sd15", torch.float32)
    fused, single = work / "fused", work / "fused-sd15.safetensors"
    marker = work / "fused.json"
    key = {"model": str(model), "lora": str(lora), "tiny": args.tiny}
    if not marker.is_file() or json.loads(marker.read_text()) != key or not single.is_file():
        export_fused(model, lora, fused)
        export_single_file(fused, single)
        marker.write_text(json.dumps(key))
    return {"model": str(model), "lora": str(lora), "taesd": str(taesd), "fused": str(fused),
            "single_file": str(single), "seconds": round(time.perf_counter() - started, 1)}


# -- the peers' environment ------------------------------------------------------------------

def peers_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_peers_venv(venv: Path) -> Path:
    """Create the peers' venv and install the pinned packages once (stable-diffusion.cpp compiles
    at install: minutes). PyPI's torchvision wheel, which optimum-intel pulls in, is built for
    PyPI's CUDA torch; where it cannot load next to the torch installed here it is removed
    (transformers then runs without it, as nothing here needs it)."""
    python = peers_python(venv)
    marker = venv / "fewstep-peers-pins.json"
    if python.exists() and marker.is_file() and \
            json.loads(marker.read_text()) == list(PEER_PACKAGES):
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"installing the peers' packages into {venv} (minutes: stable-diffusion.cpp compiles)",
          flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    probe = subprocess.run([str(python), "-c", "import torchvision"], capture_output=True)
    if probe.returncode:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision"],
                       check=True)
    marker.write_text(json.dumps(list(PEER_PACKAGES)))
    return python


def export_openvino(python: Path, fused: Path, out: Path, weight_format: str) -> dict[str, Any]:
    """optimum-intel's export of the fused model (what OpenVINO GenAI and optimum-intel load):
    IR files per part, the tokenizer converted by openvino-tokenizers. Reused when present."""
    marker = out / "fewstep-export.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    shutil.rmtree(out, ignore_errors=True)
    cli = python.parent / "optimum-cli"
    cmd = [str(cli), "export", "openvino", "--model", str(fused), "--task", "text-to-image",
           "--weight-format", weight_format, str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout)[-1500:], "command": " ".join(cmd)}
    info = {"seconds": round(time.perf_counter() - started, 1), "weight_format": weight_format,
            "command": " ".join(cmd)}
    marker.write_text(json.dumps(info))
    return info


# -- one contender, in its own process ------------------------------------------------------

def _runner(args, paths: dict[str, str]):
    """Load the contender (the part timed as `load`); return (run(i) -> float image HxWx3 in
    0..1, details)."""
    import numpy as np

    name, res, steps = args.child, args.resolution, args.steps
    details: dict[str, Any] = {}
    if name == "recipe":
        import torch

        from fewstep.reference import recipe_call, recipe_pipeline

        pipe = recipe_pipeline("txt2img", paths["model"], paths["lora"],
                               torch_dtype=torch.float32, device="cpu")

        def run(i):
            return recipe_call(pipe, prompt(i), SEED, num_inference_steps=steps,
                               guidance_scale=1.0, height=res, width=res)[0]
        return run, details
    if name.startswith("fewstep-"):
        from fewstep.build import build_engine
        from fewstep.tasks import Txt2ImgRequest

        speed = name.split("-")[1]
        engine = build_engine(model=paths["model"], lcm_lora=paths["lora"], speed=speed,
                              device="cpu", compile_shapes=((res, res, 1),),
                              compile_cache=args.cache_dir,
                              tiny_vae=paths["taesd"] if speed == "fastest" else None)
        details["fast_path"] = dict(engine.fast_report.applied)

        def run(i):
            request = Txt2ImgRequest(prompt=prompt(i), steps=steps, guidance=1.0, width=res,
                                     height=res, seed=SEED)
            return engine.generate(request).images[0]
        return run, details
    if name.startswith("genai-"):
        import openvino_genai as ov_genai

        precision = name.split("-", 1)[1]
        folder = paths["ir_int8" if precision == "int8" else "ir_f32"]
        properties = {"INFERENCE_PRECISION_HINT": precision} if precision != "int8" else {}
        pipe = ov_genai.Text2ImagePipeline(folder, "CPU", **properties)

        def run(i):
            out = pipe.generate(prompt(i), width=res, height=res, num_inference_steps=steps,
                                guidance_scale=1.0, rng_seed=SEED)
            return np.asarray(out.data)[0].astype(np.float32) / 255.0
        return run, details
    if name.startswith("optimum-"):
        import torch
        from optimum.intel import OVStableDiffusionPipeline

        precision = name.split("-", 1)[1]
        folder = paths["ir_int8" if precision == "int8" else "ir_f32"]
        config = {"INFERENCE_PRECISION_HINT": "f32"} if precision == "f32" else {}
        pipe = OVStableDiffusionPipeline.from_pretrained(folder, ov_config=config,
                                                         compile=False)
        # the batch stays free: a UNet without an LCM time condition would be fixed at the
        # doubled batch of guidance > 1, which guidance 1 does not run
        pipe.reshape(batch_size=-1, height=res, width=res, num_images_per_prompt=1)
        pipe.compile()

        def run(i):
            return pipe(prompt(i), num_inference_steps=steps, guidance_scale=1.0, height=res,
                        width=res, generator=torch.manual_seed(SEED),
                        output_type="np").images[0]
        return run, details
    if name.startswith("sdcpp-"):
        from stable_diffusion_cpp import StableDiffusion

        wtype = name.split("-", 1)[1]
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count()
        sd = StableDiffusion(model_path=paths["single_file"], wtype=wtype, n_threads=threads,
                             verbose=True)  # its log (stderr) says why, when it makes no image
        details["threads"] = threads

        def run(i):
            try:
                image = sd.generate_image(prompt=prompt(i), width=res, height=res, cfg_scale=1.0,
                                          sample_method="lcm", sample_steps=steps, seed=SEED)[0]
            except ValueError as e:  # the binding reads a NULL result
                raise RuntimeError(f"stable-diffusion.cpp made no image ({e})") from None
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return run, details
    raise SystemExit(f"error: unknown contender {name!r}")


def child(args) -> None:
    """In the contender's process: load, one image, `--repeats` more; print the timings."""
    imported = time.time()
    import numpy as np

    paths = json.loads(args.paths)
    run, details = _runner(args, paths)
    loaded = time.time()
    image = run(0)
    first = time.time()
    warm, cpu = [], []
    for i in range(1, args.repeats + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        run(i)
        warm.append(round((time.perf_counter() - start) * 1000, 1))
        # CPU seconds of all the process's threads: the work, less what other load costs
        cpu.append(round(time.process_time() - start_cpu, 2))
    if args.save_image:
        np.save(args.save_image, np.asarray(image, dtype=np.float32))
    env = MAIN_VERSIONS if BY_NAME[args.child].env == "main" else PEER_VERSIONS
    extra = {}
    if BY_NAME[args.child].env == "peers" and "sdcpp" not in args.child:
        import openvino as ov

        hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
        extra["openvino_cpu_default_precision"] = getattr(hint, "to_string", hint.__str__)()
    print(MARK + json.dumps({
        "imported_at": imported, "loaded_at": loaded, "first_image_at": first,
        "warm_ms": warm, "warm_cpu_s": cpu, "peak_rss_mb": _peak_rss_mb(),
        "image_shape": list(np.asarray(image).shape),
        "finite": bool(np.isfinite(np.asarray(image)).all()),
        "versions": _versions(env), "details": details, **extra}), flush=True)


def run_contender(args, contender: Contender, python: Path, paths: dict, cache_dir: str,
                  repeats: int, image: Path | None) -> dict[str, Any]:
    """Spawn the contender's process and turn what it printed into the result's fields."""
    cmd = [str(python), str(Path(__file__).resolve()), "--child", contender.name,
           "--paths", json.dumps(paths), "--resolution", str(args.resolution),
           "--steps", str(args.steps), "--repeats", str(repeats), "--cache-dir", cache_dir]
    if image is not None:
        cmd += ["--save-image", str(image)]
    src = str(REPO / "src")  # this checkout's fewstep (the peers' venv imports none of it)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH")) if p))
    load_before = _load()
    spawned = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=args.timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
    if proc.returncode or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        return {"error": "\n".join(tail)[-1500:], "load_average_1min": [load_before, _load()]}
    info = json.loads(line[len(MARK):])
    warm, cpu = info.pop("warm_ms"), info.pop("warm_cpu_s")
    return {
        "start_to_first_image_s": round(info.pop("first_image_at") - spawned, 2),
        "import_s": round(info["imported_at"] - spawned, 2),
        "load_s": round(info.pop("loaded_at") - info.pop("imported_at"), 2),
        "warm_ms_p50": round(statistics.median(warm), 1) if warm else None,
        "warm_ms_all": warm,
        "warm_cpu_s_p50": round(statistics.median(cpu), 2) if cpu else None,
        "load_average_1min": [load_before, _load()],
        **info,
    }


# -- the report ------------------------------------------------------------------------------

def _cell(value, suffix: str = "") -> str:
    return "—" if value is None else f"{value}{suffix}"


def summarize(results: dict[str, dict]) -> dict[str, dict]:
    """Per contender: speed-up of the warm p50 and of start-to-first-image against the recipe,
    and peak memory against the recipe's (None where either side is missing)."""
    base = results.get("recipe", {})
    base = base.get("first", base)
    out = {}
    for name, r in results.items():
        first = r.get("first", r)
        row: dict[str, Any] = {}
        for key, out_key in (("warm_ms_p50", "speedup_warm"),
                             ("start_to_first_image_s", "speedup_first_image")):
            a, b = base.get(key), first.get(key)
            row[out_key] = round(a / b, 2) if a and b else None
        a, b = base.get("peak_rss_mb"), first.get("peak_rss_mb")
        row["memory_vs_recipe"] = round(b / a, 2) if a and b else None
        out[name] = row
    return out


def _openvino_note(applied: str) -> str:
    """fewstep's FastPath report on OpenVINO, short: precision and parts, or why it is off."""
    if applied.startswith("on (") and ";" in applied:
        return "OpenVINO on (" + "; ".join(applied[4:].split("; ")[:2]) + ")"
    return f"OpenVINO {applied}"


def markdown(data: dict) -> str:
    cfg, results = data["config"], data["results"]
    ratios = summarize(results)
    lines = [
        f"# Peers: SD1.5 {cfg['resolution']}x{cfg['resolution']}, {cfg['steps']} steps, "
        f"guidance 1, batch 1 — {data['machine']['cpu']}",
        "",
        f"{data['machine']['cores']} cores, {data['machine']['memory_gb']} GB memory, "
        f"{data['machine']['system']}. Models: {cfg['models']}. Each contender in its own "
        f"process: process start to first image, then {cfg['repeats']} more calls (a new prompt "
        "each) for the warm p50; peak memory is the process's VmHWM.",
        "",
        "| contender | engine | precision | start to first image (s) | load (s) | warm p50 (ms) "
        "| speed-up vs recipe (warm p50) | CPU s per image (warm) | peak memory (MB) "
        "| memory vs recipe "
        "| load average (1 min, before/after) | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, r in results.items():
        c = BY_NAME.get(name)
        engine = c.engine if c else name
        precision = c.precision if c else "—"
        notes = [c.note] if c and c.note else []
        first = r.get("first", r)
        if "error" in first:
            # a contender that could not run stays in the table with the reason
            reason = first["error"].strip().splitlines()[-1] if first["error"].strip() else "?"
            notes.append(f"did not run: {reason[:160]}")
        if r.get("second"):
            second = r["second"]
            if "error" in second:
                notes.append("second start failed")
            else:
                notes.append(f"second start (warm cache): {second['start_to_first_image_s']} s "
                             f"to the first image, peak {second['peak_rss_mb']} MB")
        openvino = (first.get("details") or {}).get("fast_path", {}).get("openvino")
        if openvino:
            notes.append(_openvino_note(openvino))
        if first.get("max_pixel_diff_vs_recipe") is not None:
            notes.append(f"largest pixel difference vs recipe {first['max_pixel_diff_vs_recipe']}")
        load = first.get("load_average_1min") or []
        ratio = ratios.get(name, {})
        lines.append(
            f"| {name} | {engine} | {precision} | {_cell(first.get('start_to_first_image_s'))} "
            f"| {_cell(first.get('load_s'))} | {_cell(first.get('warm_ms_p50'))} "
            f"| {_cell(ratio.get('speedup_warm'), 'x')} | {_cell(first.get('warm_cpu_s_p50'))} "
            f"| {_cell(first.get('peak_rss_mb'))} "
            f"| {_cell(ratio.get('memory_vs_recipe'), 'x')} "
            f"| {' / '.join(str(v) for v in load) or '—'} | {'; '.join(notes) or ''} |")
    lines += ["", "Preparation, once (not in the times above):", ""]
    for step, info in data.get("preparation", {}).items():
        if isinstance(info, dict) and "error" in info:
            lines.append(f"- {step}: failed: {info['error'].strip().splitlines()[-1][:200]}")
        elif isinstance(info, dict):
            lines.append(f"- {step}: {info.get('seconds', '—')} s")
    lines += ["", "Versions:", ""]
    for env, versions in data["versions"].items():
        listed = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
        lines.append(f"- {env}: {listed or '—'}")
    if data.get("notes"):
        lines += ["", *[f"- {n}" for n in data["notes"]]]
    load = data.get("load_average_1min", {})
    lines += ["", f"1-minute load average: {load.get('start')} at the start, {load.get('end')} "
              f"at the end ({data['machine']['cores']} cores)."]
    for merged in data.get("merged", []):
        load = merged["load_average_1min"]
        lines.append(f"Run afterwards and added to these results: {', '.join(merged['contenders'])}"
                     f" (load average {load['start']} at its start, {load['end']} at its end).")
    lines.append("")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    try:
        memory = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory,
            "system": f"{platform.system()} {platform.release()}"}


def write(data: dict, out: Path, name: str, workdir: Path | None = None) -> Path:
    """The JSON and the markdown; paths inside the workdir and the checkout are written as
    `<workdir>/...` and `<repo>/...`: the results name no folder of the machine that made them."""
    text = json.dumps(data).replace(str(REPO), "<repo>")
    if workdir is not None:
        text = text.replace(str(Path(workdir).resolve()), "<workdir>")
        text = text.replace(str(workdir), "<workdir>")
    data = json.loads(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    path = out / f"{name}.md"
    path.write_text(markdown(data))
    return path


# -- the run ---------------------------------------------------------------------------------

def _image_diffs(results: dict, images: Path) -> None:
    """Largest pixel difference of each main-environment contender's first image against the
    recipe's (same seed, same noise generator). The peers draw their noise otherwise."""
    import numpy as np

    ref = images / "recipe.npy"
    if not ref.is_file():
        return
    base = np.load(ref)
    for name, r in results.items():
        path = images / f"{name}.npy"
        first = r.get("first", r)
        if name != "recipe" and BY_NAME[name].env == "main" and path.is_file() and \
                "error" not in first:
            other = np.load(path)
            if other.shape == base.shape:
                first["max_pixel_diff_vs_recipe"] = round(float(np.abs(other - base).max()), 6)


def _export_for(name: str) -> str | None:
    """The OpenVINO export a contender loads: "fp32", "int8", or None (it loads none)."""
    if not name.startswith(("genai-", "optimum-")):
        return None
    return "int8" if name.endswith("-int8") else "fp32"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="warm calls after the first")
    parser.add_argument("--contenders", default=",".join(c.name for c in CONTENDERS))
    parser.add_argument("--tiny", action="store_true", help="the tiny test models (smoke run)")
    parser.add_argument("--workdir", default="/tmp/fewstep-peers",
                        help="models, exports and caches (kept and reused)")
    parser.add_argument("--venv", default=str(PEERS_VENV), help="the peers' virtual env")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default=None)
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per process")
    parser.add_argument("--merge-into", metavar="JSON",
                        help="run --contenders and add them to an earlier run's results (the "
                        "recipe baseline stays that run's), rewriting its JSON and markdown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--save-image", help=argparse.SUPPRESS)
    parser.add_argument("--prepare-weights", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child(args)
        return 0
    if args.prepare_weights:
        print(MARK + json.dumps(prepare_weights(args)), flush=True)
        return 0
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"error: --contenders: unknown {', '.join(unknown)}; known: "
              f"{', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    load_start = _load()

    preparation: dict[str, Any] = {}
    src = str(REPO / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (src, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--prepare-weights",
           "--workdir", str(work)] + (["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
    if proc.returncode or line is None:
        print(f"error: preparing the weights failed:\n{(proc.stderr or proc.stdout)[-2000:]}",
              file=sys.stderr)
        return 1
    paths = json.loads(line[len(MARK):])
    preparation["weights (models, fused folder, single file)"] = {"seconds": paths.pop("seconds")}

    python_for = {"main": Path(sys.executable)}
    if any(BY_NAME[n].env == "peers" for n in names):
        started = time.perf_counter()
        python_for["peers"] = ensure_peers_venv(Path(args.venv))
        preparation["peers' venv"] = {"seconds": round(time.perf_counter() - started, 1)}
        for fmt, key in (("fp32", "ir_f32"), ("int8", "ir_int8")):
            if any(_export_for(n) == fmt for n in names):
                info = export_openvino(python_for["peers"], Path(paths["fused"]),
                                       work / f"openvino-{fmt}", fmt)
                preparation[f"OpenVINO export ({fmt})"] = info
                paths[key] = str(work / f"openvino-{fmt}")

    images = work / "images"
    images.mkdir(exist_ok=True)
    earlier = json.loads(Path(args.merge_into).read_text()) if args.merge_into else None
    results: dict[str, dict] = dict(earlier["results"]) if earlier else {}
    versions: dict[str, dict] = dict(earlier["versions"]) if earlier else {}
    for name in names:
        contender = BY_NAME[name]
        print(f"{name} ...", flush=True)
        cache = work / "caches" / name
        shutil.rmtree(cache, ignore_errors=True)  # the first start finds nothing built
        cache.mkdir(parents=True)
        export = _export_for(name)
        if export and "error" in preparation.get(f"OpenVINO export ({export})", {}):
            results[name] = {"error": f"the OpenVINO export it loads failed ({export})"}
            continue
        first = run_contender(args, contender, python_for[contender.env], paths, str(cache),
                              args.repeats, images / f"{name}.npy")
        entry = {"first": first}
        if name in TWICE and "error" not in first:
            entry["second"] = run_contender(args, contender, python_for[contender.env], paths,
                                            str(cache), 0, None)
        results[name] = entry
        shutil.rmtree(cache, ignore_errors=True)  # what fewstep built: gigabytes per contender
        if "versions" in first:
            versions[contender.env] = first["versions"]
        print(f"  {json.dumps({k: v for k, v in first.items() if k != 'versions'})[:400]}",
              flush=True)
    _image_diffs(results, images)

    if earlier is not None:
        order = [*earlier["results"], *[n for n in names if n not in earlier["results"]]]
        earlier["results"] = {n: results[n] for n in order}
        earlier["versions"] = versions
        earlier["config"]["contenders"].update({n: asdict(BY_NAME[n]) for n in names})
        earlier.setdefault("merged", []).append(
            {"contenders": names, "load_average_1min": {"start": load_start, "end": _load()}})
        earlier["notes"] = [*earlier.get("notes", []), *args.note]
        path = write(earlier, Path(args.merge_into).parent, Path(args.merge_into).stem, work)
        print(path)
        return 0

    data = {
        "machine": machine(),
        "config": {"family": "sd15", "resolution": args.resolution, "steps": args.steps,
                   "guidance": 1.0, "batch": 1, "repeats": args.repeats,
                   "models": "tiny test models" if args.tiny else
                   "real SD1.5 architecture, random weights, LCM-LoRA fused",
                   "contenders": {n: asdict(BY_NAME[n]) for n in names}},
        "preparation": preparation,
        "versions": versions,
        "results": results,
        "notes": args.note,
        "load_average_1min": {"start": load_start, "end": _load()},
    }
    slug = f"cpu-{os.cpu_count()}core"
    name = args.name or f"peers-{slug}-sd15-{args.resolution}" + ("-tiny" if args.tiny else "")
    path = write(data, Path(args.out), name, work)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
