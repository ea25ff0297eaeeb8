"""Model references -> loaded components.

A reference (REF) is one of
* a local diffusers folder (`model_index.json`, or a component's `config.json`),
* a local single-file checkpoint `*.safetensors` (original layout; needs a config),
* a hub repo id `owner/name`, optionally `owner/name/file.safetensors` for one file in it.

Pickle-based formats (.ckpt, .pt, .pth, .bin, .pkl) are refused before anything is opened, and
folders are loaded with `use_safetensors=True`, so no weights are ever unpickled."""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError, NotFound, OfflineError, UnsafeFormat

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(/[\w.\-/]+\.safetensors)?$")


@dataclass(frozen=True)
class Ref:
    """A parsed reference: exactly one of `path` (local) or `repo` (hub) is set."""

    text: str
    path: Path | None = None
    repo: str | None = None
    filename: str | None = None  # a file inside a hub repo

    @property
    def is_file(self) -> bool:
        return (self.path is not None and self.path.is_file()) or self.filename is not None


def parse_ref(text: str, field: str) -> Ref:
    text = str(text).strip()
    if not text:
        raise NotFound(f"{field} is empty", field=field)
    if text.lower().endswith(PICKLE_SUFFIXES):
        raise UnsafeFormat(
            f"{field} {text!r} is a pickle-based file, which can run arbitrary code when loaded; "
            "fewstep only loads .safetensors (convert it once with a trusted tool)",
            field=field,
        )
    path = Path(text).expanduser()
    if path.exists():
        return Ref(text=text, path=path.resolve())
    looks_local = text.startswith((".", "/", "~")) or os.sep in text.replace("/", "", 1) or (
        text.endswith(".safetensors") and text.count("/") < 2
    )
    if looks_local or not _HUB_ID.match(text):
        raise NotFound(f"{field} {text!r}: no such file or folder", field=field)
    parts = text.split("/")
    if len(parts) > 2:
        return Ref(text=text, repo="/".join(parts[:2]), filename="/".join(parts[2:]))
    return Ref(text=text, repo=text)


def offline_by_choice() -> bool:
    """HF_HUB_OFFLINE is set."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def offline_mode() -> bool:
    """Whether hub references are read from the local cache only: HF_HUB_OFFLINE is set, or the
    hub cannot be reached. Reachability is asked once per process (a connection of 3 s at
    most), so an offline machine fails at once from the cache instead of after the hub
    library's retries."""
    return offline_by_choice() or not _hub_reachable()


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=3).close()
    except (OSError, UnicodeError):
        return False
    return True


# what to pass instead of a hub reference, by the option that named it
_LOCAL_HINT = {
    "model": "--model /path/to/diffusers-folder (or a .safetensors file)",
    "config": "--config /path/to/diffusers-folder of the same family",
    "lcm_lora": "--lcm-lora /path/to/lcm-lora.safetensors (or none for an LCM-distilled model)",
    "tiny_vae": "--tiny-vae /path/to/taesd-folder (or --speed auto, which needs none)",
    "fp16_vae": "--fp16-vae /path/to/vae-folder",
    "controlnet": "--controlnet /path/to/controlnet-folder",
    "adapter": "--adapter /path/to/t2i-adapter-folder",
    "motion_adapter": "--motion-adapter /path/to/motion-adapter-folder",
    "lora": "--lora /path/to/lora.safetensors",
}


def local_hint(field: str) -> str:
    """What to pass instead of a hub reference for `field` (`lora.0`, `controlnet.canny`...)."""
    key = field.split(".")[0].removesuffix("s") if field.startswith("loras") else \
        field.split(".")[0]
    return _LOCAL_HINT.get(key, f"a local path for {field}")


def _chain(exc: BaseException):
    """`exc` and the exceptions it was raised from or while handling (diffusers re-raises hub
    errors as OSError inside its `except` blocks)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _unreachable_types() -> tuple[type, ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    types: list[type] = [LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError,
                         TimeoutError]
    for module, name in (("requests.exceptions", "ConnectionError"),
                         ("requests.exceptions", "Timeout"), ("httpx", "TransportError"),
                         ("httpx2", "TransportError")):
        try:
            types.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def hub_error(ref: Ref, field: str, exc: BaseException) -> OfflineError | NotFound | None:
    """The typed error for a hub failure anywhere in `exc`'s chain, recognised by the
    huggingface_hub error classes; None when the chain holds no hub failure."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    unreachable = _unreachable_types()
    for error in _chain(exc):
        if isinstance(error, GatedRepoError):
            return NotFound(f"{field} {ref.text!r} is a gated repository: accept its terms on "
                            "the hub and log in (HF_TOKEN), or pass a local copy", field=field)
        # checked first: a missing cache entry is also an EntryNotFoundError
        if isinstance(error, unreachable):
            why = "HF_HUB_OFFLINE is set" if offline_by_choice() else \
                "the hub could not be reached"
            return OfflineError(
                f"{field} {ref.text!r} is not in the local cache and {why}. Download it where "
                f"you have a connection (without HF_HUB_OFFLINE), or pass a local copy: "
                f"{local_hint(field)}", field=field)
        if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError,
                              EntryNotFoundError)):
            return NotFound(f"{field} {ref.text!r} was not found on the hub", field=field)
    return None


def hub_file(ref: Ref, filename: str, field: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref.repo, filename, local_files_only=offline_mode()))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one typed error
        error = hub_error(ref, field, exc) or ModelError(
            f"{field} {ref.text!r}: {filename} could not be read from the hub "
            f"({type(exc).__name__})", field=field)
        raise error from exc


def read_model_config(ref: Ref, config_ref: Ref | None, subfolder: str,
                      field: str = "model") -> dict[str, Any]:
    """The config of one component of a model (`unet`, `vae`, `text_encoder`, ...), read
    without loading any weights; {} when the model has no such component, or is a single file
    given without a config folder (its layout then comes from its keys)."""
    if ref.path is not None and ref.path.is_dir():
        candidates = [ref.path / subfolder / "config.json"]
        if subfolder == "unet":  # a bare UNet folder
            candidates.append(ref.path / "config.json")
        for candidate in candidates:
            if candidate.is_file():
                return _json_config(candidate, field)
        if subfolder == "unet":
            raise ModelError(
                f"{field} {ref.text!r} is a folder but not a diffusers model "
                "(no unet/config.json)",
                field=field,
            )
        return {}
    if ref.is_file:
        if config_ref is None:
            return {}
        return read_model_config(config_ref, None, subfolder, "config")
    try:
        path = hub_file(ref, f"{subfolder}/config.json", field)
    except NotFound:
        if subfolder == "unet":
            raise
        return {}
    return _json_config(path, field)


def read_unet_config(ref: Ref, config_ref: Ref | None, field: str = "model") -> dict[str, Any]:
    """The UNet config of a model, read without loading any weights (for family detection)."""
    return read_model_config(ref, config_ref, "unet", field)


def _json_config(path: Path, field: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ModelError(f"{field}: {str(path)!r} is not readable JSON ({type(exc).__name__})",
                         field=field) from None
    if not isinstance(config, dict):
        raise ModelError(f"{field}: {str(path)!r} does not hold a JSON object", field=field)
    return config


@dataclass(frozen=True)
class SingleFileFacts:
    """What an original-layout checkpoint's header says: its family and UNet input channels
    (9 for an inpainting model)."""

    family: str
    in_channels: int | None


def single_file_facts(path: Path) -> SingleFileFacts:
    """The family and UNet input channels of an original-layout checkpoint, from its header
    alone (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            conv_in = "model.diffusion_model.input_blocks.0.0.weight"
            shape = f.get_slice(conv_in).get_shape() if conv_in in keys else None
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"model file {str(path)!r} is not a readable .safetensors file: {exc}",
                         field="model") from exc
    in_channels = int(shape[1]) if shape is not None and len(shape) == 4 else None
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return SingleFileFacts("ssd-1b" if _pruned_up_path(keys) else "sdxl", in_channels)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return SingleFileFacts("sd15", in_channels)
    raise ModelError(
        f"model file {str(path)!r} is not a Stable Diffusion checkpoint in the original layout "
        "(no model.diffusion_model.* keys)",
        field="model",
    )


def single_file_family(path: Path) -> str:
    """Family of an original-layout checkpoint, from its keys alone (no tensors are read)."""
    return single_file_facts(path).family


# original-layout UNet keys: `input_blocks.N.0.op` is a downsampler, `{input,output}_blocks.N.1`
# an attention with `transformer_blocks.0..depth-1`
_UNET_BLOCK = re.compile(r"model\.diffusion_model\.(input|output)_blocks\.(\d+)\.")
_DOWNSAMPLER = re.compile(r"model\.diffusion_model\.input_blocks\.(\d+)\.0\.op\.")
_TRANSFORMER = re.compile(
    r"model\.diffusion_model\.(input|output)_blocks\.(\d+)\.1\.transformer_blocks\.(\d+)\.")


def _pruned_up_path(keys: list[str]) -> bool:
    """True when some up-path attention is not as deep as the down path's attentions at the same
    resolution: SSD-1B's pruning (its config's `reverse_transformer_layers_per_block`), where SDXL
    mirrors the down path exactly. Read from the pattern of depths alone, so it holds for any
    number of blocks and layers (tiny test models included)."""
    blocks = {"input": set(), "output": set()}
    downsamplers = set()
    depth: dict[tuple[str, int], int] = {}
    for key in keys:
        if m := _UNET_BLOCK.match(key):
            blocks[m[1]].add(int(m[2]))
        if m := _DOWNSAMPLER.match(key):
            downsamplers.add(int(m[1]))
        if m := _TRANSFORMER.match(key):
            place = (m[1], int(m[2]))
            depth[place] = max(depth.get(place, 0), int(m[3]) + 1)
    levels = len(downsamplers) + 1
    per_level = len(blocks["output"]) // levels  # layers per block + 1, in the LDM numbering
    if per_level == 0:
        return False
    # input block 0 is conv_in; levels count from the highest resolution
    down: dict[int, set[int]] = {}
    for (side, index), n in depth.items():
        if side == "input":
            down.setdefault((index - 1) // per_level, set()).add(n)
    # output blocks count from the lowest resolution
    return any(down.get(levels - 1 - index // per_level) != {n}
               for (side, index), n in depth.items() if side == "output")


def load_pipeline(cls, ref: Ref, *, config_ref: Ref | None, family, torch_dtype, field="model"):
    """Load `cls` (a diffusers pipeline class) from a reference, safetensors only."""
    kwargs: dict[str, Any] = dict(dtype=torch_dtype)
    if not family.sdxl_like:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        if ref.is_file:
            path = ref.path if ref.path is not None else hub_file(ref, ref.filename, field)
            if path.suffix != ".safetensors":
                raise UnsafeFormat(f"{field} {ref.text!r} is not a .safetensors file", field=field)
            config = None
            if config_ref is not None:
                config = str(config_ref.path) if config_ref.path else config_ref.repo
            elif offline_mode():
                config = _cached_family_config(family)
                if config is None:
                    # diffusers would try to download the configs and fail deep inside
                    raise OfflineError(
                        f"{field} {ref.text!r} is a single-file checkpoint, which needs the "
                        f"configs of a {family.name} diffusers model; {family.default_model} is "
                        "not in the local cache and "
                        + ("HF_HUB_OFFLINE is set" if offline_by_choice()
                           else "the hub could not be reached")
                        + ": pass a local diffusers folder of the same family with --config",
                        field="config",
                    )
            return cls.from_single_file(
                str(path), config=config or family.default_model,
                local_files_only=config_ref is not None or offline_mode(), **kwargs
            )
        source = str(ref.path) if ref.path is not None else ref.repo
        kwargs.update(use_safetensors=True,
                      local_files_only=ref.path is not None or offline_mode())
        if torch_dtype == torch.float16:
            # half-size downloads where the repo publishes them (as the recipe asks for SDXL)
            try:
                return cls.from_pretrained(source, variant="fp16", **kwargs)
            except ValueError as exc:
                if "variant" not in str(exc):
                    raise
        return cls.from_pretrained(source, **kwargs)
    except (ModelError, NotFound):
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to typed errors below
        raise _load_error(ref, field, exc, single=ref.is_file) from exc


def load_component(cls, ref: Ref, *, torch_dtype, field: str):
    """A ControlNet, T2I-Adapter or motion adapter, from a folder or hub repo."""
    if ref.is_file:
        raise ModelError(
            f"{field} {ref.text!r}: give the component's diffusers folder or hub repo id, "
            "not a single file",
            field=field,
        )
    source = str(ref.path) if ref.path is not None else ref.repo
    try:
        return cls.from_pretrained(
            source, dtype=torch_dtype, use_safetensors=True,
            local_files_only=ref.path is not None or offline_mode(),
        )
    except Exception as exc:  # noqa: BLE001
        raise _load_error(ref, field, exc, single=False) from exc


def _cached_family_config(family) -> str | None:
    """The family's default repo folder, when it is already in the local hub cache."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            family.default_model, local_files_only=True,
            allow_patterns=["*.json", "*.txt"],
        )
    except Exception:  # noqa: BLE001 - not cached: the caller explains how to pass --config
        return None


def _load_error(ref: Ref, field: str, exc: Exception, *, single: bool):
    if ref.repo is not None or single:
        error = hub_error(ref, field, exc)
        if error is not None:
            if single and ref.repo is None:  # a local file whose configs were looked up
                return OfflineError(
                    f"{field} {ref.text!r}: a single-file checkpoint needs a config; pass a "
                    "local diffusers folder of the same family with --config", field=field)
            return error
    text = str(exc)
    if "safetensors" in text and (".bin" in text or "use_safetensors" in text):
        # diffusers' own refusal (an OSError) when a repo has pickle weights only
        return UnsafeFormat(
            f"{field} {ref.text!r} has no .safetensors weights (only pickle files), refused",
            field=field,
        )
    return ModelError(f"{field} {ref.text!r} could not be loaded: {type(exc).__name__}: "
                      f"{text[:300]}", field=field)
