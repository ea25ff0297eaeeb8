"""The catalogue: names given at start-up -> model references. Requests name LoRAs and
components by catalogue name only; a path or URL from the network is refused before any lookup."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidRequest, NotFound

NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_.+-]{0,62}[A-Za-z0-9_+-])?$"
_NAME = re.compile(NAME_PATTERN)

KINDS = {
    "lora": "LoRA",
    "controlnet": "ControlNet",
    "adapter": "T2I-Adapter",
    "motion_adapter": "motion adapter",
}


def check_name(name: object, field: str) -> str:
    """A catalogue name: letters, digits and `_ . + -`, no `..`, no slash, no scheme."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        shown = repr(name) if isinstance(name, str) and len(name) <= 60 else type(name).__name__
        raise InvalidRequest(
            f"{field} must be a catalogue name (letters, digits, '_', '.', '+', '-'; no paths "
            f"or URLs), got {shown}", field=field)
    return name


def parse_entry(text: str, option: str) -> tuple[str, str]:
    """`NAME=REF` from the command line or a config file."""
    name, sep, ref = str(text).partition("=")
    if not sep or not ref.strip():
        raise InvalidRequest(f"--{option} takes NAME=REF, got {text!r}", field=option)
    return check_name(name.strip(), option), ref.strip()


@dataclass
class Catalog:
    """What the service may load, by name. `model_name` is what clients see for the model."""

    model_name: str = "model"
    loras: dict[str, str] = field(default_factory=dict)
    controlnets: dict[str, str] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    motion_adapters: dict[str, str] = field(default_factory=dict)
    hidden: dict[str, str] = field(default_factory=dict)  # other refs to hide (model, LCM-LoRA)

    def __post_init__(self):
        check_name(self.model_name, "model_name")
        for table in (self.loras, self.controlnets, self.adapters, self.motion_adapters):
            for name in table:
                check_name(name, "catalog")

    def table(self, kind: str) -> dict[str, str]:
        return {"lora": self.loras, "controlnet": self.controlnets, "adapter": self.adapters,
                "motion_adapter": self.motion_adapters}[kind]

    def resolve(self, kind: str, name: object, field: str) -> str:
        check_name(name, field)
        table = self.table(kind)
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise NotFound(f"{field}: unknown {KINDS[kind]} {name!r} (available: {known})",
                           field=field)
        return table[name]

    def check_model(self, name: object, field: str = "model") -> None:
        check_name(name, field)
        if name != self.model_name:
            raise NotFound(f"{field}: unknown model {name!r} (available: {self.model_name})",
                           field=field)

    # -- hiding references ------------------------------------------------------------

    def _pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for table in (self.loras, self.controlnets, self.adapters, self.motion_adapters,
                      self.hidden):
            for name, ref in table.items():
                pairs.append((ref, name))
                try:
                    resolved = str(Path(ref).expanduser().resolve())
                    if resolved != ref:
                        pairs.append((resolved, name))
                except (OSError, RuntimeError):
                    pass
        return sorted(pairs, key=lambda p: -len(p[0]))  # longest first

    def redact(self, text: str) -> str:
        """Replace every reference in `text` with its catalogue name, and any other absolute
        path with its last component."""
        for ref, name in self._pairs():
            if ref:
                text = text.replace(ref, name)
        return _ABS_PATH.sub(lambda m: "<path>/" + m.group(0).rstrip("/").rsplit("/", 1)[-1],
                             text)

    def redact_obj(self, value):
        if isinstance(value, str):
            for ref, name in self._pairs():
                if value == ref:
                    return name
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self.redact_obj(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.redact_obj(v) for v in value]
        return value


_ABS_PATH = re.compile(r"(?<![\w:/])(?:/[\w.+-]+){2,}/?|[A-Za-z]:\\[^\s'\"]+")
