"""`sdb keys list` says what the API and the console say of each key.

Before: a windowed quota showed the samples stored for the last window charged (3/3 after the window had rolled
over, while `/v1/keys/me` and the console said 0), without its window; no name (the console shows names, and
`--name` is "a note to tell keys apart"); an expiry in UTC without saying so."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from sdb_cli.main import main
from service.routes.account import quota_used
from service.settings import Settings
from service.store import Store

WINDOW = 10**9  # about 31.7 years: the test never runs across one of its ends


def create(capsys, *flags: str) -> str:
    assert main(["keys", "create", *flags]) == 0
    return capsys.readouterr().out.strip().split("_")[1]


def charge(data: Path, key_id: str, samples: int, at: float) -> None:
    store = Store(Settings(data_dir=data).db_url)
    try:
        assert store.charge(key_id, samples, at) is not None
    finally:
        store.close()


def listed(capsys) -> dict[str, str]:
    assert main(["keys", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[0]: line for line in lines[1:]}


def test_keys_list_counts_the_current_window_and_names_each_key(data, capsys):
    windowed = create(capsys, "--scopes", "distill", "--quota", "3", "--quota-window", str(WINDOW), "--name", "lab-7")
    lifetime = create(capsys, "--scopes", "distill", "--quota", "5", "--expires", "1", "--name", "ci runner")
    charge(data, windowed, 3, time.time() - WINDOW)  # the whole quota, in the window before this one
    charge(data, lifetime, 2, time.time())

    rows = listed(capsys)
    assert "0/3 per 1000000000 s" in rows[windowed] and rows[windowed].endswith("  lab-7"), rows[windowed]
    assert "2/5" in rows[lifetime] and "per" not in rows[lifetime] and rows[lifetime].endswith("  ci runner")
    assert " UTC " in rows[lifetime]  # the expiry says its zone

    charge(data, windowed, 2, time.time())  # this window's
    assert "2/3 per 1000000000 s" in listed(capsys)[windowed]


def test_keys_list_json_is_the_api_record_with_the_quota_used_the_api_counts(data, capsys):
    key_id = create(capsys, "--scopes", "distill", "--quota", "3", "--quota-window", str(WINDOW), "--name", "lab-7")
    charge(data, key_id, 3, time.time() - WINDOW)
    assert main(["keys", "list", "--json"]) == 0
    (key,) = json.loads(capsys.readouterr().out)
    store = Store(Settings(data_dir=data).db_url)
    try:
        row = store.get_key(key_id)
    finally:
        store.close()
    assert row.used == 3 and quota_used(row, time.time()) == 0  # what /v1/keys/me answers
    assert key["quota_used"] == 0 and key["name"] == "lab-7" and key["quota_window_s"] == WINDOW
    assert set(key) == {"id", "name", "scopes", "models", "quota", "quota_window_s", "created_at", "expires_at",
                        "revoked_at", "quota_used"}


@pytest.mark.parametrize("argv", [["keys", "list"], ["keys", "list", "--json"], ["keys", "revoke", "0123456789ab"],
                                  ["models", "list"], ["models", "list", "--json"], ["models", "remove", "m"]])
def test_a_command_on_what_a_data_dir_holds_refuses_one_that_is_not_there(data, tmp_path, monkeypatch, capsys,
                                                                         argv):
    """A typo in --data-dir made a new data dir, a fresh store and fresh secrets, and listed nothing (exit 0)."""
    typo = tmp_path / "dta"
    assert main([*argv, "--data-dir", str(typo)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    err = out.err.strip()
    assert err.startswith("sdb: error: ") and "\n" not in err, err
    assert f"--data-dir: {typo}) does not exist" in err and "SDB_DATA_DIR" in err, err
    assert not typo.exists() and not (tmp_path / "dta-secrets").exists()
    # SDB_DATA_DIR, relative: named as given and as resolved
    monkeypatch.setenv("SDB_DATA_DIR", "dta")
    assert main(argv) == 2
    assert f"--data-dir: dta, that is {typo}) does not exist" in capsys.readouterr().err
    assert not typo.exists() and not (tmp_path / "dta-secrets").exists()


def test_a_store_elsewhere_is_read_whatever_the_data_dir(data, tmp_path, monkeypatch, capsys):
    """With SDB_DATABASE_URL (a PostgreSQL store, an admin box without the shared volume) the store holds the keys
    whether or not the data dir is there: a missing one was refused as holding none."""
    monkeypatch.setenv("SDB_DATABASE_URL", f"sqlite:///{tmp_path / 'shared.sqlite3'}")
    monkeypatch.setenv("SDB_SECRETS_DIR", str(tmp_path / "secrets"))
    assert main(["keys", "create", "--scopes", "predict", "--name", "kept"]) == 0
    capsys.readouterr()
    shutil.rmtree(data)
    assert main(["keys", "list"]) == 0
    assert "kept" in capsys.readouterr().out


def test_keys_create_still_makes_a_data_dir_and_says_so(data, capsys):
    assert main(["keys", "create", "--scopes", "predict"]) == 0
    assert f"in a new data dir, {data}" in capsys.readouterr().err
    assert main(["keys", "list"]) == 0


@pytest.mark.parametrize(("flags", "needle"), [
    (["--scopes", "predict", "--quota", "5"], "a quota meters the samples served on the keyed path (distill)"),
    (["--scopes", "jobs,deploy", "--quota", "5", "--quota-window", "60"], "add the distill scope"),
    (["--scopes", "distill", "--models", ","], "models names no model"),
    (["--scopes", "distill", "--models", " "], "models names no model"),
])
def test_keys_create_refuses_a_policy_that_would_do_nothing(data, capsys, flags, needle):
    assert main(["keys", "create", *flags]) == 2
    out = capsys.readouterr()
    assert out.out == "" and needle in out.err and "\n" not in out.err.strip(), out.err
    assert not data.exists()  # refused before a data dir is made for it


def test_a_quota_on_an_admin_key_meters_its_distill_samples(data, capsys):
    assert main(["keys", "create", "--scopes", "admin", "--quota", "5"]) == 0  # admin may distill


def test_models_list_orders_versions_as_numbers(data, capsys):
    """A model wrapped nightly listed 1 10 11 2 3 ... 9: the store's text order. The API lists 1 ... 11."""
    create(capsys, "--scopes", "predict")  # the data dir, its secrets and store, as an operator's first command
    store = Store(Settings(data_dir=data).db_url)
    try:
        for v in range(1, 12):
            store.add_version("nightly", str(data / f"v{v}.sdb"), deployer=None, version=str(v))
    finally:
        store.close()
    assert main(["models", "list", "--json"]) == 0
    assert [m["version"] for m in json.loads(capsys.readouterr().out)] == [str(v) for v in range(1, 12)]
    assert main(["models", "list"]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]] == [str(v) for v in range(1, 12)]


def test_a_name_the_terminals_encoding_lacks_is_escaped_not_an_error(data):
    """Under a legacy locale (tr_TR.ISO-8859-9, a Windows console), printing a tenant's non-Latin name was
    'charmap codec can't encode' and exit 2: the rest of the list was lost."""
    import os
    import subprocess

    from tests.service.conftest import SDB

    env = {**os.environ, "PYTHONIOENCODING": "ascii"}  # strict: any name outside it raised
    made = subprocess.run([SDB, "keys", "create", "--scopes", "predict", "--name", "日本 ışık"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    shown = subprocess.run([SDB, "keys", "list"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "\\u65e5\\u672c \\u0131\\u015f\\u0131k" in shown.stdout, shown.stdout
