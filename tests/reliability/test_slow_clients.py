"""Issue 17, item 2: slow clients are cut off at a deadline; everyone else keeps being served.

Raw sockets against a real server: a client that dribbles its headers (slowloris) or its body
must lose its connection within the deadline, and hundreds of them at once must neither be kept
open nor stop normal requests from being answered.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fixtures.server import ServerProcess, start_server
from tests.reliability.assets import Assets
from tests.reliability.stack import MAX_NEW, PROMPTS

HEADER_S = 1.0
BODY_S = 1.0
SLACK_S = 3.0
MAX_CONNECTIONS = 250  # scheduling on a busy 2-core CI box


@pytest.fixture(scope="module")
def guarded(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("slow-clients")
    srv = start_server(
        assets.model,
        logs,
        "--header-read-timeout-s",
        str(HEADER_S),
        "--body-read-timeout-s",
        str(BODY_S),
        "--keep-alive-timeout-s",
        "1",
        "--max-connections",
        str(MAX_CONNECTIONS),
    )
    yield srv
    srv.stop()


def connect(srv: ServerProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.settimeout(0.2)
    return s


def closed(s: socket.socket) -> bool:
    """True once the server has closed its side (EOF or reset); reads and drops any response."""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True


def read_all(s: socket.socket, within: float) -> bytes:
    s.settimeout(within)
    chunks = []
    try:
        while data := s.recv(65536):
            chunks.append(data)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def ok_generate(srv: ServerProcess) -> None:
    body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": MAX_NEW}}
    r = httpx.post(srv.url + "/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text


def test_dribbled_headers_are_cut_off_at_the_deadline(guarded: ServerProcess) -> None:
    s = connect(guarded)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    while time.monotonic() - start < HEADER_S + SLACK_S + 5:
        try:
            s.sendall(b"X-a: b\r\n")  # one more header line now and then, never the blank line
        except (BrokenPipeError, ConnectionResetError):
            break
        if closed(s):
            break
    took = time.monotonic() - start
    s.close()
    assert took < HEADER_S + SLACK_S, f"slow-header connection still open after {took:.1f}s"


def test_an_idle_connection_that_never_sends_a_request_is_closed(guarded: ServerProcess) -> None:
    s = connect(guarded)
    start = time.monotonic()
    while not closed(s) and time.monotonic() - start < HEADER_S + SLACK_S + 5:
        pass
    took = time.monotonic() - start
    s.close()
    assert took < HEADER_S + SLACK_S


def test_dribbled_body_gets_408_and_is_closed(guarded: ServerProcess) -> None:
    s = connect(guarded)
    s.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 200\r\n\r\n{"inputs": '
    )
    start = time.monotonic()
    answer = read_all(s, HEADER_S + BODY_S + SLACK_S)
    took = time.monotonic() - start
    s.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer
    assert took < BODY_S + SLACK_S


def test_many_slowloris_clients_neither_stay_nor_block_others(guarded: ServerProcess) -> None:
    socks = []
    for _ in range(200):
        s = connect(guarded)
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    start = time.monotonic()
    ok_generate(guarded)  # served while 200 half-open connections are held
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200
    open_ = list(socks)
    while open_ and time.monotonic() - start < HEADER_S + SLACK_S + 10:
        open_ = [s for s in open_ if not closed(s)]
    took = time.monotonic() - start
    for s in socks:
        s.close()
    assert not open_, f"{len(open_)} of 200 slow connections still open after {took:.1f}s"
    assert took < HEADER_S + 2 * SLACK_S
    ok_generate(guarded)


def test_keep_alive_requests_still_work(guarded: ServerProcess) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200
            time.sleep(0.3)
        ok_generate(guarded)


def test_connection_cap_answers_503_then_recovers_once_slow_clients_are_cut(guarded: ServerProcess) -> None:
    socks = []
    for _ in range(MAX_CONNECTIONS + 10):
        s = connect(guarded)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    try:
        time.sleep(0.2)  # let the server accept them all
        assert httpx.get(guarded.url + "/health", timeout=10).status_code == 503  # over the cap: at once
        deadline = time.monotonic() + HEADER_S + 2 * SLACK_S
        while time.monotonic() < deadline:
            if httpx.get(guarded.url + "/health", timeout=10).status_code == 200:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the server did not recover after the slow connections' deadline")
    finally:
        for s in socks:
            s.close()
    ok_generate(guarded)
