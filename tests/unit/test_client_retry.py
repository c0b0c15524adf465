"""The client resends an idempotent request whose connection the server dropped (gunicorn closes an
idle keep-alive connection after 2 s: a 2 s poll loop meets it, as CI did), and never a POST."""
from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import requests

from gateway.client import retrying_session

BODY = b'{"status": "succeeded"}'


@pytest.fixture
def drops_first() -> Iterator[tuple[str, list[bytes]]]:
    """A server that reads the first request and closes without answering, then answers 200."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    seen: list[bytes] = []

    def serve() -> None:
        for n in range(3):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                seen.append(conn.recv(65536).split(b"\r\n", 1)[0])
                if n > 0:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", seen
    server.close()


def test_a_get_whose_connection_was_dropped_is_sent_again(drops_first: tuple[str, list[bytes]]) -> None:
    url, seen = drops_first
    assert retrying_session().get(f"{url}/v1/relion/jobs/j", timeout=10).json() == {"status": "succeeded"}
    assert seen == [b"GET /v1/relion/jobs/j HTTP/1.1"] * 2


def test_a_post_whose_connection_was_dropped_is_never_resent(drops_first: tuple[str, list[bytes]]) -> None:
    url, seen = drops_first
    with pytest.raises(requests.ConnectionError):
        retrying_session().post(f"{url}/v1/relion/jobs", json={}, timeout=10)
    assert seen == [b"POST /v1/relion/jobs HTTP/1.1"]
