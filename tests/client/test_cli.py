"""``sdb distill --remote URL --model NAME``: a student trained locally against the remote keyed path."""
from __future__ import annotations

from sdb_cli.main import main

from .conftest import MODEL


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
