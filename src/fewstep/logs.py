"""What users see: library chatter kept out, fewstep's own events logged.

`quiet_libraries()` keeps diffusers, transformers, peft, huggingface_hub, accelerate and torch
warnings and progress bars out of the output. Building an engine calls it (so the CLI, the
service and library code all get it); it may be called directly too
(`fewstep.quiet_libraries()`). Importing fewstep changes nothing global.
A verbosity the user set in the environment (DIFFUSERS_VERBOSITY, TRANSFORMERS_VERBOSITY) is
left as it is, and HF_HUB_DISABLE_PROGRESS_BARS=0 keeps the progress bars.

`configure_logging(level)` gives the `fewstep` logger a handler on stderr, for programs (the
service) that report their own events."""

from __future__ import annotations

import logging
import os
import sys
import warnings

LIBRARIES = ("diffusers", "transformers", "peft", "huggingface_hub", "accelerate", "torch")
_LIBRARY_MODULES = r"(%s)(\..*)?$" % "|".join(LIBRARIES)


def quiet_libraries() -> None:
    """Silence the libraries fewstep runs on: warnings, log messages below ERROR, progress
    bars. Call it before or after they are imported; calling it again does nothing more."""
    user_verbosity = {name: name in os.environ
                      for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")}
    bars_wanted = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in (
        "0", "false", "no", "off")
    # read when each library is first imported
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not bars_wanted:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # warnings raised inside these libraries, whatever their category (deprecations of their
    # own internals, peft's "multiple adapters" notice, torch's user warnings)
    warnings.filterwarnings("ignore", module=_LIBRARY_MODULES)
    # deprecation notices aimed at the caller's code are attributed to it, not to the library
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"fewstep(\..*)?$")
    for name in ("peft", "accelerate", "torch", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    if not user_verbosity["DIFFUSERS_VERBOSITY"]:
        diffusers_logging.set_verbosity_error()
    if not user_verbosity["TRANSFORMERS_VERBOSITY"]:
        transformers_logging.set_verbosity_error()
    if not bars_wanted:
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        disable_progress_bars()


class _LevelPrefix(logging.Formatter):
    """`INFO:     fewstep: message`, aligned like uvicorn's own lines."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"{record.levelname}:".ljust(10)
        return f"{prefix}{record.name.split('.')[0]}: {super().format(record)}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (it may be replaced)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(level: str | int = "info") -> logging.Logger:
    """A stderr handler on the `fewstep` logger at `level`; returns the logger."""
    logger = logging.getLogger("fewstep")
    if isinstance(level, str):
        level = logging.getLevelName(level.upper()) if level.lower() != "trace" else 5
    logger.setLevel(level if isinstance(level, int) else logging.INFO)
    if not any(getattr(h, "_fewstep", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_LevelPrefix("%(message)s"))
        handler._fewstep = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    return logger
