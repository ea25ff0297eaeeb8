"""The listening socket, taken before the model loads: an address in use or not of this machine
is a start-up error, not a surprise after minutes of loading."""

from __future__ import annotations


def bind_socket(host: str, port: int):
    """The listening address, taken before the model loads: an address in use or not of this
    machine is a start-up error, not a surprise after loading."""
    import errno
    import socket

    from ..errors import InvalidRequest

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        raise InvalidRequest(f"host {host!r} is not an address or a name that resolves",
                             field="host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = {errno.EADDRINUSE: "is in use", errno.EACCES: "needs privileges",
                  errno.EADDRNOTAVAIL: "is not an address of this machine"}
        what = reason.get(exc.errno, f"cannot be bound ({exc.strerror})")
        field = "host" if exc.errno == errno.EADDRNOTAVAIL else "port"
        raise InvalidRequest(f"{host}:{port} {what}", field=field) from None
    return sock
