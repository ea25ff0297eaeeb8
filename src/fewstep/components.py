"""The components a task adds to the model: ControlNets, T2I-Adapters and motion adapters.

What kind a component is comes from its config's `_class_name`, read before any weight, so a
T2I-Adapter folder given as a ControlNet is refused in one line naming the option rather than
failing deep inside the loader. Whether it fits a UNet is decided from the two configs alone.
`skeleton()` builds a component on the meta device (no memory, no weights): its config with
every default filled in, and a T2I-Adapter's geometry, for checks and plans before loading."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import InvalidRequest, ModelError
from .families import Family
from .loading import Ref, hub_file


@dataclass(frozen=True)
class Kind:
    name: str  # the request field and catalogue table: "controlnet", "adapter", ...
    class_name: str  # the diffusers class, as configs name it in `_class_name`
    title: str
    task: str  # the task that uses it

    @property
    def cls(self):
        import diffusers

        return getattr(diffusers, self.class_name)

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


KINDS = {kind.name: kind for kind in (
    Kind("controlnet", "ControlNetModel", "ControlNet", "controlnet"),
    Kind("adapter", "T2IAdapter", "T2I-Adapter", "t2i-adapter"),
    Kind("motion_adapter", "MotionAdapter", "motion adapter", "animate"),
)}
_TITLES = {kind.class_name: kind for kind in KINDS.values()}


def kind_of(name: str, field: str | None = None) -> Kind:
    if name not in KINDS:
        raise InvalidRequest(f"unknown component kind {name!r}", field=field or name)
    return KINDS[name]


def read_config(ref: Ref, field: str) -> dict[str, Any]:
    """A component's config.json, from its folder or hub repo; no weights are read."""
    if ref.is_file:
        raise ModelError(f"{field} {ref.text!r}: give the component's diffusers folder or hub "
                         "repo id, not a single file", field=field)
    if ref.path is not None:
        path = ref.path / "config.json"
        if not path.is_file():
            raise ModelError(f"{field} {ref.text!r} is a folder but not a diffusers component "
                             "(no config.json)", field=field)
    else:
        path = hub_file(ref, "config.json", field)
    try:
        config = json.loads(path.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ModelError(f"{field} {ref.text!r}: its config.json is not readable JSON "
                         f"({type(exc).__name__})", field=field) from None
    if not isinstance(config, dict):
        raise ModelError(f"{field} {ref.text!r}: its config.json is not an object", field=field)
    return config


def check_kind(kind: Kind, ref: Ref, config: Mapping[str, Any], field: str) -> None:
    """The config must be of the class the option asks for."""
    found = config.get("_class_name")
    if found == kind.class_name:
        return
    other = _TITLES.get(found)
    if other is not None:
        hint = f"it is a {other.title}: give it with {other.option}"
    else:
        hint = f"its config names {found!r}" if found else "its config names no class"
    raise ModelError(f"{field} {ref.text!r} is not a {kind.title} ({hint})", field=field)


def skeleton(kind: Kind, config: Mapping[str, Any]):
    """The component built from its config on the meta device: nothing is allocated."""
    return _meta_module(kind.class_name, json.dumps(dict(config), sort_keys=True))


@functools.lru_cache(maxsize=32)
def _meta_module(class_name: str, config_text: str):
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        return getattr(diffusers, class_name).from_config(json.loads(config_text))


def adapter_geometry(adapter) -> tuple[int, int]:
    """A T2I-Adapter's (total downscale factor, input channels)."""
    return int(adapter.total_downscale_factor), int(adapter.config.in_channels)


def mismatch(kind: Kind, config, unet_config, family: Family) -> str | None:
    """Why a component does not fit a UNet, from their configs alone; None when it fits."""
    unet_blocks = tuple(unet_config.block_out_channels)
    if kind.name == "controlnet":
        cross = unet_config.cross_attention_dim
        if config.cross_attention_dim != cross:
            return (f"its text conditioning is {config.cross_attention_dim} wide, the model's "
                    f"{cross}; is it a ControlNet for another model family?")
        if tuple(config.block_out_channels) != unet_blocks:
            return (f"its blocks are {tuple(config.block_out_channels)}, the model's "
                    f"{unet_blocks}")
        if config.get("addition_embed_type") != unet_config.get("addition_embed_type"):
            return "it is a ControlNet for another model family"
    elif kind.name == "adapter":
        xl = config.adapter_type == "full_adapter_xl"
        if xl != family.sdxl_like:
            return f"it is a T2I-Adapter for {'SDXL' if xl else 'SD1.5'} models"
        if not set(config.channels) <= set(unet_blocks):
            return f"its channels {tuple(config.channels)} do not match the model's {unet_blocks}"
    elif kind.name == "motion_adapter":
        if tuple(config.block_out_channels) != unet_blocks:
            return (f"its blocks are {tuple(config.block_out_channels)}, the model's "
                    f"{unet_blocks}")
    return None
