"""Connections before they are requests: a head must arrive within header_timeout, at most max_connections
are open (503 beyond), a head too large is refused, and accept() errors are logged once per interval."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import select
import socket
import subprocess
import sys
import time

import pytest

from llmctl.runtime.server import connections

HEADER_TIMEOUT = 0.5
SLACK = 1.5  # seconds a timeout may fire late on a loaded test machine
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length: status, headers (lower-case names) and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "closed inside a response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed(sock: socket.socket) -> bool:
    """True once the server has closed the connection and nothing more is left to read."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def error_code(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["code"]


# Header timeout


def test_a_partial_head_gets_408_and_is_closed_within_the_header_timeout(engine, serve):
    with serve(engine, header_timeout=HEADER_TIMEOUT) as server, connect(server) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        status, headers, body = read_response(sock)
        assert HEADER_TIMEOUT - 0.05 < time.monotonic() - start < HEADER_TIMEOUT + SLACK
        assert status == 408 and headers["connection"] == "close" and error_code(body) == "request_timeout"
        assert closed(sock)


def test_a_head_trickled_byte_by_byte_still_gets_408_at_the_deadline(engine, serve):
    with serve(engine, header_timeout=HEADER_TIMEOUT) as server, connect(server) as sock:
        start = time.monotonic()
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 1000:
            if select.select([sock], [], [], 0.05)[0]:
                break  # the answer is there: stop sending, as a client that reads would
            sock.sendall(bytes([byte]))
        status, _, _ = read_response(sock)
        assert status == 408 and time.monotonic() - start < HEADER_TIMEOUT + SLACK
        assert closed(sock)


def test_a_silent_connection_is_closed_without_an_answer(engine, serve):
    with serve(engine, header_timeout=HEADER_TIMEOUT) as server, connect(server) as sock:
        start = time.monotonic()
        assert sock.recv(1024) == b""
        assert HEADER_TIMEOUT - 0.05 < time.monotonic() - start < HEADER_TIMEOUT + SLACK


def test_a_crowd_of_slow_clients_is_gone_after_the_header_timeout(engine, serve, until):
    with serve(engine, header_timeout=HEADER_TIMEOUT) as server:
        crowd = [connect(server) for _ in range(200)]
        for i, sock in enumerate(crowd):
            sock.sendall(b"GET /health HT" if i % 2 else b"")  # half send part of a head, half nothing
        until(lambda: not server.server.server_state.connections, timeout=HEADER_TIMEOUT + SLACK)
        statuses = [read_response(sock)[0] for sock in crowd[1::2]]
        assert statuses == [408] * 100 and all(closed(sock) for sock in crowd)
        for sock in crowd:
            sock.close()


def test_a_head_sent_in_parts_within_the_timeout_is_served(engine, serve):
    with serve(engine, header_timeout=HEADER_TIMEOUT) as server, connect(server) as sock:
        sock.sendall(HEALTH[:10])
        time.sleep(HEADER_TIMEOUT / 2)
        sock.sendall(HEALTH[10:])
        assert read_response(sock)[0] == 200


def test_keep_alive_outlives_the_header_timeout_and_times_the_next_head(engine, serve):
    with serve(engine, header_timeout=HEADER_TIMEOUT, keep_alive_timeout=5) as server, connect(server) as sock:
        sock.sendall(HEALTH)
        assert read_response(sock)[0] == 200
        time.sleep(HEADER_TIMEOUT * 1.5)  # idle between requests: keep_alive_timeout's, not header_timeout's
        sock.sendall(HEALTH)
        assert read_response(sock)[0] == 200
        time.sleep(HEADER_TIMEOUT * 1.5)
        start = time.monotonic()
        sock.sendall(HEALTH[:10])
        status, _, _ = read_response(sock)
        assert status == 408 and time.monotonic() - start < HEADER_TIMEOUT + SLACK
        assert closed(sock)


def test_a_partial_pipelined_head_is_timed_from_the_end_of_the_response_before_it(engine, serve):
    with serve(engine, header_timeout=HEADER_TIMEOUT) as server, connect(server) as sock:
        sock.sendall(HEALTH + HEALTH[:10])
        assert read_response(sock)[0] == 200
        start = time.monotonic()
        assert read_response(sock)[0] == 408 and time.monotonic() - start < HEADER_TIMEOUT + SLACK


def test_a_body_trickled_after_its_response_is_cut_off_at_the_keep_alive_timeout(engine, serve):
    # /health answers without reading the body: the client still owes it, and trickles it.
    with serve(engine, keep_alive_timeout=HEADER_TIMEOUT) as server, connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        assert read_response(sock)[0] == 200
        start = time.monotonic()
        while not select.select([sock], [], [], 0.05)[0] and time.monotonic() - start < HEADER_TIMEOUT + SLACK:
            sock.sendall(b"x")
        assert closed(sock) and time.monotonic() - start < HEADER_TIMEOUT + SLACK


def test_a_body_the_app_did_not_read_still_lets_the_connection_serve_the_next_request(engine, serve):
    with serve(engine, keep_alive_timeout=HEADER_TIMEOUT) as server, connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.sendall(b"hello" + HEALTH)
        assert read_response(sock)[0] == 200


@pytest.mark.parametrize("piece", [64 << 10, 1 << 10], ids=["at-once", "in-pieces"])
def test_a_head_over_the_size_limit_gets_431_and_is_closed(engine, serve, piece):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 10) + b"\r\n\r\n"
    with serve(engine) as server, connect(server) as sock:
        for start in range(0, len(head), piece):
            if select.select([sock], [], [], 0.01)[0]:
                break
            sock.sendall(head[start:start + piece])
        status, headers, body = read_response(sock)
        assert status == 431 and headers["connection"] == "close" and error_code(body) == "request_header_too_large"
        assert closed(sock)


def test_a_head_just_under_the_size_limit_is_served(engine, serve):
    with serve(engine) as server, connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (12 << 10) + b"\r\n\r\n")
        assert read_response(sock)[0] == 200


# Connection cap


def test_over_the_cap_a_connection_gets_503_at_once_and_the_others_stay_open(engine, serve, until, caplog):
    with serve(engine, max_connections=3) as server:
        held = [connect(server) for _ in range(3)]
        for sock in held:
            sock.sendall(HEALTH)
            assert read_response(sock)[0] == 200
        for send_first in (False, True):
            with connect(server) as extra:
                if send_first:
                    extra.sendall(HEALTH)
                status, headers, body = read_response(extra)
                assert status == 503 and error_code(body) == "too_many_connections"
                assert json.loads(body)["error"]["type"] == "server_error"
                assert headers["connection"] == "close" and headers["retry-after"] == "1"
                assert closed(extra)
        for sock in held:  # still open, still served
            sock.sendall(HEALTH)
            assert read_response(sock)[0] == 200
        held.pop().close()
        until(lambda: len(server.server.server_state.connections) < 3)
        with connect(server) as sock:
            sock.sendall(HEALTH)
            assert read_response(sock)[0] == 200
        for sock in held:
            sock.close()
    refusals = [r for r in caplog.records if r.name == "llmctl.server" and "over the cap" in r.getMessage()]
    assert len(refusals) == 1  # the second refusal came within the interval


# Accept errors


def accept_failed(code: int = errno.EMFILE) -> dict:
    return {"message": connections.ACCEPT_FAILED, "exception": OSError(code, "Too many open files")}


def test_accept_errors_are_logged_once_per_interval_with_the_count_left_out(caplog):
    now = [100.0]
    handler = connections.AcceptErrors(previous=None, interval=5.0, clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        for _ in range(10_000):
            handler(loop, accept_failed())
        lines = [r for r in caplog.records if r.name == "llmctl.server"]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING
        now[0] += 5.0
        handler(loop, accept_failed(errno.ENFILE))
    finally:
        loop.close()
    lines = [r for r in caplog.records if r.name == "llmctl.server"]
    assert [r.fields["suppressed"] for r in lines] == [0, 9_999]
    assert [r.fields["error"] for r in lines] == ["EMFILE", "ENFILE"]
    assert not [r for r in caplog.records if r.name == "asyncio"]


def test_install_passes_every_other_context_to_the_previous_handler_unchanged(caplog):
    seen = []
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(lambda lp, context: seen.append((lp, context)))
        connections.install(loop)
        other = {"message": "Task exception was never retrieved", "exception": ValueError("x")}
        refused = {"message": "some other accept failure", "exception": OSError(errno.ECONNABORTED, "aborted")}
        for context in (other, refused, accept_failed(errno.ENOBUFS), accept_failed(errno.ENOMEM)):
            loop.call_exception_handler(context)
    finally:
        loop.close()
    assert seen == [(loop, other), (loop, refused)]
    assert len([r for r in caplog.records if r.name == "llmctl.server"]) == 1


def test_install_without_a_previous_handler_falls_back_to_asyncio_default(caplog):
    loop = asyncio.new_event_loop()
    try:
        connections.install(loop)
        loop.call_exception_handler({"message": "something else broke"})
        loop.call_exception_handler(accept_failed())
    finally:
        loop.close()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == ["something else broke"]
    assert len([r for r in caplog.records if r.name == "llmctl.server"]) == 1


# A server that has run out of descriptors: a few left after start-up, then more clients than that.
OUT_OF_DESCRIPTORS = """
import asyncio, logging, os, resource
import uvicorn
from llmctl.runtime.server import connections
from llmctl.runtime.server.settings import ServerSettings

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})

async def main():
    settings = ServerSettings(served_model_name="m", host="127.0.0.1", port=0, max_connections=1000)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="off",
                                           **connections.uvicorn_options(settings)))
    connections.install(asyncio.get_running_loop())
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 4, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(server.servers[0].sockets[0].getsockname()[1], flush=True)
    await serving

logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
asyncio.run(main())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts descriptors in /proc/self/fd")
def test_a_server_out_of_descriptors_logs_one_line_not_one_per_accept():
    server = subprocess.Popen([sys.executable, "-c", OUT_OF_DESCRIPTORS], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
        time.sleep(1.5)  # asyncio retries accept() after a second: two rounds of failures
        for sock in clients:
            sock.close()
    finally:
        server.kill()
        _, log = server.communicate(timeout=10)
    lines = log.splitlines()
    assert [line for line in lines if "socket.accept() out of system resource" in line] == []
    assert len([line for line in lines if line.startswith("llmctl.server WARNING accept() fails")]) == 1, log
