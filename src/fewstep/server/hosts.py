"""What a web page of another site must not do to the service, whatever the browser lets it send.

* Host: a DNS-rebinding page reaches `http://127.0.0.1:PORT` under its own name, so the Host
  header names that site. Without an API key only loopback names and addresses and the
  configured names (`--allowed-hosts`) are served. With a key, the key is the guard (such a
  page cannot send it) and names are checked only when some are configured, since behind
  proxies and load balancers the service cannot know them. `/healthz` and `/readyz` answer any
  Host (probes use addresses; they tell nothing).
* Origin: browsers send some writes without asking first (forms, multipart, text/plain) and
  mark them with the page's origin. A write (POST, PUT, PATCH, DELETE) whose Origin is neither
  the address it was sent to nor a configured name is refused, key or not (a browser may hold
  Basic credentials for the service).
* Content type: a body must be JSON (`application/json`, `application/*+json`) or a form
  (`multipart/form-data`, `application/x-www-form-urlencoded`), the only kinds the routes
  read; text/plain and untyped bodies are refused (a JSON route refuses forms itself).

Names are matched as uvicorn's and Django's trusted hosts do: exact names, `*.example.org`
for subdomains. Pure ASGI; a refusal is a typed error and the app never sees the request."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from ..names import normalise_host_pattern  # noqa: F401 - the option's own check
from .auth import is_loopback
from .errors import CrossOrigin, HostNotAllowed, UnsupportedMediaType, send_error

PROBE_PATHS = ("/healthz", "/readyz")
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header (or an origin's netloc) -> (lower-case host, port or None); None when it
    cannot be read."""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 literal
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = value.partition(":")
        if sep and not port_text:
            return None
    if port_text:
        if not port_text.isdigit() or len(port_text) > 5:
            return None
        port = int(port_text)
    else:
        port = None
    host = host.rstrip(".")
    return (host, port) if host else None


def name_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    try:
        host = str(ipaddress.ip_address(host))  # one spelling of each address
    except ValueError:
        pass
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def is_json_or_form(content_type: str | None) -> bool:
    return is_json(content_type) \
        or (content_type or "").split(";", 1)[0].strip().lower() in FORM_TYPES


def not_json(content_type: str | None) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        "the body must be application/json (or multipart/form-data for uploads), not "
        f"{(content_type or 'untyped')[:60]!r}", field="content-type")


class HostAndOriginMiddleware:
    """Refuses foreign Host headers, cross-origin writes and bodies of other types (see the
    module's docstring for the rules)."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] = (), api_key: str | None = None,
                 on_reject=None):
        self.app = app
        self.allowed_hosts = tuple(normalise_host_pattern(h) for h in allowed_hosts)
        self.check_host = bool(self.allowed_hosts) or not api_key
        self.on_reject = on_reject

    async def _reject(self, send, error) -> None:
        if self.on_reject is not None:
            self.on_reject(error.kind)
        await send_error(send, error, close=True)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope.get("headers", ()):
            if name in (b"host", b"origin", b"content-type", b"content-length",
                        b"transfer-encoding"):
                headers.setdefault(name, value.decode("latin-1"))
        host_header = headers.get(b"host")
        host = split_host(host_header) if host_header is not None else None
        if self.check_host and host_header is not None \
                and scope.get("path") not in PROBE_PATHS \
                and (host is None or not (is_loopback(host[0])
                                          or name_allowed(host[0], self.allowed_hosts))):
            return await self._reject(send, HostNotAllowed(
                f"host {host_header[:80]!r} is not a name of this service: give it with "
                "--allowed-hosts (FEWSTEP_ALLOWED_HOSTS)", field="host"))
        if scope["method"] in WRITE_METHODS:
            origin = headers.get(b"origin")
            if origin is not None and not self._origin_allowed(origin, host):
                return await self._reject(send, CrossOrigin(
                    f"origin {origin[:80]!r} may not write here: writes come from this "
                    "service's own page or from clients that are not browsers",
                    field="origin"))
            has_body = headers.get(b"content-length", "0").strip() not in ("", "0") \
                or b"transfer-encoding" in headers
            if has_body and not is_json_or_form(headers.get(b"content-type")):
                return await self._reject(send, not_json(headers.get(b"content-type")))
        await self.app(scope, receive, send)

    def _origin_allowed(self, origin: str, host: tuple[str, int | None] | None) -> bool:
        """The page's origin is the address the request went to, or a configured name."""
        try:
            parts = urlsplit(origin.strip())
        except ValueError:
            return False
        if parts.scheme not in DEFAULT_PORTS or not parts.netloc:
            return False  # also "null": sandboxed frames, file: pages
        sent_from = split_host(parts.netloc)
        if sent_from is None:
            return False
        if name_allowed(sent_from[0], self.allowed_hosts):
            return True
        if host is None:
            return False
        default = DEFAULT_PORTS[parts.scheme]
        return sent_from[0] == host[0] and (sent_from[1] or default) == (host[1] or default)
