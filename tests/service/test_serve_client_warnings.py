"""``sdb serve`` logs uvicorn's warnings about what a client sent (a request it cannot parse, one its protocol
refuses) at most once a minute a kind: a client in a loop of bad requests wrote one line per request."""
from __future__ import annotations

import logging
import socket

from sdb_cli.admin import ClientErrorWarnings

from .conftest import Server

INVALID = "Invalid HTTP request received."


def _record(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.error", level, __file__, 1, msg, None, None)


def test_a_repeated_client_warning_is_logged_once_an_interval_and_then_counted():
    now = [0.0]
    f = ClientErrorWarnings(interval_s=60, clock=lambda: now[0])
    assert f.filter(_record(INVALID))
    for t in range(1, 11):
        now[0] = t
        assert not f.filter(_record(INVALID))
    assert f.filter(_record("Unsupported upgrade request."))  # another kind has its own interval
    assert f.filter(_record("Started server process [1]"))  # what the server says of itself, always
    assert f.filter(_record(INVALID, logging.ERROR))  # not a client's warning
    now[0] = 70.0
    r = _record(INVALID)
    assert f.filter(r)
    assert r.getMessage() == f"{INVALID} (10 more in the 70 s before this not logged)"
    now[0] = 200.0
    r = _record(INVALID)
    assert f.filter(r) and r.getMessage() == INVALID  # nothing left out since


def test_sdb_serve_logs_a_loop_of_bad_requests_once(tmp_path, bundles):
    server = Server(tmp_path / "data", bundles)
    try:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                answer = s.recv(4096)
                assert answer.startswith(b"HTTP/1.1 400"), answer  # each client is still answered
    finally:
        log = server.stop()
    assert log.count(INVALID) == 1, log[-3000:]
