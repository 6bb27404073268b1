"""neoj.server.listen: the serve socket is bound before the model loads, with one-line errors."""

from __future__ import annotations

import socket

import pytest

from neoj.errors import NeojError
from neoj.server.listen import bind_listening_socket


@pytest.mark.parametrize("port", [99999, 65536, -1])
def test_a_port_out_of_range_is_named(port):
    with pytest.raises(NeojError, match=rf"--port {port} is not a TCP port: give a number from 1 to 65535"):
        bind_listening_socket("127.0.0.1", port)


def test_a_port_in_use_is_reported_and_a_free_one_listens():
    taken = bind_listening_socket("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(NeojError, match=rf"port {port} on 127.0.0.1 is already in use"):
            bind_listening_socket("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the bound socket accepts connections (queued until uvicorn serves it)
    finally:
        taken.close()


def test_an_unknown_host_is_named():
    with pytest.raises(NeojError, match="--host 'no-such-host.invalid' is not an address of this machine"):
        bind_listening_socket("no-such-host.invalid", 8000)
