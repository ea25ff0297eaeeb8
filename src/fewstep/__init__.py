"""fewstep: few-step image and animation generation with LCM-LoRA."""

__version__ = "0.1.0"


def __getattr__(name):
    # the public API, imported lazily so `import fewstep` stays light (no torch at import)
    if name in ("Engine", "Result"):
        from . import engine

        return getattr(engine, name)
    if name == "Settings":
        from .config import Settings

        return Settings
    from . import tasks

    if name in tasks.__all__:
        return getattr(tasks, name)
    raise AttributeError(name)
