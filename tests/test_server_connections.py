"""Connections that never finish their headers are closed (a header timeout), and open
connections are bounded; neither touches a request whose headers arrived, however long it
runs. Against a real uvicorn server configured as `fewstep serve` configures it."""

from __future__ import annotations

import contextlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from helpers.server import WAIT, Gate, live_server, make_app, tiny_env

HEADER_TIMEOUT = 1.0
# what "closed within the bound" allows beyond the timeout on a busy machine
SLACK = 10.0


@pytest.fixture(scope="module")
def server():
    app = make_app(queue_size=2, header_timeout_s=HEADER_TIMEOUT, max_connections=64)
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        yield url, (host, int(port)), app


def closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """Reads until the server closes the socket (True) or the deadline passes (False)."""
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except ConnectionResetError:
            return True
    return False


@pytest.mark.parametrize("partial", [
    b"",  # connects, says nothing
    b"GET /v1/status HTT",  # half a request line
    b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",  # half the headers
])
def test_partial_requests_are_closed_after_the_header_timeout(server, partial):
    _, address, _ = server
    sockets = []
    try:
        for _ in range(50):
            sock = socket.create_connection(address, timeout=WAIT)
            if partial:
                sock.sendall(partial)
            sockets.append(sock)
        deadline = time.monotonic() + HEADER_TIMEOUT + SLACK
        assert all(closed_by_server(sock, deadline) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


def test_a_keep_alive_connection_is_held_to_the_same_rule(server):
    _, address, _ = server
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(WAIT)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.")  # the next one stalls
        assert closed_by_server(sock, time.monotonic() + HEADER_TIMEOUT + SLACK)


def test_headers_sent_slowly_within_the_timeout_are_answered(server):
    _, address, _ = server
    with socket.create_connection(address, timeout=WAIT) as sock:
        for part in (b"GET /healthz HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"\r\n"):
            sock.sendall(part)
            time.sleep(HEADER_TIMEOUT / 5)
        sock.settimeout(WAIT)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_long_request_is_not_cut_by_the_header_timeout(server):
    url, _, _ = server
    _, engine = tiny_env()
    with Gate(engine) as gate, ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, url + "/v1/txt2img", timeout=WAIT, json={
            "prompt": "x", "width": 64, "height": 64, "steps": 1})
        gate.wait_entered()
        time.sleep(HEADER_TIMEOUT * 2)  # the request runs past the header timeout
        gate.release()
        assert running.result(WAIT).status_code == 200


def test_open_connections_are_bounded():
    app = make_app(queue_size=2, header_timeout_s=30.0, max_connections=8)
    with live_server(app) as url, contextlib.ExitStack() as stack:
        host, port = url.removeprefix("http://").split(":")
        held = [stack.enter_context(socket.create_connection((host, int(port)), timeout=WAIT))
                for _ in range(8)]
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(WAIT)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # kept alive
        with socket.create_connection((host, int(port)), timeout=WAIT) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := extra.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b"too_many_connections" in answer
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert httpx.get(url + "/healthz", timeout=WAIT).status_code == 200  # room again


def test_fewstep_serve_runs_uvicorn_with_them(tiny, monkeypatch):
    """`fewstep serve` builds its uvicorn configuration with the guarded protocol and the
    options' values."""
    import uvicorn

    from fewstep.server.cli import main

    seen = {}

    def capture(self, *args, **kwargs):
        seen["config"] = self.config

    monkeypatch.setattr(uvicorn.Server, "run", capture)
    monkeypatch.delenv("FEWSTEP_API_KEY", raising=False)
    assert main(["--model", str(tiny.sd15), "--lcm-lora", str(tiny.lcm_sd15), "--device",
                 "cpu", "--speed", "off", "--port", "0", "--header-timeout-s", "7",
                 "--max-connections", "33"]) == 0
    config = seen["config"]
    assert config.http.__name__ == "GuardedProtocol"
    options = config.app.state.service.options
    assert (options.header_timeout_s, options.max_connections) == (7.0, 33)
