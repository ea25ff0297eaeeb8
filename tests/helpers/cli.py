"""What the command line tests check: an error is one line, and the libraries stay quiet."""

from __future__ import annotations


def model_flags(tiny) -> list[str]:
    """The flags that point a command at the tiny SD1.5 model on the CPU, quietly."""
    return ["--model", str(tiny.sd15), "--lcm-lora", str(tiny.lcm_sd15), "--device", "cpu",
            "--quiet"]


def one_error_line(err: str) -> str:
    """The one line of an error on stderr (the service's own INFO lines, such as `loading`,
    aside): no traceback, nothing else."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("INFO:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error")
    return lines[0]


def assert_no_library_noise(text: str) -> None:
    """No warnings, deprecation notices or progress bars from the libraries under fewstep."""
    for marker in ("Warning", "warn(", "deprecated", "it/s]", "%|", "Loading pipeline",
                   "Loading weights", "peft", "LoRA keys", "kept in float32", "torchvision",
                   "Started server process", "Traceback"):
        assert marker not in text, f"{marker!r} in:\n{text}"
