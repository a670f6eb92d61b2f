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


def test_distill_remote_answers_in_the_data_sets_class_order(small_server, colours, tmp_path, monkeypatch, capsys):
    """A data set listing the model's classes in another order (blue, green, red for red, green, blue) trained a
    student at chance through --remote, where --bundle reorders the teacher's classes: --remote now does too. The
    teacher's batches follow --teacher-batch-size (and the server's 100 samples a request)."""
    monkeypatch.setenv("SDB_API_KEY", small_server.distill_key)
    for data in (colours.data, colours.reordered):
        out = tmp_path / f"{data.stem}.safetensors"
        assert main(["distill", "--remote", small_server.url, "--model", "colour", "--student", "mlp", "--data",
                     f"npz:{data}", "--transfer", "300", "--epochs", "5", "--teacher-batch-size", "64",
                     "--out", str(out)]) == 0
        accuracy = float(capsys.readouterr().out.split("test accuracy ")[1].split("%")[0])
        assert accuracy > 90, (data.name, accuracy)


def test_distill_remote_refuses_a_model_of_other_classes_before_any_charge(small_server, colours, tmp_path,
                                                                            monkeypatch, capsys):
    """A 10-class model on a 3-class set charged the key for the whole transfer set, then died with torch's
    `size of tensor a (10) must match ... (3)`; other class names or another input shape went as far. Each is now
    refused, exit 2, before any sample is asked for."""
    token = small_server.key(("distill",))
    monkeypatch.setenv("SDB_API_KEY", token)
    out = tmp_path / "s.safetensors"
    cases = ((MODEL, colours.digits_shaped, "answers 10 classes"), ("colour", colours.other_names, "'cyan'"),
             ("colour", "digits", "takes inputs [3, 8, 8]"))
    for model, data, says in cases:
        data = data if data == "digits" else f"npz:{data}"
        assert main(["distill", "--remote", small_server.url, "--model", model, "--student", "mlp", "--data", data,
                     "--transfer", "200", "--epochs", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert small_server.used(token) == 0 and not out.exists()
    assert main(["distill", "--teacher-batch-size", "8", "--student", "mlp", "--data", "digits", "--out",
                 str(out)]) == 2  # without --remote it would be ignored
    assert "--remote" in capsys.readouterr().err
