"""The remote `sdb` commands in scripts: data alone on stdout (`--json` for lists), every message on stderr, a
missing key refused before any request, a retry wait said rather than a silent hang, `distill --remote --version`."""
from __future__ import annotations

import json

from sdb_cli.main import main

from .conftest import MODEL, Reply

KEY = "sdb_0123456789ab_" + "e" * 64
JOB = {"id": "j1", "kind": "wrap", "status": "queued", "progress": 0.0, "step": "queued"}
FILE = {"id": "file-" + "0" * 24, "purpose": "weights", "format": "safetensors", "bytes": 10, "created_at": 0.0,
        "filename": "t.safetensors", "shared": False}


def test_lists_as_json(stub, capsys):
    stub.on("GET", "/v1/jobs", Reply(200, {"jobs": [JOB]}))
    stub.on("GET", "/v1/files", Reply(200, {"files": [FILE]}))
    cli = ["--url", stub.url, "--api-key", KEY]
    assert main(["jobs", "list", "--json", *cli]) == 0
    assert json.loads(capsys.readouterr().out) == [JOB]
    assert main(["files", "list", "--json", *cli]) == 0
    assert json.loads(capsys.readouterr().out) == [FILE]
    assert main(["jobs", "list", *cli]) == 0  # the table stays the default
    assert capsys.readouterr().out.startswith("j1  wrap")


def test_no_key_is_refused_before_any_request(stub, capsys, monkeypatch):
    """Used to send the request and print the HTTP route's `an API key is required: Authorization: Bearer sdb_…`."""
    monkeypatch.delenv("SDB_API_KEY", raising=False)
    for argv in (["jobs", "list"], ["files", "list"], ["jobs", "status", "j1"]):
        assert main([*argv, "--url", stub.url]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sdb: error: ") and "--api-key" in err and "SDB_API_KEY" in err, err
    assert sum(stub.hits.values()) == 0


def test_a_retry_wait_is_said_on_stderr(stub, capsys):
    """`jobs submit` at the key's job cap used to hang for up to 30 s (three Retry-After waits) without a word."""
    stub.on("POST", "/v1/jobs", Reply(429, {"error": {"code": "too_many_jobs", "message": "wait for one to end"}},
                                      {"retry-after": "0"}), Reply(202, JOB))
    assert main(["jobs", "submit", "wrap", "--url", stub.url, "--api-key", KEY]) == 0
    out = capsys.readouterr()
    assert out.out == "j1\n"  # stdout: the id alone
    assert "sdb: POST /v1/jobs: waiting 0.0 s before retry 1 of 3 (429 too_many_jobs: wait for one to end)" in out.err
    assert KEY[17:] not in out.err


def test_distill_remote_version(sdb_server, tmp_path, monkeypatch, capsys):
    """`sdb distill --remote` had no way to pin a version (and a deploy mid-training changed the teacher)."""
    monkeypatch.setenv("SDB_API_KEY", sdb_server.distill_key)
    out = tmp_path / "s.safetensors"
    base = ["distill", "--student", "mlp", "--data", "digits", "--out", str(out)]
    assert main([*base, "--version", "1"]) == 2  # without --remote: refused, not ignored
    assert "--remote" in capsys.readouterr().err
    assert main([*base, "--remote", sdb_server.url, "--model", MODEL, "--version", "999"]) == 2
    err = capsys.readouterr().err
    assert "404" in err and "no version '999'" in err and not out.exists()
