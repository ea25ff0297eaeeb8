"""Pure ASGI middlewares: the request body read whole up front, bounded in bytes (413, before
anything decodes it), in time (408: a stalled or trickling upload cannot hold a connection) and,
for JSON, in values (413: see `json_limits`); and the one catch for the unexpected, which
answers a generic 500 and keeps the connection."""

from __future__ import annotations

import asyncio
import logging

from ..errors import FewstepError
from .errors import BodyTimeout, InternalError, PayloadTooLarge, send_error
from .hosts import is_json
from .json_limits import BodyParser
from .per_loop import PerLoop

log = logging.getLogger("fewstep.server")

NO_BODY_METHODS = ("GET", "HEAD", "OPTIONS")
# Bodies over LARGE_BODY bytes (or of unknown length) are read one at a time; the
# others wait unread, their senders held back by TCP. Reading twenty 40 MB uploads at once
# left every turn of the event loop with twenty sockets to drain: /healthz, a handful of
# turns, took 300 ms although no single turn was long.
LARGE_BODY = 1 << 20
LARGE_READS = 1


class BodyMiddleware:
    """The body is buffered (it is bounded) and replayed to the app; later `receive` calls pass
    through, so a disconnect is still seen by the handler. A refused body closes the
    connection: what is left of it is never read. A JSON body is parsed here, in steps, and
    its value left for the routes (`json_limits`)."""

    def __init__(self, app, limit: int, timeout_s: float, on_reject=None):
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s
        self.on_reject = on_reject
        self.parser = BodyParser()
        self._large_reads = PerLoop(lambda: asyncio.Semaphore(LARGE_READS))

    async def _reject(self, send, error, close: bool = True) -> None:
        if self.on_reject is not None:
            self.on_reject(error.kind)
        await send_error(send, error, close=close)

    def _too_large(self):
        return PayloadTooLarge(f"the body is over the limit of {self.limit} bytes", field="body")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in NO_BODY_METHODS:
            return await self.app(scope, receive, send)
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    return await self._reject(send, self._too_large())
        if declared is not None and 0 <= declared <= LARGE_BODY:
            chunks = await self._read(scope, receive, send)
        else:
            async with self._large_reads.get():  # read and parsed; the app runs after, freed
                chunks = await self._read(scope, receive, send)
        if chunks is None:  # refused or gone
            return
        replayed = 0

        async def replay():
            """The body as it came, a chunk at a time, letting others run between two (a
            64 MB form is parsed in steps, not in one stretch)."""
            nonlocal replayed
            if replayed < len(chunks):
                if replayed:
                    await asyncio.sleep(0)
                replayed += 1
                return {"type": "http.request", "body": chunks[replayed - 1],
                        "more_body": replayed < len(chunks)}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, scope, receive, send) -> list[bytes] | None:
        """The body's chunks, its JSON value left in the scope; None when it was refused (the
        answer sent) or the client left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await self._reject(send, BodyTimeout(
                    f"the body did not arrive within {self.timeout_s:g} s", field="body"))
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._reject(send, self._too_large())
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        chunks = [chunk for chunk in chunks if chunk] or [b""]
        content_type = next((v for k, v in scope.get("headers", ()) if k == b"content-type"),
                            b"").decode("latin-1")
        if size and is_json(content_type):
            try:
                await self.parser.parse_into(scope, chunks)
            except FewstepError as error:  # the body was read whole: the connection can stay
                await self._reject(send, error, close=False)
                return None
        return chunks


class CatchAllMiddleware:
    """Anything unexpected becomes a generic typed 500 here, and the request ends normally: the
    server keeps the connection for the client's next request. (Starlette's own last-resort
    handler answers too, then raises again, and the server drops the connection.)"""

    def __init__(self, app, on_error=None):
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # part of an answer is out: nothing sound can follow on this connection
                raise
            error = InternalError()
            if self.on_error is not None:
                self.on_error(error)
            await send_error(send, error)
