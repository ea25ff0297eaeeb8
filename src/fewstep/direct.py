"""A repeated one-shot text-to-image command, run on its converted models alone.

On a CPU a one-shot command that finds its models converted spends about 5 s of its 17 s
(SD1.5 at 256x256, two cores) importing diffusers and transformers and loading torch's
weights, only to route every call to the converted models. So the engine's run of a command
that ran (or will run) wholly on them leaves, in the note of what it compiled
(`fewstep.ahead`), what a loop over those models needs to give the very same pixels: the
scheduler's per-step scalars, the tokenizer (as its `tokenizers` file), the VAE's 1x1
post-quant convolution, the latent scale, the record's fields and the files all of it came
from. The same command started again (another prompt or seed) runs that loop, with torch
only for the seeded noise and the few tensor operations the pipeline does between the
models, when nothing it depends on changed: the model's and LoRA's files (size and time),
the steps, and the versions of fewstep, torch, diffusers, transformers and OpenVINO. Anything
else (LoRA stacks, guidance above 1, several images, other tasks or dtypes, a tiny VAE, hub
references, the SDXL family) runs on the engine.

The loop repeats diffusers' `StableDiffusionPipeline` and `LCMScheduler.step` operation by
operation (tests compare its pixels and record with the engine's)."""

from __future__ import annotations

import hashlib
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

FORMAT = 1
PARTS = ("text_encoder", "unet", "decoder")
_VERSIONED = ("torch", "diffusers", "transformers", "openvino")


# -- the plan, written by the engine's run --------------------------------------------------

def plan(engine, call, options, compiled: list[dict]) -> dict | None:
    """What the loop needs to repeat `call` (just run by `engine`) without the engine, or None
    when the call is not one it repeats. `compiled`: the fixed-shape IRs the engine's
    converted models were compiled from (`OpenVINOParts.compiled_static`)."""
    try:
        return _plan(engine, call, options, compiled)
    except Exception:  # noqa: BLE001 - the command's file is written: a plan is only a saving
        return None  # the engine runs the next one too


def _plan(engine, call, options, compiled: list[dict]) -> dict | None:
    parts = getattr(engine.fast_path, "openvino", None)
    if parts is None or call.task != "txt2img" or call.loras or call.components \
            or call.count != 1 or engine.family.sdxl_like or engine.tiny_vae \
            or parts.tiny_decoder or not (parts.decoder and parts.text) \
            or str(engine.dtype) != "torch.float32":
        return None  # (another dtype rounds the latents between the models' calls)
    pipe = engine.pipeline(call.task)
    if call.guidance > 1 or getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
        return None  # classifier-free guidance (a doubled batch), or a guidance embedding
    scheduler = pipe.scheduler
    config = scheduler.config
    if type(scheduler).__name__ not in ("LCMScheduler", "StaticLCMScheduler") or \
            config.prediction_type != "epsilon" or config.thresholding or config.clip_sample:
        return None
    vae = pipe.vae
    if vae.use_tiling or getattr(pipe.text_encoder.config, "use_attention_mask", False):
        return None
    files = _files(options)
    if files is None:
        return None  # a hub reference: the engine checks it for updates
    models = _models(compiled, call)
    if models is None:
        return None
    cache = Path(models["unet"]["ir"]).parent
    scale = engine.base.vae_scale_factor
    record = engine.record(call, width=call.width, height=call.height).model_dump()
    for name in ("request", "inputs", "width", "height", "batch_index", "catalog_names"):
        record.pop(name, None)
    return {
        "format": FORMAT,
        "versions": _versions(),
        "steps": call.steps,
        "width": call.width,
        "height": call.height,
        "latent": [vae.config.latent_channels, call.height // scale, call.width // scale],
        "scaling_factor": float(vae.config.scaling_factor),
        "init_noise_sigma": float(scheduler.init_noise_sigma),
        "schedule": _schedule(scheduler, call.steps),
        "tokenizer": _save_tokenizer(pipe.tokenizer, cache),
        "post_quant_conv": _save_post_quant_conv(vae, cache),
        "models": models,
        "view": {"family": engine.family.name, "native_size": engine.native_size,
                 "model_ref": engine.model_ref},
        "record": record,
        "speed_line": f"speed {engine.speed}: OpenVINO {parts.precision} ("
                      + ", ".join(sorted(_label(part, call) for part in PARTS))
                      + "), from the cache",
        "files": files,
    }


def _label(part: str, call) -> str:
    return part if part == "text_encoder" else f"{part}_{call.width}x{call.height}"


def _versions() -> dict[str, str]:
    from .version import __version__

    versions = {"fewstep": __version__, "format": str(FORMAT)}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


def _files(options) -> list[list] | None:
    """(path, size, mtime) of every file the weights came from; None when one is not local."""
    from .loading import parse_ref
    from .lora import split_weight

    refs = [("model", options.model)]
    if options.model_config_dir:
        refs.append(("model_config_dir", options.model_config_dir))
    lcm, _ = split_weight(options.lcm_lora)
    if lcm == "auto":
        return None  # the family's LCM-LoRA from the hub
    if lcm != "none":
        refs.append(("lcm_lora", lcm))
    out = []
    for field, text in refs:
        ref = parse_ref(text, field)
        if ref.path is None:
            return None
        found = sorted(p for p in ref.path.rglob("*") if p.is_file()) if ref.path.is_dir() \
            else [ref.path]
        out += [[str(p), *_stat(p)] for p in found]
    return out


def _stat(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def _models(compiled: list[dict], call) -> dict | None:
    """The fixed-shape IR (and its compile settings) of each part, for a batch of one."""
    size = f"-{call.width}x{call.height}-"
    models = {}
    for entry in compiled:
        part, name = entry.get("part"), Path(entry["ir"]).name
        if entry.get("batch") != 1 or part not in PARTS:
            continue
        if part != "text_encoder" and size not in name:
            continue
        models[part] = {"ir": entry["ir"], "settings": entry["settings"],
                        "blobs": entry["blobs"]}
    return models if set(models) == set(PARTS) else None


def _schedule(scheduler, steps: int) -> dict[str, list]:
    """The per-step scalars `LCMScheduler.step` computes, as the float32 values it computes
    (exact in JSON: a float32 is a float64)."""
    from .accel.scheduler import StaticLCMScheduler

    static = StaticLCMScheduler.from_config(scheduler.config)
    static.set_timesteps(steps)
    tables = static.tables("cpu")
    out = {"timesteps": [int(t) for t in static.timesteps.tolist()]}
    for name, values in tables.items():
        out[name] = [float(v) for v in values]
    return out


def _save_tokenizer(tokenizer, cache: Path) -> dict[str, Any]:
    """The tokenizer as a `tokenizers` file in the cache (named by its content), with the
    padding and truncation the pipeline asks for."""
    from tokenizers import Tokenizer

    from .outputs import write_atomically

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    text = backend.to_str()
    path = cache / f"tokenizer-{hashlib.sha256(text.encode()).hexdigest()[:20]}.json"
    if not path.is_file():
        write_atomically([(path, text.encode())])
    return {"file": str(path), "length": int(tokenizer.model_max_length),
            "pad_id": int(tokenizer.pad_token_id), "pad_token": str(tokenizer.pad_token),
            "padding_side": tokenizer.padding_side,
            "truncation_side": tokenizer.truncation_side}


def _save_post_quant_conv(vae, cache: Path) -> str | None:
    import torch
    from safetensors.torch import save

    from .outputs import write_atomically

    conv = vae.post_quant_conv
    if conv is None:
        return None
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        raise ValueError("not a plain 1x1 convolution")
    tensors = {"weight": conv.weight.detach().to(torch.float32).contiguous(),
               "bias": conv.bias.detach().to(torch.float32).contiguous()}
    data = save(tensors)
    path = cache / f"post_quant_conv-{hashlib.sha256(data).hexdigest()[:20]}.safetensors"
    if not path.is_file():
        write_atomically([(path, data)])
    return str(path)


# -- the loop, for the same command again ----------------------------------------------------

def usable(plan: dict | None, request) -> bool:
    """Whether `plan` (from the note of the same command) repeats `request`: its steps, no
    LoRA stack, and nothing it was made from changed."""
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        return False
    try:
        if request.task != "txt2img" or request.loras or request.num_images != 1 or \
                request.steps != plan["steps"]:
            return False
        if plan["versions"] != _versions():
            return False
        for path, size, mtime in plan["files"]:
            if list(_stat(Path(path))) != [size, mtime]:
                return False
        needed = [plan["tokenizer"]["file"]] + [m["ir"] for m in plan["models"].values()]
        needed += [str(Path(m["ir"]).with_suffix(".bin")) for m in plan["models"].values()]
        if plan["post_quant_conv"]:
            needed.append(plan["post_quant_conv"])
        return all(Path(p).is_file() for p in needed)
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        return False


def plan_call(plan: dict, request, settings):
    """The request checked and described as the engine's blueprint would (limits, sizes, a
    seed drawn when none was given), against the model the plan was made for."""
    from .calls import ModelView, plan_call as plan_with
    from .families import family_by_name

    view = plan["view"]

    def no_adapter(ref: str):
        raise AssertionError("txt2img takes no adapter")

    return plan_with(request, ModelView(
        family=family_by_name(view["family"]), native_size=int(view["native_size"]),
        inpaint_only=False, settings=settings, adapter_geometry=no_adapter,
        model_ref=view["model_ref"]))


def run(plan: dict, call, progress: Callable[[int, int], None] | None = None):
    """Run `call` (planned by `plan_call`) on the converted models: an engine `Result`."""
    import numpy as np
    import torch

    from .engine import Result
    from .records import Record

    start = time.perf_counter()
    models = {part: _Model(spec) for part, spec in plan["models"].items()}
    embeds = models["text_encoder"].first(token_ids(plan["tokenizer"], call.prompt))

    generator = torch.Generator("cpu").manual_seed(call.seed)
    shape = (1, *plan["latent"])
    latents = torch.randn(shape, generator=generator, dtype=torch.float32)
    latents = latents * plan["init_noise_sigma"]
    table = {name: [torch.tensor(v, dtype=torch.float32) for v in values]
             for name, values in plan["schedule"].items() if name != "timesteps"}
    timesteps = plan["schedule"]["timesteps"]
    for k, t in enumerate(timesteps):
        eps = models["unet"].first(latents.numpy(), np.asarray(t, dtype=np.int64),
                                   embeds.numpy())
        # LCMScheduler.step, operation by operation
        x0 = (latents - table["beta_sqrt"][k] * eps) / table["alpha_sqrt"][k]
        denoised = table["c_out"][k] * x0 + table["c_skip"][k] * latents
        if k != len(timesteps) - 1:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
            latents = table["alpha_prev_sqrt"][k] * denoised + \
                table["beta_prev_sqrt"][k] * noise
        else:
            latents = denoised
        if progress is not None:
            progress(k + 1, len(timesteps))
    z = latents / plan["scaling_factor"]
    if plan["post_quant_conv"]:
        from safetensors.torch import load_file

        conv = load_file(plan["post_quant_conv"])
        z = torch.nn.functional.conv2d(z, conv["weight"], conv["bias"])
    image = models["decoder"].first(z.numpy())
    image = torch.stack([(image[0] * 0.5 + 0.5).clamp(0, 1)])  # the pipeline's postprocess
    images = np.asarray(image.cpu().permute(0, 2, 3, 1).float().numpy(), dtype=np.float32)
    seconds = time.perf_counter() - start
    record = Record(**plan["record"], request=dict(call.record), inputs=dict(call.inputs),
                    width=int(images.shape[-2]), height=int(images.shape[-3]))
    return Result(task=record.task, images=images, record=record,
                  warnings=list(call.warnings), seconds=seconds)


def token_ids(spec: dict, prompt: str):
    """The pipeline's `tokenizer(prompt, padding="max_length", max_length=..., truncation=True)`
    input ids, from the tokenizer file `_save_tokenizer` wrote: a (1, length) int64 array."""
    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(spec["file"])
    tokenizer.enable_truncation(spec["length"], direction=spec["truncation_side"])
    tokenizer.enable_padding(length=spec["length"], pad_id=spec["pad_id"],
                             pad_token=spec["pad_token"], direction=spec["padding_side"])
    return np.asarray([tokenizer.encode(prompt).ids], dtype=np.int64)


class _Model:
    """A converted part: compiled ahead (`fewstep.ahead`) or now, from its fixed-shape IR."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.request = None

    def first(self, *arrays):
        import numpy as np
        import torch

        if self.request is None:
            self.request = self._compiled().create_infer_request()
            ran_before = False
        else:
            ran_before = True
        # (np.ascontiguousarray would make a 0-d timestep 1-d)
        out = self.request.infer([a if a.flags.c_contiguous else a.copy() for a in arrays])[0]
        if not ran_before:  # its weights are copied: their mapped pages are not read again
            from .pages import release_clean_file_pages

            release_clean_file_pages()
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))

    def _compiled(self):
        from . import ahead

        ir, settings = self.spec["ir"], dict(self.spec["settings"])
        compiled = ahead.take(ir, settings)
        if compiled is not None:
            return compiled
        import openvino as ov

        from .pages import releasing_blob_pages

        with releasing_blob_pages():
            return ahead.compile_ir(ov.Core(), ir, settings, self.spec["blobs"])


def noted(folder: str | os.PathLike, digest: str) -> dict | None:
    """The plan in the note of the command `digest`, if it left one."""
    from .ahead import read_note

    note = read_note(folder, digest)
    return note.get("direct") if note else None

