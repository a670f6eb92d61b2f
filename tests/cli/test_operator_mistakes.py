"""An operator's mistakes on a fresh machine: each wrong setting, file or argument stops `sdb` at once
with one line naming the setting (or flag) and what it takes; no traceback, no secret echoed.

Before the fixes: a refused setting was pydantic's four-line report naming the field, not the variable;
a bad database URL, a data dir that is a file, a corrupt SQLite file or `sdb keys list` on a fresh data dir
were SQLAlchemy tracebacks; `sdb serve` on a port in use or with a bad store started uvicorn and failed
in its lifespan (exit 3, a traceback); an SDB_ORT_PROVIDERS typo was served on the CPU without a word at
start; SDB_*_S=inf was accepted; a master key or pepper file of the wrong length said "the master key must
be 32 bytes" (the pepper's too) without naming the file; a named secret file that was missing was created
afresh (orphaning every sealed key or API key); an API key given where a URL or no argument goes was
echoed; `models add --top-k 0` did not say which flag.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdb_cli.main import main
from service.settings import SecretsError, Settings

ROOT = Path(__file__).resolve().parents[2]
SDB = [sys.executable, "-m", "sdb_cli"]
KEY = "sdb_0123456789ab_" + "5e" * 32  # shaped as an API key: its secret must never be printed
MASTER = "ab" * 32


def one_line_error(capsys, code: int, *needles: str) -> str:
    out = capsys.readouterr()
    err = out.err.strip()
    assert code == 2, (code, err)
    assert err.startswith("sdb: error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    assert KEY[17:] not in out.err + out.out and MASTER not in out.err + out.out
    return err


@pytest.mark.parametrize(("env", "value", "needle"), [
    ("SDB_PORT", "abc", "an integer >= 1 and <= 65535"),
    ("SDB_PORT", "0", "an integer >= 1 and <= 65535"),
    ("SDB_MAX_PAYLOAD_BYTES", "-5", "an integer >= 1024"),
    ("SDB_JOBS_BACKEND", "foo", "one of embedded, ray"),
    ("SDB_BATCHING", "maybe", "true or false"),
    ("SDB_JOB_POLL_S", "inf", "a finite number > 0"),
    ("SDB_JOB_STALE_S", "inf", "a finite number > 0"),
    ("SDB_FORWARDED_ALLOW_IPS", "10.0.0.0/8,proxy.local", "'proxy.local' is not an IP address or network"),
])
def test_a_wrong_setting_is_one_line_naming_the_variable(data, monkeypatch, capsys, env, value, needle):
    monkeypatch.setenv(env, value)
    one_line_error(capsys, main(["keys", "list"]), env, needle)


def test_a_wrong_flag_value_names_the_variable_and_the_flag(data, capsys):
    one_line_error(capsys, main(["serve", "--port", "0"]), "SDB_PORT (--port)", ">= 1")
    one_line_error(capsys, main(["models", "add", "x", "--top-k", "0"]), "--top-k:")


@pytest.mark.parametrize(("url", "needle"), [
    ("sqlite:////nonexistent/dir/x.db", "unable to open database file"),
    ("notaurl", "SDB_DATABASE_URL is not a database URL"),
    ("postgresql://sdb:hunter2@127.0.0.1:1/db", "Connection refused"),
    ("mysql://sdb@localhost/db", "no driver"),
])
def test_a_bad_database_url_is_one_line(data, monkeypatch, capsys, url, needle):
    data.mkdir()  # a data dir that is not there is refused first (keys list, models remove)
    monkeypatch.setenv("SDB_DATABASE_URL", url)
    for argv in (["keys", "list"], ["models", "remove", "m"], ["keys", "create", "--scopes", "predict"]):
        err = one_line_error(capsys, main(argv), needle)
        assert "hunter2" not in err


def test_an_empty_data_dir_lists_no_keys_and_no_models(data, capsys):
    data.mkdir()
    assert main(["keys", "list"]) == 0 and main(["models", "list"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_a_data_dir_that_is_a_file_names_sdb_data_dir(data, capsys):
    data.write_text("not a dir")
    for argv in (["keys", "list"], ["models", "list"], ["keys", "create", "--scopes", "predict"]):
        one_line_error(capsys, main(argv), "SDB_DATA_DIR", "a directory this user can write")


def test_a_corrupt_store_is_one_line(data, capsys):
    data.mkdir()
    assert main(["keys", "list"]) == 0
    capsys.readouterr()
    (data / "sdb.sqlite3").write_bytes(b"x" * 4096)
    one_line_error(capsys, main(["keys", "list"]), "file is not a database")


def test_a_store_that_refuses_a_write_is_one_line_without_the_statement(data, monkeypatch, capsys):
    """A store that takes no writes (read-only, a full disk) answered `sdb keys create` with SQLAlchemy's 93-line
    traceback, the INSERT's parameters in it: the new key's secret hash among them."""
    data.mkdir()
    assert main(["keys", "list"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("SDB_DATABASE_URL", f"sqlite:///file:{data / 'sdb.sqlite3'}?mode=ro&uri=true")
    err = one_line_error(capsys, main(["keys", "create", "--scopes", "predict"]), "readonly database",
                         "writable and has room")
    assert "INSERT" not in err and "parameters" not in err


def test_a_store_corrupt_past_its_header_is_one_line_before_anything_runs(data, capsys):
    """A SQLite file whose models table's page is damaged opened fine, then `sdb serve` failed at start with a
    traceback (exit 3): the check reads every page first."""
    import sqlite3

    assert main(["keys", "create", "--scopes", "predict"]) == 0
    path = data / "sdb.sqlite3"
    with sqlite3.connect(path) as c:
        root = c.execute("SELECT rootpage FROM sqlite_master WHERE name = 'models'").fetchone()[0]
        size = c.execute("PRAGMA page_size").fetchone()[0]
    damaged = bytearray(path.read_bytes())
    damaged[(root - 1) * size:(root - 1) * size + 8] = b"\xff" * 8  # its page header
    path.write_bytes(bytes(damaged))
    capsys.readouterr()
    one_line_error(capsys, main(["keys", "list"]), "is corrupt", "'.recover'")


def secret(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "secrets" / "f.key"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def secrets_refused(capsys, env: str, *needles: str) -> None:
    """What `sdb serve` and `sdb worker` check first (Settings.check_secrets), and `keys create` the pepper."""
    with pytest.raises(SecretsError) as e:
        Settings.load().check_secrets()
    assert "\n" not in str(e.value) and env in str(e.value) and MASTER not in str(e.value)
    assert all(n in str(e.value) for n in needles), str(e.value)
    if env == "SDB_PEPPER_FILE":
        one_line_error(capsys, main(["keys", "create", "--scopes", "predict"]), env, *needles)


@pytest.mark.parametrize(("text", "needle"), [("", "is empty"), ("abcd\n", "(4 characters)"),
                                               ("00" * 16, "(32 characters)"), ("zz" * 32, "not what it should hold")])
@pytest.mark.parametrize("env", ["SDB_MASTER_KEY_FILE", "SDB_PEPPER_FILE"])
def test_a_bad_secret_file_names_its_setting(data, tmp_path, monkeypatch, capsys, env, text, needle):
    monkeypatch.setenv(env, str(secret(tmp_path, text)))
    secrets_refused(capsys, env, needle, "64 hex digits")


@pytest.mark.parametrize("env", ["SDB_MASTER_KEY_FILE", "SDB_PEPPER_FILE"])
def test_a_named_secret_file_that_is_missing_is_not_created(data, tmp_path, monkeypatch, capsys, env):
    missing = tmp_path / "mounted" / "secret.key"
    monkeypatch.setenv(env, str(missing))
    secrets_refused(capsys, env, "does not exist")
    assert not missing.exists()
    # the key itself where its file's path goes: refused, never echoed, no file named after it
    monkeypatch.setenv(env, MASTER)
    secrets_refused(capsys, env, "looks like a key")
    assert not (tmp_path / MASTER).exists()


def test_an_api_key_in_the_wrong_place_is_never_echoed(data, capsys):
    with pytest.raises(SystemExit) as e:  # the key as a stray argument: argparse's usage error
        main(["files", "list", KEY])
    assert e.value.code == 2
    out = capsys.readouterr()
    assert "unrecognized arguments: sdb_0123456789ab_…" in out.err and KEY[17:] not in out.err + out.out
    # the key as the URL: its id alone (the SDK scrubs it first), and where it goes instead
    one_line_error(capsys, main(["files", "list", "--url", KEY]), "sdb_0123456789ab_", "give it as api_key")


def sdb(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([*SDB, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=90,
                              check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`sdb {' '.join(argv)}` kept running")


def test_serve_stops_before_it_listens(data, tmp_path):
    """Each as the process it is: exit 2 at once, one line, no uvicorn start."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SDB_")}, "SDB_DATA_DIR": str(data),
           "SDB_WORKERS": "0", "SDB_REGISTER_DEMO": "false"}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases = [({"SDB_PORT": port}, "SDB_PORT", "Address already in use"),
                 ({"SDB_DATABASE_URL": "sqlite:////nonexistent/dir/x.db"}, "SDB_DATABASE_URL", "unable to open"),
                 ({"SDB_ORT_PROVIDERS": "CUDAExecutonProvider"}, "SDB_ORT_PROVIDERS", "CPUExecutionProvider"),
                 ({"SDB_MASTER_KEY_FILE": str(tmp_path / "absent.key")}, "SDB_MASTER_KEY_FILE", "does not exist")]
        for extra, *needles in cases:
            for argv in (["serve", "--port", port], ["worker"]):
                if argv == ["worker"] and "SDB_PORT" in extra:
                    continue
                r = sdb(argv, {**env, **extra})
                assert r.returncode == 2, (argv, extra, r.stderr)
                lines = r.stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("sdb: error: "), r.stderr
                assert all(n in lines[0] for n in needles), lines[0]


def test_keys_create_prints_the_key_alone_on_stdout(data, capsys):
    """`export SDB_API_KEY=$(sdb keys create ...)` used to take three lines of stdout (the key's summary and a notice
    before it): the notices are on stderr now, the key alone on stdout."""
    assert main(["keys", "create", "--scopes", "jobs", "--name", "ci"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdb_") and len(lines[0]) == 81
    assert "created key" in out.err and "shown this once" in out.err and lines[0] not in out.err
    # the first key of a data dir says it made one (a typo in --data-dir would give keys no server knows)
    assert f"in a new data dir, {data}" in out.err
    assert main(["keys", "create", "--scopes", "jobs"]) == 0
    assert "new data dir" not in capsys.readouterr().err


def test_keys_create_revokes_a_key_it_could_not_print(data, tmp_path):
    """`sdb keys create > /dev/full` was a traceback, exit 1, and the key stayed active with no one holding it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDB_")} | {"SDB_DATA_DIR": str(data)}
    with open("/dev/full", "w") as full:
        r = subprocess.run([*SDB, "keys", "create", "--scopes", "jobs"], stdout=full, stderr=subprocess.PIPE,
                           text=True, env=env, cwd=ROOT, timeout=120, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "is revoked: run keys create again" in r.stderr and r.stderr.splitlines()[-1].startswith("sdb: error: ")
    listed = subprocess.run([*SDB, "keys", "list", "--json"], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=120, check=True)
    keys = json.loads(listed.stdout)
    assert len(keys) == 1 and keys[0]["revoked_at"], keys


@pytest.mark.parametrize("secret", ["5e" * 31 + "5", "5e" * 32 + "5", "5e" * 20, "5E" * 32])
def test_a_key_cut_short_or_run_on_is_not_echoed(data, capsys, secret):
    """`sdb keys revoke sdb_<id>_<63 hex>` echoed the 63 digits: only exactly 64 were taken for a key; and once the
    SDK's pattern was used, an upper-cased key was echoed whole (its lower-cased form is the key)."""
    assert main(["keys", "create", "--scopes", "jobs"]) == 0
    capsys.readouterr()
    err = one_line_error(capsys, main(["keys", "revoke", "sdb_0123456789ab_" + secret]), "no API key")
    assert secret[:16] not in err and "sdb_0123456789ab_" in err


@pytest.mark.parametrize("flags", [["--expires", "inf"], ["--expires", "1e300"], ["--expires", "nan"],
                                   ["--quota", str(10**30)], ["--quota", "5", "--quota-window", str(2**63)],
                                   ["--quota-window", "60"], ["--models", ""]])
def test_keys_create_refuses_a_policy_no_store_or_date_holds_in_one_line(data, capsys, flags):
    """An expiry of inf was stored, then the CLI crashed before showing the key (and `keys list` after it, for
    everyone); a quota past 64 bits was a traceback from the store."""
    assert main(["keys", "create", "--scopes", "distill", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdb: error: ") and any(
        w in err[0] for w in ("must be in", "needs a quota", "names no model")), err
    assert not data.exists()  # nothing was stored, nor a data dir made for it


def test_jobs_submit_names_a_params_file_that_is_not_there(data, capsys, monkeypatch):
    """`--params job.json` with a typo in the name used to say "Expecting value: line 1 column 1"."""
    monkeypatch.setenv("SDB_API_KEY", KEY)
    code = main(["jobs", "submit", "distill", "--params", "no-such-job.json", "--url", "http://127.0.0.1:9"])
    one_line_error(capsys, code, "'no-such-job.json': no such file")
    code = main(["jobs", "submit", "distill", "--params", '{"epochs": ', "--url", "http://127.0.0.1:9"])
    one_line_error(capsys, code, "neither a JSON object nor a JSON file")


@pytest.fixture
def teacher_file(tmp_path) -> Path:
    from sdb_core.models import create_model
    from sdb_core.weights import save_weights

    return save_weights(create_model("mlp", num_classes=10, in_shape=(1, 8, 8)), tmp_path / "t.safetensors")


def test_wrap_never_removes_what_its_out_names(data, capsys, tmp_path, teacher_file):
    """--out of an existing folder removed it whole (the owner's files with it), before writing the bundle there;
    --out "" was the working directory; a file, a NotADirectoryError after the training. Refused first now."""
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "important.txt").write_text("keep me")
    (tmp_path / "afile").write_text("keep me too")
    wrap = ["wrap", "--teacher", str(teacher_file), "--arch", "mlp", "--data", "digits", "--epochs", "1"]
    for out, needle in ((str(mine), "holds other files than a bundle's"), ("", "path is empty"),
                        (str(tmp_path / "afile"), "is a file"), (".", "working directory")):
        one_line_error(capsys, main([*wrap, "--out", out]), needle)
    assert (mine / "important.txt").read_text() == "keep me" and (mine / "sub").is_dir()
    assert (tmp_path / "afile").read_text() == "keep me too" and (tmp_path / "t.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no copy left beside them


@pytest.mark.parametrize(("flags", "needle"), [
    (["--max-accuracy-drop", "nan"], "thresholds must be finite"),  # NaN was never missed: any box passed
    (["--min-guessed-key-share", "nan"], "thresholds must be finite"),
    (["--lr", "inf"], "lr must be a finite number > 0"),
    (["--save-teacher", "t2.safetensors"], "for a teacher the wrap trains"),  # ignored in silence
    (["--teacher-epochs", "3"], "for a teacher the wrap trains"),
])
def test_wrap_refuses_settings_that_would_mean_nothing(data, capsys, tmp_path, teacher_file, flags, needle):
    code = main(["wrap", "--teacher", str(teacher_file), "--arch", "mlp", "--data", "digits", "--out",
                 str(tmp_path / "b"), *flags])
    one_line_error(capsys, code, needle)
    assert not (tmp_path / "b").exists() and not (tmp_path / "t2.safetensors").exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (["audit", "--teacher", "{t}", "--arch", "mlp", "--data", "digits", "--out", "{tmp}/a", "--threshold", "nan"],
     "threshold must be a finite number"),
    (["audit", "--teacher", "{t}", "--arch", "mlp", "--data", "digits", "--out", "{tmp}/a", "--threads", "-4"],
     "threads must be >= 0"),
    (["audit", "--teacher", "{t}", "--arch", "mlp", "--data", "digits", "--out", "{t}"], "is a file: name a folder"),
    (["distill", "--student", "mlp", "--data", "digits", "--out", "{tmp}"], "is a folder: name a file"),
    (["distill", "--student", "mlp", "--data", "digits", "--out", "{tmp}/s.safetensors", "--lr", "inf"],
     "lr must be a finite number"),
    (["distill", "--student", "mlp", "--data", "digits", "--out", "{tmp}/s.safetensors", "--authorized"],
     "--authorized goes with --bundle"),  # it trained from labels alone
    (["transfer", "rank", "--source", "mlp:10:{t}", "--target-data", "digits", "--out", "{tmp}/r", "--probe", "-5"],
     "probe must be >= 1"),  # it drew all but five images
    (["transfer", "rank", "--source", "", "--target-data", "digits", "--out", "{tmp}/r"], "names no model"),
    # below a file further up (afile/sub/...): refused only after the work, a traceback
    (["distill", "--student", "mlp", "--data", "digits", "--out", "{t}/sub/s.safetensors"], "is a file, not a folder"),
    (["wrap", "--teacher", "{t}", "--arch", "mlp", "--data", "digits", "--out", "{t}/b.sdb"],
     "is a file, not a folder"),
    (["wrap", "--teacher", "{t}", "--arch", "mlp", "--data", "digits", "--out", "{t}/sub/b"],
     "is a file, not a folder"),
    (["wrap", "--train-teacher", "--arch", "mlp", "--data", "digits", "--out", "{tmp}/b.sdb", "--save-teacher",
      "{t}/sub/t.safetensors"], "is a file, not a folder"),
    (["audit", "--teacher", "{t}", "--arch", "mlp", "--data", "digits", "--out", "{t}/sub"],
     "is a file, not a folder"),
    (["transfer", "rank", "--source", "mlp:10:{t}", "--target-data", "digits", "--out", "{t}/sub"],
     "is a file, not a folder"),
    (["demo", "--data", "digits", "--json", "{t}/sub/s.json"], "is a file, not a folder"),
])
def test_local_commands_refuse_what_they_cannot_do_before_any_work(data, capsys, tmp_path, teacher_file, argv,
                                                                   needle):
    argv = [a.format(t=teacher_file, tmp=tmp_path) for a in argv]
    one_line_error(capsys, main(argv), needle)


def test_an_empty_data_dir_is_refused_not_read_as_the_working_directory(data, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SDB_DATA_DIR", "")
    one_line_error(capsys, main(["keys", "list"]), "SDB_DATA_DIR", "is empty")
    assert not (tmp_path / "sdb.sqlite3").exists()


def test_wrap_takes_a_version_a_deploy_can_serve(data, capsys, tmp_path):
    one_line_error(capsys, main(["wrap", "--train-teacher", "--arch", "cnn", "--data", "digits", "--out",
                                 str(tmp_path / "b"), "--version", "2/../x"]), "version '2/../x'")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("lost", ["pepper.key", "master.key"])
def test_a_secret_lost_from_a_store_in_use_is_refused_not_made_anew(data, capsys, lost):
    """A deleted pepper (or master key) beside a store with keys was made anew without a word: every API key was
    then 401 unknown, every sealed model 503, while `keys list` showed them active."""
    import time

    from service.store import ModelRow, Store

    assert main(["keys", "create", "--scopes", "predict"]) == 0  # the pepper's: a key
    secrets = data.parent / f"{data.name}-secrets"
    settings = Settings(data_dir=data)
    if lost == "master.key":  # the master key's: a served version (sealed under it)
        store = Store(settings.db_url)
        with store.session.begin() as s:
            s.add(ModelRow(name="m", version="1", path=str(data / "bundles" / "m.sdb"), added_at=time.time()))
        store.close()
    (secrets / lost).unlink()
    capsys.readouterr()
    one_line_error(capsys, main(["keys", "list"]), f"{lost} is missing, but the store already holds", "backup")
    assert not (secrets / lost).exists()  # nothing made in its place
    with pytest.raises(SecretsError, match="would lock out"):
        settings.check_secrets()  # what sdb serve runs first


def test_a_worker_needs_no_pepper_but_the_stores_own_master_key(data, capsys):
    """A worker reads no pepper (a job's key is checked by its row): a worker host given the master key alone
    starts. A master key made anew is another one than the store recorded, though it locks nothing yet: refused,
    since another process may be using the first one (two replicas, each with a secrets dir of its own)."""
    assert main(["keys", "create", "--scopes", "predict"]) == 0
    secrets = data.parent / f"{data.name}-secrets"
    master = (secrets / "master.key").read_bytes()
    (secrets / "master.key").unlink()
    capsys.readouterr()
    one_line_error(capsys, main(["keys", "list"]), "master key", "is not the one this store's other processes use")
    (secrets / "master.key").write_bytes(master)
    (secrets / "master.key").chmod(0o600)
    (secrets / "pepper.key").unlink()
    Settings(data_dir=data).check_secrets(pepper=False)
    assert not (secrets / "pepper.key").exists()


@pytest.mark.parametrize("shared", [True, False], ids=["same secrets", "a secrets dir of its own"])
def test_processes_on_one_store_must_share_its_secrets(data, tmp_path, shared):
    """Replicas on one store, each with a secrets dir of its own (a volume per host), each made their own pepper and
    master key, and started healthy: a key made on one was unknown on the other, a model sealed on one unservable
    there. The store records the secrets' fingerprints; a process with others refuses to start."""
    import shutil

    first = Settings(data_dir=data)
    first.prepare_data_dir()
    first.check_secrets()
    assert main(["keys", "list"]) == 0  # the store exists, the fingerprints recorded
    other_dir = tmp_path / "host-b-secrets"
    if shared:
        shutil.copytree(first.secrets_path, other_dir)
    other = Settings(data_dir=data, secrets_dir=other_dir)
    if shared:
        other.check_secrets()
        other.check_secrets(pepper=False)  # a worker
        (other_dir / "pepper.key").write_bytes(b"0" * 64)  # another pepper, left on a worker's host
        (other_dir / "pepper.key").chmod(0o600)
        Settings(data_dir=data, secrets_dir=other_dir).check_secrets(pepper=False)  # a worker never reads it
        with pytest.raises(SecretsError, match="pepper .* is not the one"):
            Settings(data_dir=data, secrets_dir=other_dir).check_secrets()
    else:
        with pytest.raises(SecretsError, match="master key .* is not the one this store's other processes use"):
            other.check_secrets()
        with pytest.raises(SecretsError, match="master key"):
            Settings(data_dir=data, secrets_dir=tmp_path / "host-c-secrets").check_secrets(pepper=False)


def test_output_cut_short_by_its_reader_is_no_traceback(data, tmp_path):
    """`sdb keys list | head -1` (any listing into a reader that stops): a BrokenPipeError traceback, exit 1."""
    import subprocess
    import sys

    from service.auth import create_key
    from service.store import Store

    settings = Settings(data_dir=data)
    settings.prepare_data_dir()
    settings.check_secrets()
    store = Store(settings.db_url)
    try:
        for i in range(1500):  # more than a pipe holds
            create_key(store, settings.pepper, scopes=["predict"], name=f"key {i}")
    finally:
        store.close()
    code = "import sys; from sdb_cli.main import main; sys.exit(main(['keys', 'list']))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(100)
    proc.stdout.close()  # the reader stops, as `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err, err
