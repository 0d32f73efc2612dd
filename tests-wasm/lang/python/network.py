"""Python only: componentize-py's components import `wasi:sockets`, which the
runtime links with every address denied. A suite must not reach the network,
not even the loopback of the machine it runs on."""

import encodings.idna  # noqa: F401 - bundled, so that a refusal is not a missing codec
import socket

from matryoshka import WitWorld, test  # noqa: F401 - WitWorld is the export


@test
def connecting_is_refused():
    try:
        socket.create_connection(("127.0.0.1", 22), timeout=5).close()
    except OSError as e:
        print(f"refused: {e!r}")
        return
    raise AssertionError("a suite connected to 127.0.0.1:22")


@test
def name_lookup_is_refused():
    try:
        found = socket.getaddrinfo("localhost", 22)
    except OSError as e:
        print(f"refused: {e!r}")
        return
    raise AssertionError(f"a suite resolved localhost: {found}")


@test
def listening_is_refused():
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
    except OSError as e:
        print(f"refused: {e!r}")
        return
    raise AssertionError("a suite listened on a port of 127.0.0.1")
