"""Catalogue names: what clients of the service may call a model, a LoRA or a component. A name
is never a path or a URL, so a name from the network can never reach the file system."""

from __future__ import annotations

import re

from .errors import InvalidRequest

NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_.+-]{0,62}[A-Za-z0-9_+-])?$"
_NAME = re.compile(NAME_PATTERN)


def check_name(name: object, field: str) -> str:
    """A catalogue name: letters, digits and `_ . + -`, no `..`, no slash, no scheme."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        shown = repr(name) if isinstance(name, str) and len(name) <= 60 else type(name).__name__
        raise InvalidRequest(
            f"{field} must be a catalogue name (letters, digits, '_', '.', '+', '-'; no paths "
            f"or URLs), got {shown}", field=field)
    return name
