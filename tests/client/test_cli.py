"""``sdb distill --remote URL --model NAME``: a student trained locally against the remote keyed path."""
from __future__ import annotations

from sdb_cli.main import main

from .conftest import MODEL, Reply

KEY = "sdb_0123456789ab_" + "e" * 64


def args(url: str, out, *extra: str) -> list[str]:
    return ["distill", "--remote", url, "--model", MODEL, "--student", "mlp", "--data", "digits",
            "--transfer", "200", "--epochs", "1", "--out", str(out), *extra]


def test_distill_remote_trains_and_saves(sdb_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDB_API_KEY", sdb_server.distill_key)
    out = tmp_path / "student.safetensors"
    assert main(args(sdb_server.url, out)) == 0
    text = capsys.readouterr().out
    assert out.is_file() and f"remote model {MODEL}" in text and "test accuracy" in text
    assert sdb_server.distill_key not in text


def test_distill_remote_refusals(sdb_server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SDB_API_KEY", raising=False)
    out = tmp_path / "s.safetensors"
    assert main(args(sdb_server.url, out)) == 2
    assert "SDB_API_KEY" in capsys.readouterr().err
    assert main(args(sdb_server.url, out, "--api-key", "not-a-key")) == 2
    err = capsys.readouterr().err
    assert "not an SDB API key" in err and "not-a-key" not in err
    assert main(args(sdb_server.url, out, "--api-key", sdb_server.predict_key)) == 2  # no distill scope
    err = capsys.readouterr().err
    assert "403" in err and sdb_server.predict_key not in err
    monkeypatch.setenv("SDB_API_KEY", sdb_server.distill_key)
    assert main(["distill", "--remote", sdb_server.url, "--model", "no-such", "--student", "mlp", "--data", "digits",
                 "--out", str(out)]) == 2
    assert "404" in capsys.readouterr().err
    assert not out.exists()


def test_distill_model_without_remote_is_refused_not_ignored(sdb_server, tmp_path, capsys):
    """`--model`/`--api-key` without `--remote` used to be ignored: the student learnt from labels alone."""
    out = tmp_path / "s.safetensors"
    base = ["distill", "--model", MODEL, "--student", "mlp", "--data", "digits", "--out", str(out)]
    assert main(base) == 2
    assert "--remote" in capsys.readouterr().err
    assert main([*base[:1], *base[3:], "--api-key", sdb_server.distill_key]) == 2
    err = capsys.readouterr().err
    assert "--remote" in err and sdb_server.distill_key not in err
    assert not out.exists()


def test_jobs_follow_says_how_a_job_ended(stub, capsys):
    """`jobs logs --follow` of a job cancelled before it started used to exit 1 with nothing printed."""
    stub.on("GET", "/v1/jobs/j1/logs", Reply(200, {"text": "", "next_offset": 0}))
    stub.on("GET", "/v1/jobs/j1", Reply(200, {"id": "j1", "status": "cancelled", "message": "cancelled before it started",
                                              "error": None}))
    cli = ["--url", stub.url, "--api-key", KEY]
    assert main(["jobs", "logs", "j1", "--follow", *cli]) == 1
    assert "job j1 cancelled: cancelled before it started" in capsys.readouterr().err
    stub.on("GET", "/v1/jobs/j1", Reply(200, {"id": "j1", "status": "failed", "message": "failed", "error": "out of memory"}))
    assert main(["jobs", "logs", "j1", "-f", *cli]) == 1
    assert "job j1 failed: out of memory" in capsys.readouterr().err
    stub.on("GET", "/v1/jobs/j1", Reply(200, {"id": "j1", "status": "succeeded", "message": "done"}))
    assert main(["jobs", "logs", "j1", "-f", *cli]) == 0
    assert capsys.readouterr().err == ""


def test_remote_commands_report_a_page_that_is_not_the_service(stub, capsys):
    """A 200 HTML page (not an SDB server at --url) used to print `Expecting value: line 1 column 1 (char 0)`."""
    stub.on("GET", "/v1/jobs/j1", Reply(200, b"<html>portal</html>", {"content-type": "text/html"}))
    assert main(["jobs", "status", "j1", "--url", stub.url, "--api-key", KEY]) == 2
    err = capsys.readouterr().err
    assert "is not JSON (text/html" in err and "SDB server" in err and "Traceback" not in err
