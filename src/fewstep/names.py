"""Names and keys the service's options and clients give, checked on their own: catalogue names
(what clients may call a model, a LoRA or a component: never a path or a URL, so a name from the
network can never reach the file system), the host names the service answers to, and API
keys."""

from __future__ import annotations

import ipaddress
import re

from .errors import InvalidRequest

_HOST = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")
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


def normalise_host_pattern(text: str) -> str:
    """A `--allowed-hosts` entry: a host name, an IP address or `*.domain`; no port, no
    scheme. Raises ValueError saying what is wrong."""
    entry = str(text).strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(entry.strip("[]")))
    except ValueError:
        pass
    if not entry or not _HOST.match(entry) or len(entry) > 253:
        raise ValueError(f"{str(text)[:80]!r} is not a host name, an IP address or *.domain "
                         "(no scheme, port or path)")
    return entry


def api_key_problem(key: str) -> str | None:
    """Why no client could ever send `key`, or None. Header values are stripped and must be
    one line, and browsers (the studio page) and most HTTP libraries send only ASCII there:
    a key outside printable ASCII, or with spaces around it, could never match."""
    if not key.strip():
        return "the API key is empty (leave the option out for no key)"
    if key != key.strip():
        return "the API key starts or ends with white space, which headers cannot carry"
    if not all(" " <= c <= "~" for c in key):
        return ("the API key must be printable ASCII (no line breaks, control or non-ASCII "
                "characters): HTTP clients cannot send anything else in a header")
    return None
