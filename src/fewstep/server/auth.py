"""API-key authentication (Bearer, or HTTP Basic with the key as password, the form A1111
clients send) and the loopback-by-default bind rule."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress

from ..errors import InvalidRequest
from ..names import api_key_problem
from .errors import Unauthorized, send_error

OPEN_PATHS = ("/healthz", "/readyz", "/")  # "/": the studio page, which then asks for the key
OPEN_PREFIXES = ("/v1/files/",  # capability URLs: the random token is the secret
                 "/studio/")  # the page's static files (no data)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Any address but loopback needs an API key: refuse to start without one."""
    if not is_loopback(host) and not api_key:
        raise InvalidRequest(
            f"binding {host!r} exposes the service beyond this machine: give --api-key (or "
            "FEWSTEP_API_KEY), or bind 127.0.0.1", field="api_key")


def check_api_key(key: str | None) -> None:
    problem = None if key is None else api_key_problem(key)
    if problem:
        raise InvalidRequest(problem, field="api_key")


def key_matches(header: str | None, api_key: str) -> bool:
    """The key's UTF-8 bytes against the bytes the client sent, for both schemes: the header
    arrives as latin-1 text (the raw bytes), Basic's password as base64 of the raw bytes."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    expected = api_key.encode("utf-8")
    if scheme.lower() == "bearer":
        try:
            sent = value.encode("latin-1")
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(sent, expected)
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
        _, sep, password = decoded.partition(b":")
        return bool(sep) and hmac.compare_digest(password, expected)
    return False


class AuthMiddleware:
    """Pure ASGI: 401 with a typed body unless the request carries the key."""

    def __init__(self, app, api_key: str | None, on_reject=None):
        self.app = app
        self.api_key = api_key
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.api_key:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        header = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        if key_matches(header, self.api_key):
            return await self.app(scope, receive, send)
        if self.on_reject is not None:
            self.on_reject()
        await send_error(send, Unauthorized())
