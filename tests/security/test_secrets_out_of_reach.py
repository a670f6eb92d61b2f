"""Hole 8 (secrets out of reach): by default the master key and the pepper live outside the data dir
that jobs read files from, in a private directory; the server refuses to start on secrets others
can read; `make secrets` writes private files for the image's user; an old data dir keeps its key.

Before the fix both secrets were created in the data dir (where a job's ``teacher_weights:
"master.key"`` opened the master key), a world-readable one was used without a word, and
`make secrets` wrote every file 0644. These run ``sdb serve`` and ``sdb worker`` as the
processes they are.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time

import httpx
import numpy as np
import pytest

from sdb_core.protect.seal import load_or_create_master_key
from tests.service.conftest import ROOT, SDB, free_port, run_sdb

BARE = {"SDB_WORKERS": "0", "SDB_REGISTER_DEMO": "false", "SDB_ORT_INTRA_OP_THREADS": "1",
        "SDB_ORT_INTER_OP_THREADS": "1"}


def env_for(data_dir, **extra: str) -> dict[str, str]:
    """The environment of an `sdb` process on ``data_dir`` with no secret named: every default applies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDB_")}
    return {**env, **BARE, "SDB_DATA_DIR": str(data_dir), **extra}


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def refused(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run an `sdb` command that must exit on its own (a server that starts anyway is a failure)."""
    try:
        return subprocess.run([SDB, *argv], env=env, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`sdb {' '.join(argv)}` kept running on secrets others can read")


@pytest.mark.parametrize("case", ["master key 0644", "pepper 0640", "secrets dir 0755", "named file 0604"])
def test_server_and_worker_refuse_to_start_on_secrets_others_can_read(tmp_path, case):
    data, secrets = tmp_path / "data", tmp_path / "data-secrets"
    data.mkdir()
    secrets.mkdir(mode=0o700)
    load_or_create_master_key(secrets / "master.key")
    load_or_create_master_key(secrets / "pepper.key")
    extra = {}
    if case == "master key 0644":
        bad, want = secrets / "master.key", "600"
    elif case == "pepper 0640":
        bad, want = secrets / "pepper.key", "600"
    elif case == "secrets dir 0755":
        bad, want = secrets, "700"
    else:  # SDB_MASTER_KEY_FILE naming a file elsewhere (a mounted secret)
        bad, want = tmp_path / "elsewhere" / "master.key", "600"
        load_or_create_master_key(bad)
        extra["SDB_MASTER_KEY_FILE"] = str(bad)
    os.chmod(bad, int(case.split()[-1], 8))
    env = env_for(data, SDB_PORT=str(free_port()), **extra)
    for argv in (["serve", "--host", "127.0.0.1"], ["worker"]):
        r = refused(argv, env)
        assert r.returncode != 0, f"sdb {argv[0]} started on {case}"
        assert str(bad) in r.stderr and f"chmod {want}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr  # one clear message
    # and once the mode is right, it starts
    os.chmod(bad, 0o700 if bad.is_dir() else 0o600)
    r = run_sdb("keys", "create", "--scopes", "predict", env=env)
    assert r.returncode == 0, r.stderr


def serve(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`sdb serve` on ``env`` (a free port), once /readyz answers."""
    port = free_port()
    proc = subprocess.Popen([SDB, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sdb serve exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("sdb serve did not become ready in 60 s")
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.terminate()
    return proc.communicate(timeout=30)[1]


def test_by_default_the_secrets_are_not_under_the_data_dir(tmp_path):
    data = tmp_path / "data"
    env = env_for(data)
    proc, url = serve(env)
    try:
        # A key made on the data dir by the CLI, with the same default pepper, works on the server.
        r = run_sdb("keys", "create", "--scopes", "admin", env=env)
        assert r.returncode == 0, r.stderr
        assert httpx.get(url + "/v1/keys", headers={"Authorization": f"Bearer {r.stdout.splitlines()[-1]}"},
                         timeout=10).status_code == 200
    finally:
        stop(proc)
    names = {p.name for p in data.rglob("*")}
    assert not names & {"master.key", "pepper.key"}, f"secrets in the data dir: {sorted(names)}"
    secrets = tmp_path / "data-secrets"
    assert not secrets.resolve().is_relative_to(data.resolve())
    assert mode(secrets) == 0o700
    assert {p.name: mode(p) for p in secrets.iterdir()} == {"master.key": 0o600, "pepper.key": 0o600}


def test_a_data_dir_holding_its_master_key_keeps_serving_its_boxes(tmp_path, bundles):
    """The upgrade: a data dir from before the secrets dir, with master.key and pepper.key inside,
    keeps its key (the boxes sealed under it open) and its API keys, with a warning to move them."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(bundles.master_key_file, data / "master.key")  # as an old server left them
    os.chmod(data / "master.key", 0o600)
    load_or_create_master_key(data / "pepper.key")
    env = env_for(data)
    r = run_sdb("keys", "create", "--scopes", "admin,distill", env=env)
    assert r.returncode == 0, r.stderr
    token = r.stdout.splitlines()[-1]
    assert run_sdb("models", "add", str(bundles.a), env=env).returncode == 0
    proc, url = serve(env)
    try:
        x = np.zeros((1, 1, 8, 8)).tolist()
        r = httpx.post(url + "/v1/models/digits-a/distill", json={"inputs": x},
                       headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200, r.text  # the old pepper checks the old key; the old master key opens the box
    finally:
        err = stop(proc)
    assert re.search(r"master\.key is inside the data dir .* move it", err), err
    assert (data / "master.key").is_file() and not (tmp_path / "data-secrets" / "master.key").exists()  # not moved


def test_make_secrets_writes_private_files_for_the_image_user(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    root = os.geteuid() == 0
    # Not root: `sudo chown` is replaced by `true` (nothing to ask for a password); as root it runs.
    args = ["make", "-s", "secrets"] + ([] if root else ["SUDO=true"])
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    made = tmp_path / "secrets"
    assert mode(made) == 0o700
    modes = {p.name: mode(p) for p in made.iterdir()}
    assert modes == {"master.key": 0o600, "pepper.key": 0o600, "ray_token": 0o600, "db_password": 0o640}, modes
    image_uid = int(re.search(r"^USER (\d+):", (ROOT / "Dockerfile").read_text(), re.MULTILINE).group(1))
    assert re.search(rf"^IMAGE_UID\s*:=\s*{image_uid}$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    if root:
        assert {p.stat().st_uid for p in made.iterdir()} == {image_uid}
