"""Configuration: one pydantic-settings model per program. Each option is one field, spelled three
ways from it: a flag (`--queue-size`), a config-file key (`queue_size`; `queue-size` works too)
and an environment variable (`FEWSTEP_QUEUE_SIZE`). Precedence: flags, then the environment,
then the config file, then the defaults. A bad value from any of them is one `InvalidRequest`
naming the option (as the user spelled it) and the value.

* `Settings`: the limits every request is checked against, plus device and dtype. The engine
  and the tasks read it; `Settings.from_env(**overrides)`.
* `EngineOptions`: what engine to build (`fewstep.build.build_engine`): the model, its
  LCM-LoRA, device, dtype and speed; the generating commands' model flags.
* `ServeSettings`: everything `fewstep serve` takes: engine options, limits, the catalogue and
  the service's own options.

Nothing here imports torch: `pick_device` and `pick_dtype` import it when they are called."""

from __future__ import annotations

import argparse
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import (BaseSettings, NoDecode, PydanticBaseSettingsSource,
                               SettingsConfigDict, SettingsError)

from .errors import InvalidRequest
from .names import api_key_problem, normalise_host_pattern

ENV_PREFIX = "FEWSTEP_"
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"


def _device_name(value):
    if isinstance(value, str) and re.match(DEVICE_PATTERN, value.strip()):
        return value.strip()
    raise ValueError("must be auto, cpu, cuda, cuda:N or mps")


Device = Annotated[str, BeforeValidator(_device_name)]
Dtype = Literal["auto", "fp16", "float16", "bf16", "bfloat16", "fp32", "float32"]
Shape = tuple[int, int, int]  # (width, height, batch)


def parse_shapes(text: str, field: str = "compile_shapes") -> tuple[Shape, ...]:
    """`512x512x1,512x512x4` -> ((512, 512, 1), (512, 512, 4)); the batch defaults to 1."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        pieces = part.lower().split("x")
        try:
            values = [int(p) for p in pieces]
        except ValueError:
            values = []
        if len(values) == 2:
            values.append(1)
        if len(values) != 3 or min(values) < 1 or values[0] % 8 or values[1] % 8:
            raise InvalidRequest(
                f"{field}: {part!r} is not WIDTHxHEIGHT[xBATCH] with sizes multiples of 8",
                field=field)
        shapes.append(tuple(values))
    return tuple(shapes)


def _shapes(value):
    """Shapes as text (`WxHxB,...`, from a flag, a variable or a file) or as tuples."""
    if value is None:
        return None
    if not isinstance(value, str):  # ["512x512x1", ...] or [[512, 512, 1], ...]
        try:
            value = ",".join(item if isinstance(item, str) else "x".join(map(str, item))
                             for item in value)
        except TypeError:
            raise ValueError("must be WIDTHxHEIGHT[xBATCH],...") from None
    try:
        return parse_shapes(value)
    except InvalidRequest as exc:
        raise ValueError(exc.message.removeprefix("compile_shapes: ")) from None


Shapes = Annotated[tuple[Shape, ...] | None, BeforeValidator(_shapes)]


def _flag(flag: str | None = None, metavar: str | None = None, **extra) -> dict:
    """How a field shows on the command line (read by `add_arguments`)."""
    return {"flag": flag, "metavar": metavar, **extra}


OpenVINOMode = Literal["auto", "on", "off", "int8"]


# the engine defaults both Settings (the library's, from the environment) and EngineOptions (the
# commands') carry
def _device_field():
    return Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")


def _dtype_field():
    return Field("auto", description="auto (fp16 on GPUs, fp32 on CPU), fp16, bf16, fp32")


def _openvino_field():
    return Field("auto", description="CPU: run the UNet, VAE decoder and text encoders in "
                 "OpenVINO (auto: with speed auto or fastest when the openvino package is "
                 "installed; int8: with 8-bit weights, needs fewstep[int8])")


class _Options(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", frozen=True,
        protected_namespaces=(), validate_default=False)


class Settings(_Options):
    """Limits (per request) and the default device and dtype."""

    max_pixels: int = Field(2048 * 2048, ge=64, description="width x height of one image")
    # the work of one denoising step (what a cancel or a shutdown waits for): a side, and the
    # pixels of all the images or frames one call makes
    max_side: int = Field(4096, ge=8, description="width or height of one image")
    max_step_pixels: int = Field(16 * 1024 * 1024, ge=64, description="width x height x "
                                 "images (x frames) of one call, made at each step")
    max_steps: int = Field(50, ge=1, description="denoising steps per request")
    max_num_images: int = Field(16, ge=1, description="images per request")
    max_frames: int = Field(64, ge=1, description="frames per animation")
    # the text encoders read 77 tokens; this bounds the work done before that
    max_prompt_chars: int = Field(4000, ge=1, description="characters per prompt")
    max_loras: int = Field(8, ge=0, description="LoRAs per request (LCM-LoRA not counted)")
    # decoded input images (decompression-bomb guard)
    max_input_pixels: int = Field(4096 * 4096, ge=64, description="pixels of an input image")
    device: Device = _device_field()
    dtype: Dtype = _dtype_field()
    openvino: OpenVINOMode = _openvino_field()

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """FEWSTEP_* variables, then `overrides` (None values are ignored)."""
        return load(cls, {k: v for k, v in overrides.items() if v is not None})


class EngineOptions(_Options):
    """What engine to build (`fewstep.build.build_engine`): the model, its LCM-LoRA, device,
    dtype and speed. The generating commands' model flags; `ServeSettings` extends it."""

    model: str | None = Field(None, description="base model: hub id, local diffusers folder or "
                              ".safetensors file (default: the SD1.5 base)",
                              json_schema_extra=_flag(metavar="REF"))
    model_config_dir: str | None = Field(
        None, description="local diffusers folder with the configs of a single-file model "
        "(needed offline)", json_schema_extra=_flag("--model-config", "DIR"))
    family: Literal["sd15", "sdxl", "ssd-1b"] | None = Field(
        None, description="override the family detected from the model")
    lcm_lora: str = Field("auto", min_length=1, description="LCM-LoRA: auto (the family's "
                          "published one), none (an LCM-distilled model) or REF[:WEIGHT]",
                          json_schema_extra=_flag(metavar="REF[:W]"))
    device: Device = _device_field()
    dtype: Dtype = _dtype_field()
    openvino: OpenVINOMode = _openvino_field()
    speed: Literal["off", "auto", "default", "fastest"] = Field(
        "auto", description="fast-path preset: auto and default keep the recipe's pictures "
        "(auto also builds the UNet ahead: compiled on CUDA, OpenVINO on a CPU); fastest adds "
        "half precision where it pays and a tiny VAE (approximate)")
    tiny_vae: str | None = Field(None, description="tiny autoencoder for speed fastest "
                                 "(default: the family's taesd)",
                                 json_schema_extra=_flag(metavar="REF"))
    fp16_vae: str | None = Field(None, description="an fp16-safe SDXL VAE (local copy of "
                                 "sdxl-vae-fp16-fix): used in fp16 instead of upcasting",
                                 json_schema_extra=_flag(metavar="REF"))
    animate_lcm_weight: float = Field(0.55, ge=-4.0, le=4.0, allow_inf_nan=False,
                                      description="LCM-LoRA weight for animations (the "
                                      "recipe's 0.55)", json_schema_extra=_flag(metavar="W"))
    compile_shapes: Shapes = Field(
        None, description="shapes built ahead at start-up (compiled on CUDA, converted to "
        "OpenVINO on a CPU): WIDTHxHEIGHTxBATCH,... (default: the family's)",
        json_schema_extra=_flag(metavar="WxHxB,..."))
    compile_cache: str | None = Field(None, description="folder keeping compiled graphs and "
                                      "converted models for the next start (default "
                                      "~/.cache/fewstep/compile)",
                                      json_schema_extra=_flag(metavar="DIR"))
    cuda_graph_loop: Literal["auto", "on", "off"] = Field(
        "auto", description="CUDA only: capture the whole text-to-image call (all steps and the "
        "decode) as one CUDA graph per compile shape at start-up (4 steps), replayed per "
        "request with the same pixels (auto: on for a service with speed default, where it was "
        "measured)")
    fuse_loras: bool = Field(True, description="write each request's LoRA stack into the "
                             "weights (else peft adapters run beside each layer)")


def _catalogue_field(what: str):
    return Field(default_factory=dict, description=f"add {what} to the catalogue (repeatable)",
                 json_schema_extra=_flag(metavar="NAME=REF", repeat=True))


class ServeSettings(EngineOptions, Settings):
    """Everything `fewstep serve` takes."""

    config: str | None = Field(None, description="JSON or TOML file with the same keys as "
                               "these options (lora = {NAME = REF} or [\"NAME=REF\"])",
                               json_schema_extra=_flag(metavar="FILE"))
    model_name: str | None = Field(None, description="the name clients see for the model "
                                   "(default: from the model reference)",
                                   json_schema_extra=_flag(metavar="NAME"))
    lora: Annotated[dict[str, str], NoDecode] = _catalogue_field("a LoRA")
    controlnet: Annotated[dict[str, str], NoDecode] = _catalogue_field("a ControlNet")
    adapter: Annotated[dict[str, str], NoDecode] = _catalogue_field("a T2I-Adapter")
    motion_adapter: Annotated[dict[str, str], NoDecode] = _catalogue_field("a motion adapter")
    host: str = Field("127.0.0.1", min_length=1, description="bind address (any but loopback "
                      "needs an API key)")
    port: int = Field(7860, ge=0, le=65535, description="TCP port (0: any free port)")
    api_key: str | None = Field(None, description="required key (Bearer, or the basic-auth "
                                "password)", json_schema_extra=_flag(metavar="KEY"))
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="names the service answers to besides loopback (Host header: "
        "NAME, IP or *.domain; comma-separated or repeated). Without --api-key other names are "
        "refused; with one, names are checked only when given",
        json_schema_extra=_flag(metavar="NAME[,NAME]", repeat=True))
    public_url: str | None = Field(None, description="base URL clients reach the service at (for "
                                   "OpenAI `url` results; default: relative URLs)",
                                   json_schema_extra=_flag(metavar="URL"))
    queue_size: int = Field(16, ge=1, description="jobs waiting at most")
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False, description="default start "
                                  "deadline of a request, seconds (default: none)",
                                  json_schema_extra=_flag(metavar="S"))
    grace: float = Field(30.0, ge=0, allow_inf_nan=False, description="SIGTERM: seconds work "
                         "may go on", json_schema_extra=_flag(metavar="S"))
    max_body_mb: float = Field(64.0, gt=0, allow_inf_nan=False,
                               description="request body limit, MB")
    body_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False, description="seconds a "
                                  "client may take to send a request body",
                                  json_schema_extra=_flag(metavar="S"))
    header_timeout_s: float = Field(20.0, gt=0, allow_inf_nan=False, description="seconds a "
                                    "client may take to send a request's headers",
                                    json_schema_extra=_flag(metavar="S"))
    max_connections: int = Field(512, ge=1, description="connections open at once (more are "
                                 "answered 503)", json_schema_extra=_flag(metavar="N"))
    job_retention_bytes: int = Field(256 * 1024 * 1024, ge=0, description="bytes of finished "
                                     "jobs' outputs kept for clients to fetch",
                                     json_schema_extra=_flag(metavar="BYTES"))
    max_batch: int | None = Field(None, ge=1, description="queued jobs run as one pipeline "
                                  "call at most (default: 8 on CUDA, 4 elsewhere)",
                                  json_schema_extra=_flag(metavar="N"))
    batch_wait_ms: float = Field(0.0, ge=0, allow_inf_nan=False, description="how long the "
                                 "worker waits for companions of a lone job, ms",
                                 json_schema_extra=_flag(metavar="MS"))
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="log level of the service")

    @field_validator("api_key", mode="before")
    @classmethod
    def _api_key(cls, value):
        if value is not None:
            problem = api_key_problem(str(value))
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError("must be a list of host names")
        names = [part for entry in value for part in str(entry).split(",") if part.strip()]
        return tuple(dict.fromkeys(normalise_host_pattern(name) for name in names))

    @field_validator("public_url", mode="before")
    @classmethod
    def _url(cls, value):
        if value is not None and not re.match(r"^https?://[^\s/]+[^\s]*$", str(value)):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("lora", "controlnet", "adapter", "motion_adapter", mode="before")
    @classmethod
    def _catalogue_entries(cls, value, info):
        return catalogue_entries(value, info.field_name)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        return init_settings, env_settings, _ConfigFileSource(settings_cls)

    def limits(self) -> Settings:
        return Settings(**{name: getattr(self, name) for name in Settings.model_fields})

    def engine_options(self) -> EngineOptions:
        return EngineOptions(**{name: getattr(self, name) for name in EngineOptions.model_fields})


def catalogue_entries(value: Any, option: str) -> dict[str, str]:
    """A catalogue table from a dict, a list of `NAME=REF`, or text (a JSON object or
    comma-separated `NAME=REF`, as an environment variable gives it)."""
    from .names import check_name

    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                raise ValueError("is not a valid JSON object (or is nested too deeply)") from None
        else:
            value = [part for part in text.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        table = {}
        for entry in value:
            name, sep, ref = str(entry).partition("=")
            if not sep or not name.strip() or not ref.strip():
                raise ValueError(f"takes NAME=REF, got {str(entry)[:80]!r}")
            table[name.strip()] = ref.strip()
        value = table
    if not isinstance(value, dict):
        raise ValueError("must be a table of NAME = REF")
    for name, ref in value.items():
        try:
            check_name(name, option)
        except InvalidRequest as exc:
            raise ValueError(exc.message.removeprefix(f"{option} ")) from None
        if not isinstance(ref, str) or not ref.strip():
            raise ValueError(f"{name}: the reference must be a non-empty string")
    return {name: ref.strip() for name, ref in value.items()}


# -- the config file ---------------------------------------------------------------------------

FILE_ALIASES = {"model_config": "model_config_dir"}  # the key earlier versions read


def read_config_file(path: str, cls: type[BaseSettings] = ServeSettings) -> dict[str, Any]:
    """A JSON or TOML file's options, keys normalised; unknown keys are refused."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InvalidRequest(f"config {path!r}: no such file", field="config")
    try:
        text = file.read_text("utf-8")
        if file.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise InvalidRequest(f"config {path!r} is not valid: {detail}", field="config") from None
    except RecursionError:
        raise InvalidRequest(f"config {path!r} is nested too deeply", field="config") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"config {path!r} must hold a table/object", field="config")
    values = {}
    for key, value in data.items():
        name = FILE_ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if name not in cls.model_fields or name == "config":
            raise InvalidRequest(f"config {path!r}: unknown key {key!r}", field="config")
        values[name] = value
    return values


class _ConfigFileSource(PydanticBaseSettingsSource):
    """The file named by the `config` option (from a flag or FEWSTEP_CONFIG)."""

    def get_field_value(self, field, field_name):  # required by the base class; unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config")
        return read_config_file(path, self.settings_cls) if path else {}


# -- building, with errors naming the option -------------------------------------------------

def load(cls: type[BaseSettings], flags: dict[str, Any] | None = None,
         flag_names: dict[str, str] | None = None):
    """`cls` from flags (field -> value), FEWSTEP_* variables and, for `ServeSettings`, the
    config file. A bad value raises InvalidRequest naming where it came from."""
    flags = dict(flags or {})
    try:
        return cls(**flags)
    except ValidationError as exc:
        raise _option_error(exc, cls, flags, flag_names or {}) from None
    except SettingsError as exc:
        raise InvalidRequest(" ".join(str(exc).split())[:300], field="config") from None


def _option_error(exc: ValidationError, cls, flags: dict, flag_names: dict) -> InvalidRequest:
    first = exc.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else None
    if name in flags:
        where = flag_names.get(name) or _flag_strings(cls, name)[0]
    elif name and _env_name(name) in os.environ:
        where = _env_name(name)
    elif name and flags.get("config"):
        where = f"{name} in {flags['config']}"
    elif name and os.environ.get(_env_name("config")):
        where = f"{name} in {os.environ[_env_name('config')]}"
    else:
        where = name or "option"
    message = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    if isinstance(value, (dict, list)) or name in SECRET_FIELDS:  # the message says enough
        return InvalidRequest(f"{where}: {message}", field=name)
    if "got " in message:  # the message shows the value already
        return InvalidRequest(f"{where}: {message}", field=name)
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return InvalidRequest(f"{where}: {message} (got {shown})", field=name)


SECRET_FIELDS = ("api_key",)  # never echoed in an error


def _env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


# -- flags from the model ----------------------------------------------------------------------

def _flag_strings(cls, name: str) -> list[str]:
    extra = cls.model_fields[name].json_schema_extra or {}
    return [extra.get("flag") or f"--{name.replace('_', '-')}"]


def add_arguments(parser, cls: type[BaseSettings], *, only: tuple[str, ...] | None = None,
                  skip: tuple[str, ...] = (), flags: dict[str, list[str]] | None = None) -> None:
    """One flag per field of `cls`. Values stay text (pydantic converts and checks them, so a
    bad one is reported like a bad file or environment value); unset flags stay unset, so the
    environment and the config file can fill them."""
    flags = flags or {}
    for name, info in cls.model_fields.items():
        if (only is not None and name not in only) or name in skip:
            continue
        extra = info.json_schema_extra or {}
        strings = flags.get(name) or _flag_strings(cls, name)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": _help(info, cls, name)}
        choices = _choices(info.annotation)
        if choices:
            kwargs["choices"] = choices
        else:
            kwargs["metavar"] = extra.get("metavar") or name.upper()
        if extra.get("repeat"):
            kwargs["action"] = "append"
        parser.add_argument(*strings, **kwargs)


def _choices(annotation) -> list[str] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is Literal:
            return [str(a) for a in typing.get_args(arg)]
    return None


def _help(info, cls, name: str) -> str:
    text = info.description or ""
    default = info.get_default(call_default_factory=True)
    if default not in (None, {}, [], ""):
        text += f" (default {default})"
    return f"{text}; env {_env_name(name)}" if text else f"env {_env_name(name)}"


def default_cache_dir() -> Path:
    """Where compiled graphs and converted models are kept when `compile_cache` is not set."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fewstep" / "compile"


def openvino_cache_dir(compile_cache: str | os.PathLike | None) -> Path:
    """Where the converted OpenVINO models, their blobs and a command's note of what it
    compiled are kept, for a `compile_cache` setting (None: the default folder)."""
    return Path(compile_cache or default_cache_dir()).expanduser() / "openvino"


def given(args: argparse.Namespace, cls: type[BaseSettings]) -> dict[str, Any]:
    """The fields of `cls` that were given as flags."""
    return {name: getattr(args, name) for name in cls.model_fields if hasattr(args, name)}


# -- device and dtype --------------------------------------------------------------------------

def pick_device(name: str | None = "auto") -> str:
    """`auto` -> cuda, then mps, then cpu. An explicit device must exist on this machine."""
    import torch

    name = (name or "auto").strip()
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if not re.match(DEVICE_PATTERN, name):
        raise InvalidRequest(f"device {name!r} is not one of auto, cpu, cuda, cuda:N, mps",
                             field="device")
    if name.startswith("cuda"):
        if not cuda:
            build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU found"
            raise InvalidRequest(f"device {name!r}: CUDA is not available here ({build}); use "
                                 "--device cpu or auto", field="device")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InvalidRequest(f"device {name!r}: there are {torch.cuda.device_count()} CUDA "
                                 "devices (cuda:0 ...)", field="device")
    if name == "mps" and not mps:
        raise InvalidRequest("device 'mps': Apple MPS is not available here; use --device cpu "
                             "or auto", field="device")
    return name


def pick_dtype(name: str, device: str):
    import torch

    table = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if name == "auto":
        return torch.float16 if device.startswith(("cuda", "mps")) else torch.float32
    if name not in table:
        raise InvalidRequest(f"dtype must be one of auto, {', '.join(table)}; got {name!r}",
                             field="dtype")
    return table[name]
