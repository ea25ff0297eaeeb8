"""The catalogue: names given at start-up -> model references. Requests name LoRAs and
components by catalogue name only; a path or URL from the network is refused before any lookup.

Records of results (the `params` written into outputs) leave the service with catalogue names
in place of references, and say so: `catalog_names` lists the fields that hold names.
`restore_record` turns them back into references with the same catalogue, which is how
`fewstep reproduce --config SERVE_CONFIG` regenerates a service output."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidRequest, NotFound
from ..names import check_name
from ..records import Record, parse_record

KINDS = {
    "lora": "LoRA",
    "controlnet": "ControlNet",
    "adapter": "T2I-Adapter",
    "motion_adapter": "motion adapter",
}

def parse_entry(text: str, option: str) -> tuple[str, str]:
    """`NAME=REF` from the command line or a config file."""
    name, sep, ref = str(text).partition("=")
    if not sep or not ref.strip():
        raise InvalidRequest(f"--{option} takes NAME=REF, got {text!r}", field=option)
    return check_name(name.strip(), option), ref.strip()


# fields of a record's request that are the client's own text, never a server reference
CLIENT_TEXT = ("prompt", "negative_prompt")

LCM_NAME = "lcm-lora"  # the LCM-LoRA's name in records (it is not a requestable LoRA)
TINY_VAE_NAME = "tiny-vae"  # the fast path's tiny VAE, when one was given


def name_from_ref(ref: str) -> str:
    """A catalogue name for a model reference: its last component, made safe."""
    last = Path(str(ref).rstrip("/\\")).name or "model"
    last = re.sub(r"\.safetensors$", "", last)
    last = re.sub(r"[^A-Za-z0-9_.+-]+", "-", last).strip(".-") or "model"
    return last[:64]


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

    @classmethod
    def from_settings(cls, settings, engine=None) -> "Catalog":
        """The catalogue of a `ServeSettings` (names checked). With the engine, the model and
        LCM-LoRA it actually loaded (defaults included) are hidden behind their names too."""
        from ..lora import split_weight

        model_ref = str(settings.model or (engine.model_ref if engine is not None else ""))
        name = settings.model_name or name_from_ref(model_ref)
        hidden = {name: model_ref} if model_ref else {}
        lcm = settings.lcm_lora
        if lcm not in ("auto", "none"):
            hidden[LCM_NAME] = split_weight(lcm)[0]
        elif engine is not None and getattr(engine, "lcm_ref", None):
            hidden[LCM_NAME] = engine.lcm_ref
        if settings.tiny_vae and getattr(engine, "speed", settings.speed) != "off":
            hidden[TINY_VAE_NAME] = settings.tiny_vae
        return cls(model_name=name, loras=dict(settings.lora),
                   controlnets=dict(settings.controlnet), adapters=dict(settings.adapter),
                   motion_adapters=dict(settings.motion_adapter), hidden=hidden)

    def check_references(self) -> None:
        """Every entry's reference parsed: a missing local file or a pickle format is refused
        here, before anything loads (on the machine that will load them)."""
        from ..loading import parse_ref

        for kind in KINDS:
            for name, ref in self.table(kind).items():
                parse_ref(ref, f"{kind}.{name}")

    def engine_needs(self) -> dict:
        """What an engine serving this catalogue is built with (`build_engine`'s `loras` and
        `components`): its LoRAs, checked and preloaded before any compiling (a stack then
        changes weight values only, never a compiled graph), and its components, checked and
        loaded; each named in errors by its entry (`lora.NAME`, `controlnet.NAME`, ...)."""
        return {"loras": {f"lora.{name}": ref for name, ref in self.loras.items()},
                "components": {kind: {f"{kind}.{name}": ref
                                      for name, ref in self.table(kind).items()}
                               for kind in ("controlnet", "adapter", "motion_adapter")}}

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
        """`redact` through a JSON-like value."""
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

    # -- records ------------------------------------------------------------------------

    def redact_record(self, record: Record) -> Record:
        """The record as it leaves the service: every reference it holds replaced by its
        catalogue name, listed in `catalog_names`, and any other path shortened; the client's
        own text (its prompts) as sent."""
        names = {}
        for path, kind in record.references():
            name = self._name_of(kind, record.value(path))
            if name is not None:
                names[path] = name
        data = record.to_dict()
        redacted = self.redact_obj(data)
        for key in CLIENT_TEXT:  # the client's own text: as sent (see errors.about_input)
            if key in data["request"]:
                redacted["request"][key] = data["request"][key]
        return parse_record(redacted).with_values(names, catalog_names=list(names))

    def restore_record(self, record: Record) -> Record:
        """The inverse of `redact_record`: catalogue names back to references. A name this
        catalogue does not have is a NotFound naming the option that would supply it."""
        kinds = dict(record.references())
        values = {}
        for dotted in record.catalog_names or []:
            kind = kinds.get(dotted)
            if kind is None:
                raise InvalidRequest(f"record: catalog_names lists {dotted!r}, which is not a "
                                     "reference field", field="catalog_names")
            values[dotted] = self._ref_of(kind, record.value(dotted), dotted)
        return record.with_values(values, catalog_names=None)

    def _name_of(self, kind: str, ref) -> str | None:
        if not isinstance(ref, str):
            return None
        table = self._record_table(kind)
        for name, entry in table.items():
            if entry == ref or _same_path(entry, ref):
                return name
        return None

    def _ref_of(self, kind: str, name: object, field: str) -> str | None:
        if kind == "model":
            if name != self.model_name or name not in self.hidden:
                raise NotFound(f"{field}: the record's model is the catalogue name {name!r}, "
                               "which this catalogue does not give (pass --model REF)",
                               field="model")
            return self.hidden[name]
        if kind == "lcm":
            return self.hidden.get(LCM_NAME, "auto")
        if kind == "tiny_vae":
            if TINY_VAE_NAME not in self.hidden:
                raise NotFound(f"{field}: the record's tiny VAE is a catalogue name; pass the "
                               "service's --config FILE", field="tiny_vae")
            return self.hidden[TINY_VAE_NAME]
        table = self.table(kind)
        if name not in table:
            option = "--" + kind.replace("_", "-")
            raise NotFound(f"{field}: {KINDS[kind]} {name!r} is not in this catalogue (pass "
                           f"{option} {name}=REF or the service's --config FILE)", field=field)
        return table[name]

    def _record_table(self, kind: str) -> dict[str, str]:
        if kind == "model":
            return {self.model_name: self.hidden[self.model_name]} \
                if self.model_name in self.hidden else {}
        if kind in ("lcm", "tiny_vae"):
            name = LCM_NAME if kind == "lcm" else TINY_VAE_NAME
            return {name: self.hidden[name]} if name in self.hidden else {}
        return self.table(kind)


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False


_ABS_PATH = re.compile(r"(?<![\w:/])(?:/[\w.+-]+){2,}/?|[A-Za-z]:\\[^\s'\"]+")
