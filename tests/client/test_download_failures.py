"""`sdb jobs download` and ``Jobs.download`` when the download cannot be whole: several artifacts and an --out that
is no folder (each overwrote the last, exit 0), a body cut short or stalled (a raw httpx traceback), a target that
is a folder, a SIGTERM mid-download (a CI cancel: the .part was left). Never a half-written file left behind."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sdb_client import APIConnectionError, APITimeoutError, AsyncClient, Client

from sdb_cli.main import main
from tests.cli.test_operator_mistakes import one_line_error as one_line

from .conftest import Reply

KEY = "sdb_0123456789ab_" + "f" * 64
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = {"artifacts": [{"name": "bundle.sdb", "size": 4}, {"name": "report.json", "size": 2}]}


def two_artifacts(stub) -> None:
    stub.on("GET", "/v1/jobs/j1/artifacts", Reply(200, ARTIFACTS))
    stub.on("GET", "/v1/jobs/j1/artifacts/bundle.sdb", Reply(200, b"\x00\x01\x02\x03"))
    stub.on("GET", "/v1/jobs/j1/artifacts/report.json", Reply(200, b"{}"))


def test_several_artifacts_need_a_folder(stub, tmp_path, capsys, monkeypatch):
    """bundle.sdb was written to NAME, then overwritten by report.json, exit 0."""
    monkeypatch.chdir(tmp_path)
    two_artifacts(stub)
    cli = ["--url", stub.url, "--api-key", KEY]
    (tmp_path / "afile").write_text("mine")
    for out in ("artifacts", "afile"):
        one_line(capsys, main(["jobs", "download", "j1", *cli, "--out", out]), "folder", f"{out}/")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "mine"
    assert stub.hits[("GET", "/v1/jobs/j1/artifacts/bundle.sdb")] == 0
    assert main(["jobs", "download", "j1", *cli, "--out", "artifacts/"]) == 0  # NAME/: the folder, made
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["bundle.sdb", "report.json"]
    (tmp_path / "got").mkdir()
    assert main(["jobs", "download", "j1", *cli, "--out", "got"]) == 0  # an existing folder, no slash needed
    assert (tmp_path / "got" / "bundle.sdb").read_bytes() == b"\x00\x01\x02\x03"
    assert main(["jobs", "download", "j1", "report.json", *cli, "--out", "one.json"]) == 0  # one: a file
    assert (tmp_path / "one.json").read_text() == "{}"


def cut_short(stub) -> None:  # the server (or a proxy) ends the body at 4 bytes of the 100000 it announced
    stub.on("GET", "/v1/jobs/j1/artifacts/a.bin", Reply(200, b"\x00\x01\x02\x03", {"content-length": "100000"}))


def test_a_body_cut_short_is_the_sdks_connection_error(stub, tmp_path):
    cut_short(stub)
    with Client(stub.url, KEY, max_retries=0) as c, pytest.raises(APIConnectionError, match=stub.url):
        c.jobs.download("j1", "a.bin", tmp_path)
    assert not list(tmp_path.iterdir())  # no .part


@pytest.mark.anyio
async def test_a_body_cut_short_is_the_sdks_connection_error_async(stub, tmp_path):
    cut_short(stub)
    async with AsyncClient(stub.url, KEY, max_retries=0) as c:
        with pytest.raises(APIConnectionError, match=stub.url):
            await c.jobs.download("j1", "a.bin", tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_body_cut_short_is_one_line_in_the_cli(stub, tmp_path, capsys):
    cut_short(stub)
    one_line(capsys, main(["jobs", "download", "j1", "a.bin", "--url", stub.url, "--api-key", KEY, "--out",
                           f"{tmp_path}/"]), stub.url)
    assert not list(tmp_path.iterdir())


@pytest.fixture
def stalling_url():
    """A server that sends an artifact's headers and its first 1000 bytes of 100000, then nothing more."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 100000\r\n"
                         b"\r\n" + b"x" * 1000)

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for conn in held:
        conn.close()


def test_a_stalled_body_is_the_sdks_timeout(stalling_url, tmp_path):
    with Client(stalling_url, KEY, timeout=0.5, max_retries=0) as c, pytest.raises(APITimeoutError, match="no answer"):
        c.jobs.download("j1", "a.bin", tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_target_that_is_a_folder_leaves_no_part(stub, tmp_path):
    """An IsADirectoryError traceback, and the .part beside it left."""
    two_artifacts(stub)
    (tmp_path / "report.json").mkdir()
    with Client(stub.url, KEY) as c, pytest.raises(OSError):
        c.jobs.download("j1", "report.json", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_target_that_is_a_folder_is_one_line_in_the_cli(stub, tmp_path, capsys):
    two_artifacts(stub)
    (tmp_path / "report.json").mkdir()
    one_line(capsys, main(["jobs", "download", "j1", "report.json", "--url", stub.url, "--api-key", KEY, "--out",
                           str(tmp_path)]), "report.json")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_sigterm_mid_download_cleans_up_and_exits_143(stalling_url, tmp_path, signum, code):
    """A CI cancel or Kubernetes' SIGTERM killed the CLI at once, its download's .part left behind."""
    script = (f"import sys\nfrom sdb_cli.main import main\nsys.exit(main(['jobs', 'download', 'j1', 'a.bin', "
              f"'--url', {stalling_url!r}, '--api-key', {KEY!r}, '--out', {str(tmp_path) + '/'!r}]))")
    p = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("*.part")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob("*.part")), p.communicate(timeout=5)
    p.send_signal(signum)
    _, err = p.communicate(timeout=30)
    assert p.returncode == code, err[-2000:]
    assert err.startswith("sdb: ") and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())
