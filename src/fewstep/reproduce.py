"""Reproduction: `reproduce(path)` regenerates an output from the record it carries, pixel for
pixel on the same device and library versions.

Input images are not in the record, only their digests: a reproduction takes the same images
again and checks them. Outputs of the service name the model, LoRAs and components by catalogue
name (the record's `catalog_names`); a reproduction resolves them with the same catalogue
(`catalog=`: a `Catalog`, or the service's config file). Everything is checked before anything
loads (`prepare`); the engine is then built for the one call it runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import EngineOptions
from .errors import InvalidRequest
from .images import image_digest
from .records import Record, read_record


@dataclass(frozen=True)
class Reproduction:
    """What `prepare` found: the record (references resolved), its request with the input
    images given again, and the options of the engine the record names."""

    source: Path
    record: Record
    request: Any  # a fewstep.tasks Request
    options: EngineOptions

    @property
    def batch_index(self) -> int:
        return self.record.batch_index or 0


def prepare(path: str | Path, *, images: dict[str, Any] | None = None, catalog=None,
            model: str | None = None, model_config: str | None = None,
            device: str | None = None, dtype: str | None = None) -> Reproduction:
    """Read and check everything a reproduction needs, loading nothing: the record, the
    catalogue names it uses, the input images (against their digests) and the engine options
    (`model`, `model_config`, `device` and `dtype` override the record's)."""
    record = resolve_names(read_record(path), catalog, model_given=model is not None)
    request = build_request(record, images or {})
    return Reproduction(Path(path), record, request,
                        engine_options(record, model=model, model_config=model_config,
                                       device=device, dtype=dtype))


def reproduce(path: str | Path, *, images: dict[str, Any] | None = None, catalog=None,
              out: str | Path | None = None, engine=None, model: str | None = None,
              model_config: str | None = None, device: str | None = None,
              dtype: str | None = None, progress=None):
    """Regenerate the output `path` from its record. Returns the Result (the one output), and
    writes it to `out` when given (any suffix of the same kind; the record goes with it).

    * `images`: the input images of img2img, inpaint, ControlNet and T2I-Adapter outputs, by
      field (`image`, `mask`, `control_image`): PIL images, encoded bytes or file paths. Each
      is checked against the digest in the record.
    * `catalog`: for service outputs, the service's catalogue: a `Catalog`, or the path of the
      config file it was started with.
    * `engine`: an Engine to run on (it must hold the record's model); else one is built from
      the record (`model`, `model_config`, `device`, `dtype` override it)."""
    prepared = prepare(path, images=images, catalog=catalog, model=model,
                       model_config=model_config, device=device, dtype=dtype)
    return run(prepared, out=out, engine=engine, model=model, progress=progress)


def run(prepared: Reproduction, *, out: str | Path | None = None, engine=None,
        model: str | None = None, progress=None):
    """Run a prepared reproduction (on `engine`, else on one built for its call)."""
    from .build import build_engine, inspect
    from .engine import Job
    from .outputs import check_output_path, encode_output, write_atomically

    if out is not None:
        target = check_output_path(out, prepared.record.task == "animate")
    if engine is None:
        blueprint = inspect(prepared.options)
        call = blueprint.plan(prepared.request)
        engine = build_engine(blueprint, calls=[call])
    else:
        check_engine(engine, prepared.record, model)
        call = engine.plan(prepared.request)
    result = engine.run([Job(call, progress=progress)])[0]
    index = prepared.batch_index
    result.images = result.images[index:index + 1]
    if out is not None:
        # written at its batch position, so its record says what the original's says
        write_atomically([(target, encode_output(result, 0, target.suffix, batch_index=index))])
    return result


def resolve_names(record: Record, catalog, model_given: bool = False) -> Record:
    """A record whose catalogue names are turned back into references. With `model_given`,
    the model's name is left alone (the caller names the model itself)."""
    names = [n for n in record.catalog_names or [] if not (model_given and n == "model")]
    record = record.model_copy(update={"catalog_names": names or None})
    if not names:
        return record
    if catalog is None:
        listed = ", ".join(f"{n} = {record.value(n)!r}" for n in names)
        raise InvalidRequest(
            f"this output came from the service and names catalogue entries ({listed}): pass "
            "the service's config (--config FILE) or the entries (--lora NAME=REF, "
            "--controlnet NAME=REF, --adapter NAME=REF, --motion-adapter NAME=REF, --model "
            "REF)", field="catalog")
    if isinstance(catalog, (str, Path)):
        from .config import ServeSettings, load
        from .server.catalog import Catalog

        catalog = Catalog.from_settings(load(ServeSettings, {"config": str(catalog)}))
    return catalog.restore_record(record)


def build_request(record: Record, images: dict[str, Any]):
    """The request of a record, with its input images given again and checked."""
    from .images import load_image
    from .tasks import REQUESTS

    values = dict(record.request)
    task = values.pop("task")
    cls = REQUESTS[task]
    digests = record.inputs
    unknown = sorted(set(images) - set(cls.image_fields()))
    if unknown:
        raise InvalidRequest(f"this {task} output takes no {unknown[0]} image", field=unknown[0])
    for name in cls.image_fields():
        option = "--" + name.replace("_", "-")
        if images.get(name) is None:
            expected = f" (sha256 {digests[name][7:19]}...)" if name in digests else ""
            raise InvalidRequest(f"this {task} output needs its input image again: {option} "
                                 f"FILE{expected}", field=name)
        image = images[name]
        if not hasattr(image, "mode"):  # a path or encoded bytes
            image = load_image(image, name)
        if name in digests and image_digest(image) != digests[name]:
            raise InvalidRequest(
                f"{option}: not the image this output was made from (sha256 "
                f"{image_digest(image)[7:19]}..., recorded {digests[name][7:19]}...)",
                field=name)
        values[name] = image
    return cls.build(**values)


def engine_options(record: Record, *, model=None, model_config=None, device=None,
                   dtype=None) -> EngineOptions:
    """The options of an engine set up as the record says (the arguments override it; what
    neither says, such as the device, comes from FEWSTEP_* variables as for any engine)."""
    from .config import load

    weight = f":{record.lcm_weight}" if record.task != "animate" else ""
    options = {
        "model": model or record.model,
        "lcm_lora": f"{record.lcm_lora}{weight}" if record.lcm_lora else "none",
        "model_config_dir": model_config, "family": record.family, "device": device,
        "dtype": dtype or record.dtype, "speed": record.speed, "tiny_vae": record.tiny_vae,
    }
    if record.task == "animate":
        options["animate_lcm_weight"] = record.lcm_weight
    return load(EngineOptions, {k: v for k, v in options.items() if v is not None})


def check_engine(engine, record: Record, model: str | None = None) -> None:
    """An engine handed to `reproduce` must hold the record's model and LCM-LoRA."""
    wanted = {"model": model or record.model, "lcm_lora": record.lcm_lora}
    held = {"model": engine.model_ref, "lcm_lora": engine.lcm_ref}
    for field, ref in wanted.items():
        if ref not in (None, "auto") and not _same_ref(ref, held[field]):
            raise InvalidRequest(f"the engine holds {field} {held[field]!r}, the record says "
                                 f"{ref!r}", field=field)


def _same_ref(a, b) -> bool:
    if a == b:
        return True
    try:
        return a is not None and b is not None and \
            Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, ValueError):
        return False
