"""What every command line program of fewstep shares: the stderr console, an argument parser
whose errors are one line, a user error reported as one line, the message naming a missing
optional extra, and a progress bar per denoising step."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from rich.console import Console
from rich.markup import escape

from .errors import FewstepError

console = Console(stderr=True, soft_wrap=True)  # messages stay on one line


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage goes to --help)."""

    def error(self, message: str):
        console.print(f"[red]error:[/] {escape(self.prog)}: {escape(message)} "
                      f"(see {escape(self.prog)} --help)", highlight=False)
        sys.exit(2)


def report_error(exc: FewstepError) -> int:
    """One line on stderr; returns the exit code."""
    where = f" ({exc.field})" if exc.field else ""
    console.print(f"[red]error{escape(where)}:[/] {escape(exc.message)}", highlight=False)
    return exc.exit_code


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def require_extra(extra: str, modules: tuple[str, ...], command: str) -> None:
    """One line saying what to install when a command's optional dependencies are absent."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise FewstepError(f"{command} needs the {extra} extra (missing: "
                           f"{', '.join(missing)}): pip install \"fewstep[{extra}]\"")


def progress(quiet: bool, label: str):
    """A context manager yielding a progress callback `(step, total)`, or None when quiet or
    when nobody watches a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    if quiet or not console.is_terminal:
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def bar():
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as shown:
            task_id = shown.add_task(label, total=None)
            yield lambda step, total: shown.update(task_id, completed=step, total=total)

    return bar()
