"""Connections, as uvicorn runs the service: a request's headers must arrive within
`header_timeout_s` of its first byte (or of the connection's opening), and at most
`max_connections` are open at once. uvicorn has keep-alive and body timeouts (the body's is
ours, `BodyMiddleware`) but none for headers: a client sending a partial request line held its
socket for ever, and enough of them would exhaust the process's file descriptors.

A connection over the limit is answered with a typed 503 and closed at once; one whose headers
do not arrive in time is closed (nothing has been read that a response could answer)."""

from __future__ import annotations

import json
import logging

log = logging.getLogger("fewstep.server")

BUSY_BODY = json.dumps({"error": {
    "type": "too_many_connections", "field": None,
    "message": "the server has too many open connections; try again shortly"}}).encode()
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
        + str(len(BUSY_BODY)).encode() + b"\r\n\r\n" + BUSY_BODY)


def guarded_protocol(header_timeout_s: float, max_connections: int):
    """uvicorn's HTTP protocol (httptools, else h11) with a header timeout and a bound on open
    connections. Both keep `self.cycle`, the request being answered: a new one appears when a
    request's headers are complete, which is what the timer waits for."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _header_timer = None
        _cycle_when_armed = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("over %d open connections: refusing a new one", max_connections)
                transport.write(BUSY)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None
                                               or self.cycle.response_complete):
                self._arm()  # the first bytes of the next request on this connection
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._cycle_when_armed:
                self._disarm()  # its headers are complete: the app has the request

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._cycle_when_armed = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.cycle is self._cycle_when_armed and not self.transport.is_closing():
                self.transport.close()

    return GuardedProtocol


def uvicorn_config(app, **kwargs):
    """The uvicorn.Config the service runs with: its options' header timeout and connection
    bound (`app.state.service.options`), and `kwargs` for the rest."""
    import uvicorn

    options = app.state.service.options
    return uvicorn.Config(app, http=guarded_protocol(options.header_timeout_s,
                                                     options.max_connections), **kwargs)
