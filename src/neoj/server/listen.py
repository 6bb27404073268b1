"""The listening socket for `neoj serve`, bound before the model loads so a bad port fails in a second.

Binding first turns "port out of range" and "port in use" into one clear line before minutes of loading,
and handing the bound socket to uvicorn leaves no gap in which another program could take the port.
"""

from __future__ import annotations

import errno
import socket

from ..errors import NeojError


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """Returns a TCP socket bound to (host, port) and listening; NeojError names the problem if it can't be."""
    if not 0 <= port <= 65535:
        raise NeojError(f"--port {port} is not a TCP port: give a number from 1 to 65535 (0 picks a free one)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise NeojError(f"--host {host!r} is not an address of this machine ({exc.strerror}): "
                        "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise NeojError(_bind_failure(host, port, exc)) from None
    sock.set_inheritable(True)
    return sock


def _bind_failure(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use (another server?): stop it or pick another --port"
    if exc.errno == errno.EACCES:
        return f"no permission to listen on port {port}: ports below 1024 need root; pick one above 1024 with --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine: use 127.0.0.1 or 0.0.0.0"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
