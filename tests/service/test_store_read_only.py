"""A SQLite store this process could not write when it opened it (a restore with the wrong owner or mode), then
fixed: writes resume without a restart.

Before the fix each pooled connection opened read-only stayed so, and kept SQLite's map of the -shm file read-only for
every connection of the process: after ``chmod 644`` every write still answered 503 (the standalone worker logged
"attempt to write a readonly database" forever), the 503 said "for a moment", and ``/readyz`` said ready. Now the
first read-only error closes every connection (the idle ones at once, the ones in use when given back), the 503 and
``/readyz`` say the store is read-only, and the next write after the fix passes.

File modes bind a process without CAP_DAC_OVERRIDE (the image runs as uid 10001): the writes run in a child process
that drops it (and CAP_DAC_READ_SEARCH) when the tests run as root; as another user they bind anyway.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from service.auth import create_key
from service.settings import Settings
from service.store import READ_ONLY, Store

ROOT = Path(__file__).resolve().parents[2]

# The child's first lines: the capabilities that let root write a file whatever its mode are dropped (capset(2),
# as `setpriv --inh-caps=-dac_override` does), so the store's file modes apply to it as to uid 10001.
DROP_FILE_OVERRIDE = """
import ctypes
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
libc = ctypes.CDLL(None, use_errno=True)
header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
assert libc.capget(ctypes.byref(header), data) == 0, ctypes.get_errno()
keep = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
for field in ("effective", "permitted", "inheritable"):
    setattr(data[0], field, getattr(data[0], field) & keep)
assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
"""

THROUGH_THE_API = DROP_FILE_OVERRIDE + """
import asyncio, json, os, sys
from pathlib import Path
import httpx
from asgi_lifespan import LifespanManager
from service.app import build_app
from service.settings import Settings

data_dir, admin = Path(sys.argv[1]), sys.argv[2]

async def main():
    app = build_app(Settings(data_dir=data_dir, register_demo=False, workers=0))
    async with LifespanManager(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            def new_key():
                return c.post("/v1/keys", json={"scopes": ["predict"]}, headers={"Authorization": f"Bearer {admin}"})
            seen = {}
            r = await new_key()
            seen["read_only"] = [r.status_code, r.json()]
            r = await c.get("/readyz")
            seen["readyz_read_only"] = [r.status_code, r.json()]
            for p in data_dir.glob("sdb.sqlite3*"):
                p.chmod(0o644)  # the operator's fix
            r = await new_key()
            seen["fixed"] = [r.status_code, r.json()]
            r = await c.get("/readyz")
            seen["readyz_fixed"] = [r.status_code, r.json()]
            print(json.dumps(seen))

asyncio.run(main())
"""

# A connection in use (another request's) across the fix: it holds SQLite's read-only map of the -shm file, which
# every connection of the process shares until the last one that had it closes.
THROUGH_THE_STORE = DROP_FILE_OVERRIDE + """
import json, sys
from pathlib import Path
from sqlalchemy import func, select
from service.store import AuditRow, Store

path = Path(sys.argv[1])
store = Store(f"sqlite:///{path}")
idle = [store.engine.connect() for _ in range(3)]
for conn in idle:
    conn.execute(select(func.count()).select_from(AuditRow))
in_use = idle.pop()
for conn in idle:
    conn.close()

def write():
    try:
        store.record_usage("some-key", "some-model", "predict", "2026-01-01", 1, 1)
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {getattr(e, 'orig', e)}"

seen = {}
seen["read_only"] = write()
for p in path.parent.glob(path.name + "*"):
    p.chmod(0o644)
in_use.close()
seen["fixed"] = write()
seen["again"] = write()
print(json.dumps(seen))
"""


def _run_without_file_override(script: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDB_")}
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _read_only_store(data_dir: Path) -> str:
    """A store with an admin key, its files then made read-only; returns the admin key."""
    settings = Settings(data_dir=data_dir, register_demo=False, workers=0)
    data_dir.mkdir(parents=True)
    _ = settings.master_key
    store = Store(settings.db_url)
    try:
        token, _ = create_key(store, settings.pepper, scopes=("admin",))
        settings.check_fingerprints(store)  # as the first process on a store records them, and its data dir's mark
        settings.check_data_dir(store)
    finally:
        store.close()
    for p in data_dir.glob("sdb.sqlite3*"):
        p.chmod(0o444)
    return token


def test_writes_resume_once_the_store_file_is_writable_again(tmp_path):
    admin = _read_only_store(tmp_path / "data")
    seen = _run_without_file_override(THROUGH_THE_API, str(tmp_path / "data"), admin)

    status, body = seen["read_only"]
    assert status == 503 and body["error"] == {"code": "store_unavailable", "message": READ_ONLY}, seen
    status, body = seen["readyz_read_only"]
    assert status == 503 and body["error"]["code"] == "store_read_only", seen
    assert str(tmp_path) not in json.dumps(seen["read_only"]) + json.dumps(seen["readyz_read_only"])

    status, body = seen["fixed"]
    assert status == 201, seen  # the first write after the fix: no restart
    assert seen["readyz_fixed"][0] == 200, seen


def test_a_connection_in_use_across_the_fix_is_closed_when_given_back(tmp_path):
    _read_only_store(tmp_path / "data")
    seen = _run_without_file_override(THROUGH_THE_STORE, str(tmp_path / "data" / "sdb.sqlite3"))
    assert "readonly" in seen["read_only"], seen
    assert seen["fixed"] == "ok" and seen["again"] == "ok", seen
