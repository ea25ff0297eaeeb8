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


@dataclass
class ServerOptions:
    api_key: str | None = None
    # names the service answers to besides loopback (DNS rebinding; see server/hosts.py)
    allowed_hosts: tuple[str, ...] = ()
    queue_size: int = 16
    max_body_bytes: int = 64 * 1024 * 1024
    default_timeout_s: float | None = None  # start deadline when a request gives none
    grace_s: float = 30.0  # SIGTERM: how long running and queued work may go on
    job_retention: int = 256  # finished jobs kept for GET /v1/jobs/{id} ...
    job_retention_bytes: int = 256 * 1024 * 1024  # ... and the bytes of their outputs
    file_retention: int = 512  # images kept for OpenAI `url` responses (within the same bytes)
    file_ttl_s: float = 3600.0
    public_url: str | None = None  # base of OpenAI `url` results; relative URLs without it
    body_timeout_s: float = 30.0  # a request body must have arrived within this
    header_timeout_s: float = 20.0  # ... and its headers within this (server/connections.py)
    max_connections: int = 512  # open at once; more are answered 503 and closed
    max_batch: int | None = None  # jobs run as one pipeline call; None: 8 on CUDA, 4 elsewhere
    batch_wait_ms: float = 0.0  # how long the worker waits for companions of a lone job


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
