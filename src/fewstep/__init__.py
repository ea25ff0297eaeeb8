"""fewstep: few-step image and animation generation with LCM-LoRA."""

from .version import __version__  # noqa: F401 - fewstep.__version__

_PUBLIC = {
    "Engine": "engine", "Result": "engine", "Job": "engine", "Settings": "config",
    "EngineOptions": "config", "build_engine": "build", "inspect": "build",
    "Request": "tasks", "LoraRequest": "tasks", "Txt2ImgRequest": "tasks",
    "Img2ImgRequest": "tasks", "InpaintRequest": "tasks", "ControlNetRequest": "tasks",
    "T2IAdapterRequest": "tasks", "AnimateRequest": "tasks", "save_result": "outputs",
    "reproduce": "reproduce", "read_record": "records", "Record": "records",
    "quiet_libraries": "logs",
}


def __getattr__(name):
    # the public API, imported lazily so `import fewstep` stays light (no torch at import)
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"fewstep.{_PUBLIC[name]}"), name)


def __dir__():
    return sorted([*globals(), *_PUBLIC])


__all__ = sorted(_PUBLIC)
