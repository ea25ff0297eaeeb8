"""The state one app instance owns: its options, catalogue, backend, metrics and the files kept
for OpenAI `url` responses. Route modules get it as an argument; nothing here is global."""

from __future__ import annotations

import collections
import secrets
import threading
import time
from dataclasses import dataclass

from ..errors import FewstepError
from .backend import Backend
from .catalog import Catalog
from .metrics import Metrics


def _serve_default(name: str):
    """The default of a `fewstep serve` option: defined once, in `ServeSettings`."""
    from ..config import ServeSettings

    return ServeSettings.model_fields[name].default


@dataclass
class ServerOptions:
    """What the app needs of the service's options (`ServeSettings`); `from_settings` makes it
    from them. The defaults are the options' own."""

    api_key: str | None = None
    # names the service answers to besides loopback (DNS rebinding; see server/hosts.py)
    allowed_hosts: tuple[str, ...] = _serve_default("allowed_hosts")
    queue_size: int = _serve_default("queue_size")
    max_body_bytes: int = int(_serve_default("max_body_mb") * 1024 * 1024)
    default_timeout_s: float | None = _serve_default("timeout")  # start deadline by default
    grace_s: float = _serve_default("grace")  # SIGTERM: how long work may go on
    job_retention: int = 256  # finished jobs kept for GET /v1/jobs/{id} ...
    job_retention_bytes: int = _serve_default("job_retention_bytes")  # ... and their outputs
    file_retention: int = 512  # images kept for OpenAI `url` responses (within the same bytes)
    file_ttl_s: float = 3600.0
    public_url: str | None = None  # base of OpenAI `url` results; relative URLs without it
    body_timeout_s: float = _serve_default("body_timeout_s")  # a body must arrive within this
    # ... and its headers within this (server/connections.py)
    header_timeout_s: float = _serve_default("header_timeout_s")
    max_connections: int = _serve_default("max_connections")  # open at once; more get 503
    max_batch: int | None = None  # jobs run as one pipeline call; None: 8 on CUDA, 4 elsewhere
    batch_wait_ms: float = _serve_default("batch_wait_ms")  # waiting for a lone job's companions

    @classmethod
    def from_settings(cls, settings) -> "ServerOptions":
        return cls(
            api_key=settings.api_key, allowed_hosts=settings.allowed_hosts,
            queue_size=settings.queue_size, header_timeout_s=settings.header_timeout_s,
            max_connections=settings.max_connections,
            max_body_bytes=int(settings.max_body_mb * 1024 * 1024),
            default_timeout_s=settings.timeout, grace_s=settings.grace,
            public_url=settings.public_url, body_timeout_s=settings.body_timeout_s,
            job_retention_bytes=settings.job_retention_bytes, max_batch=settings.max_batch,
            batch_wait_ms=settings.batch_wait_ms)


def default_max_batch(device: str) -> int:
    return 8 if str(device).startswith("cuda") else 4


class FileStore:
    """Encoded images behind random tokens (capability URLs), bounded in count, bytes and age."""

    def __init__(self, max_files: int, max_bytes: int, ttl_s: float):
        self.max_files, self.max_bytes, self.ttl_s = max_files, max_bytes, ttl_s
        self._files: collections.OrderedDict[str, tuple[bytes, str, float]] = \
            collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str) -> str:
        token = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            self._files[token] = (data, media_type, now + self.ttl_s)
            self._bytes += len(data)
            for key in [k for k, v in self._files.items() if v[2] < now]:
                self._drop(key)
            while len(self._files) > 1 and (len(self._files) > self.max_files
                                            or self._bytes > self.max_bytes):
                self._drop(next(iter(self._files)))
        return token

    def get(self, token: str) -> tuple[bytes, str] | None:
        with self._lock:
            entry = self._files.get(token)
        if entry is None or entry[2] < time.monotonic():
            return None
        return entry[0], entry[1]

    def _drop(self, key: str) -> None:
        data, _, _ = self._files.pop(key)
        self._bytes -= len(data)


class Service:
    def __init__(self, backend: Backend, catalog: Catalog, options: ServerOptions,
                 metrics: Metrics):
        self.backend = backend
        self.catalog = catalog
        self.options = options
        self.metrics = metrics
        self.settings = backend.settings
        self.files = FileStore(options.file_retention, options.job_retention_bytes,
                               options.file_ttl_s)

    @property
    def queue(self) -> Backend:
        """The backend, under the name `fewstep serve` uses for its SIGTERM drain."""
        return self.backend

    def timeout(self, timeout_s: float | None) -> float | None:
        return timeout_s or self.options.default_timeout_s

    def redact(self, text: str) -> str:
        return self.catalog.redact(text)

    def count_error(self, exc: FewstepError) -> None:
        if not getattr(exc, "counted", False):
            self.metrics.errors.labels(exc.kind).inc()
