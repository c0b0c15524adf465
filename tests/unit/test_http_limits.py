"""What the HTTP layer refuses, through real servers: werkzeug's dev server and gunicorn.

Each server is `relion-gateway serve` on a free loopback port with a temporary state directory,
authentication on (``[auth] mode`` default) and no poller; requests are written on raw sockets,
so that what is on the wire (chunked bodies, oversized request lines) is exactly what is tested.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.api.errors import MAX_BODY_BYTES, MAX_HEADER_BYTES, MAX_HEADER_FIELDS, MAX_URI_BYTES
from gateway.auth import create_token
from gateway.database import JobStore, make_engine
from tests.fakes import FakeScheduler, FakeStorage

ROOT = Path(__file__).resolve().parents[2]
JOBS = "/v1/relion/jobs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    kind: str
    port: int
    token: str
    log: Path

    def send(self, raw: bytes, timeout: float = 20) -> tuple[int, dict[str, str], bytes]:
        """Write ``raw`` on a fresh connection; return the status, headers and body of the reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            try:
                sock.sendall(raw)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may answer and close before reading everything
            reply = b""
            while True:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                reply += data
                head, sep, body = reply.partition(b"\r\n\r\n")
                if sep:
                    lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                    if lengths and len(body) >= int(lengths[0]):
                        break
        head, _, body = reply.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines and lines[0].startswith("HTTP/1."), (self.kind, reply[:300], self.log.read_text()[-2000:])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers, body

    def request(self, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
        lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def start_server(tmp_path: Path, kind: str) -> Iterator[Server]:
    state = tmp_path / kind
    state.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_PATHS_STATE_DIR": str(state), "GATEWAY_POLLER_ENABLED": "false", "GATEWAY_SERVER_JSON_LOGS": "false"})
    token = create_token(JobStore(make_engine(f"sqlite:///{state / 'gateway.sqlite'}")), "alice", n=16)[1]
    argv = [sys.executable, "-m", "gateway", "serve", "--port", str(port)]
    argv += ["--dev"] if kind == "werkzeug" else ["--workers", "1"]
    log_path = state / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if sock.recv(64).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield Server(kind, port, token, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module", params=["werkzeug", "gunicorn"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_server(tmp_path_factory.mktemp("serve"), request.param)


def assert_error_shape(status: int, headers: dict[str, str], body: bytes, code: int) -> dict[str, Any]:
    assert status == code, body[:500]
    assert headers.get("content-type", "").startswith("application/json"), headers
    shaped = json.loads(body)
    assert set(shaped) <= {"code", "status", "message", "errors"} and {"code", "status", "message"} <= set(shaped)
    assert shaped["code"] == code and isinstance(shaped["message"], str) and shaped["message"]
    return shaped


def chunked(body: bytes, size: int = 64 * 1024) -> bytes:
    parts = [body[n:n + size] for n in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def test_a_chunked_body_over_the_limit_is_a_413_like_one_with_content_length(server: Server) -> None:
    big = json.dumps({"user_id": "x" * (MAX_BODY_BYTES + 10)}).encode()
    auth = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}
    for framing in ("chunked", "content-length"):
        if framing == "chunked":
            raw = server.request("POST", JOBS, {**auth, "Transfer-Encoding": "chunked"}, chunked(big))
        else:
            raw = server.request("POST", JOBS, {**auth, "Content-Length": str(len(big))}, big)
        body = assert_error_shape(*server.send(raw), 413)
        assert f"larger than the limit of {MAX_BODY_BYTES} bytes" in body["message"], (framing, body)


def test_a_chunked_body_within_the_limit_is_read_whole(server: Server) -> None:
    # Just under the limit, in chunks: the schema sees all of it (one unknown field, nothing truncated).
    padding = "p" * (MAX_BODY_BYTES - 200)
    small = json.dumps({"user_id": "alice", "padding": padding}).encode()
    assert len(small) < MAX_BODY_BYTES
    headers = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    body = assert_error_shape(*server.send(server.request("POST", JOBS, headers, chunked(small, 1000))), 422)
    assert "padding" in body["errors"]["json"] and "workspace_id" in body["errors"]["json"], body["message"][:300]


# -- errors the HTTP layer produces: the one shape, under both servers and in-process -------------


def test_the_gateway_limits_sit_inside_gunicorns() -> None:
    from gateway.serve import GUNICORN_FIELD_SIZE, GUNICORN_FIELDS, GUNICORN_REQUEST_LINE

    assert MAX_URI_BYTES + len("OPTIONS  HTTP/1.1") <= GUNICORN_REQUEST_LINE  # gunicorn clamps the line to 8190
    assert GUNICORN_FIELD_SIZE > MAX_HEADER_BYTES and GUNICORN_FIELDS > MAX_HEADER_FIELDS
    assert MAX_HEADER_FIELDS < 100  # http.client's fixed limit under werkzeug's dev server


def _uri(length: int) -> str:
    # /healthz reads no query: the padding reaches the app (the API's own operations refuse a
    # parameter they do not take with a 400).
    target = "/healthz?pad="
    return target + "x" * (length - len(target))


def test_server_errors_have_the_one_shape(server: Server) -> None:
    auth = {"Authorization": f"Bearer {server.token}"}
    # 404 and 405 (with its Allow header) from routing.
    assert_error_shape(*server.send(server.request("GET", "/v1/relion/nowhere", auth)), 404)
    status, headers, body = server.send(server.request("PUT", JOBS, {**auth, "Content-Length": "0"}))
    assert_error_shape(status, headers, body, 405)
    assert {"GET", "POST"} <= {m.strip() for m in headers["allow"].split(",")}, headers
    # A URI at the limit reaches the app; one byte more is the gateway's 414, far more the server's.
    assert server.send(server.request("GET", _uri(MAX_URI_BYTES), auth))[0] == 200
    for length in (MAX_URI_BYTES + 1, 8150, 70_000):
        body = assert_error_shape(*server.send(server.request("GET", _uri(length), auth)), 414)
        if length < 8150:
            assert f"longer than the limit of {MAX_URI_BYTES} bytes" in body["message"]
    # Headers: too large in all (the gateway's 431), one line past the server's own, too many.
    big = {**auth, "X-Pad": "p" * MAX_HEADER_BYTES}
    body = assert_error_shape(*server.send(server.request("GET", JOBS, big)), 431)
    assert f"larger than the limit of {MAX_HEADER_BYTES} bytes" in body["message"]
    assert_error_shape(*server.send(server.request("GET", JOBS, {**auth, "X-Pad": "p" * 70_000})), 431)
    many = {**auth, **{f"X-H{n}": "v" for n in range(MAX_HEADER_FIELDS + 5)}}
    body = assert_error_shape(*server.send(server.request("GET", JOBS, many)), 431)
    assert f"more than {MAX_HEADER_FIELDS} header fields" in body["message"]
    assert_error_shape(*server.send(server.request("GET", JOBS, {**auth, **{f"X-H{n}": "v" for n in range(150)}})), 431)
    # Not HTTP/1.x at all: the server's own 400, in the same shape (http.server answers a one-word
    # request line as HTTP/0.9 would: the body alone, without a status line or headers).
    if server.kind == "gunicorn":
        assert_error_shape(*server.send(b"GARBAGE\r\n\r\n"), 400)
    else:
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.sendall(b"GARBAGE\r\n\r\n")
            reply = b"".join(iter(lambda: sock.recv(65536), b""))
        assert json.loads(reply)["code"] == 400, reply
    # The limits come before authentication, as the server's own would.
    assert_error_shape(*server.send(server.request("GET", _uri(MAX_URI_BYTES + 1))), 414)


def test_in_process_the_limits_and_routing_errors_have_the_one_shape(client: Any, anonymous_client: Any) -> None:
    from tests.unit.test_hostile_input import assert_error_shape as shaped

    shaped(client.get("/nowhere"), 404)
    response = client.put(JOBS)
    shaped(response, 405)
    assert {"GET", "POST"} <= set(response.allow)
    shaped(client.get(_uri(MAX_URI_BYTES + 1)), 414)
    assert client.get(_uri(MAX_URI_BYTES)).status_code == 200
    shaped(anonymous_client.get(JOBS, headers={"X-Pad": "p" * MAX_HEADER_BYTES}), 431)
    shaped(client.get(JOBS, headers={f"X-H{n}": "v" for n in range(MAX_HEADER_FIELDS)}), 431)
    assert client.get(JOBS, headers={f"X-H{n}": "v" for n in range(MAX_HEADER_FIELDS - 8)}).status_code == 200


# -- /readyz floods: one check per TTL per process ------------------------------------------------


class CountingScheduler(FakeScheduler):
    """Counts Slurm pings; each takes a moment, as a real one would."""

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0

    def ping(self) -> bool:
        self.pings += 1
        time.sleep(0.05)
        return True


def test_a_flood_of_unauthenticated_readyz_runs_one_check_per_ttl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from gateway import create_app
    from gateway.app import READINESS_KEY
    from gateway.observability import READINESS_TTL_S

    s3_calls = []

    class FakeS3Client:
        def head_bucket(self, Bucket: str) -> None:  # noqa: N803 (boto3's spelling)
            s3_calls.append(Bucket)

    monkeypatch.setattr("gateway.observability.make_s3_client", lambda *a, **k: FakeS3Client())
    scheduler = CountingScheduler()
    app = create_app(
        {"TESTING": True, "PATHS_STATE_DIR": str(tmp_path / "state"), "S3_ALLOWED_BUCKETS": ["relion-local"]},
        scheduler=scheduler,
        storage=FakeStorage(),  # type: ignore[arg-type]
    )
    now = [1000.0]
    app.extensions[READINESS_KEY].clock = lambda: now[0]
    statuses: list[int] = []

    def probe(count: int) -> None:
        client = app.test_client()  # no token
        for _ in range(count):
            statuses.append(client.get("/readyz").status_code)

    threads = [threading.Thread(target=probe, args=(25,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 200
    assert scheduler.pings == 1 and s3_calls == ["relion-local"]  # 200 probes, one check

    now[0] += READINESS_TTL_S - 0.1
    body = app.test_client().get("/readyz").json
    assert scheduler.pings == 1 and body["age_s"] == pytest.approx(READINESS_TTL_S - 0.1) and body["ready"] is True
    now[0] += 0.2  # past the TTL: the next probe checks again, once
    for _ in range(20):
        assert app.test_client().get("/readyz").json["age_s"] == 0
    assert scheduler.pings == 2 and len(s3_calls) == 2
