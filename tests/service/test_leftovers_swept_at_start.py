"""What a process killed midway leaves in the data dir is set aside when a server starts.

An upload killed between moving its folder into ``files/<id>/`` and recording its row, or a file's or a job's delete
killed between removing the row and the folder, left a folder no row names, for good: the start swept only bundle
copies and ``files/.staging``. Now such folders, once an hour old (no request of another process is still on them),
go to ``files/.orphaned/`` and ``jobs/.orphaned/``, logged, by the rule bundle copies have
(:func:`service.copies.sweep_orphans`): nothing moves when the store may not be this data dir's.
"""
from __future__ import annotations

import io
import logging
import os
import secrets
import time
import uuid

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager

from service.app import build_app
from service.auth import create_key
from service.copies import FILES, ORPHAN_AGE_S, sweep_folders
from service.files import FILE_ID_RE
from service.jobs.queue import JobQueue
from service.settings import Settings


def _aged(path, seconds: float):
    old = time.time() - seconds
    os.utime(path, (old, old))
    return path


def _folder(root, name: str, age_s: float):
    (root / name).mkdir(parents=True)
    (root / name / "upload").write_bytes(b"bytes no row names")
    return _aged(root / name, age_s)


@pytest.fixture
def settings(own_settings) -> Settings:
    return own_settings


@pytest.mark.anyio
async def test_upload_and_job_folders_no_row_names_are_set_aside_at_start(settings, caplog):
    app = build_app(settings)
    async with LifespanManager(app):
        admin, _ = create_key(app.state.store, settings.pepper, scopes=("admin",))
        data = io.BytesIO()
        np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32), y=np.arange(4))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/files", files={"file": ("d.npz", data.getvalue())}, data={"purpose": "dataset"},
                             headers={"Authorization": f"Bearer {admin}"})
            assert r.status_code == 201, r.text
        kept = r.json()["id"]
        job = JobQueue(app.state.store).submit("wrap", {}, "owner")[0]
    hour = ORPHAN_AGE_S + 60
    _aged(settings.files_dir / kept, hour)
    orphan = _folder(settings.files_dir, "file-" + secrets.token_hex(12), hour)  # an upload killed before its row
    young = _folder(settings.files_dir, "file-" + secrets.token_hex(12), 60)  # another process's upload, maybe
    job_folder = _folder(settings.jobs_dir, job.id, hour)
    deleted_job = _folder(settings.jobs_dir, uuid.uuid4().hex, hour)  # a job delete killed after its row went

    with caplog.at_level(logging.WARNING, logger="sdb.service"):
        async with LifespanManager(build_app(settings)):
            pass
    assert not orphan.exists() and not deleted_job.exists()
    assert (settings.files_dir / ".orphaned" / orphan.name / "upload").read_bytes() == b"bytes no row names"
    assert (settings.jobs_dir / ".orphaned" / deleted_job.name).is_dir()
    assert (settings.files_dir / kept).is_dir() and young.is_dir() and job_folder.is_dir()
    assert "moved 1 uploaded file folders that no file names" in caplog.text and orphan.name in caplog.text
    assert "moved 1 job folders that no job names" in caplog.text and deleted_job.name in caplog.text


def test_a_store_that_may_not_be_this_data_dirs_sets_no_folder_aside(tmp_path, caplog):
    """A store that names no file (a new one over an existing data dir), or names one missing here (yesterday's
    store), sets nothing aside: the folders may be another store's files."""
    root = tmp_path / "files"
    unnamed = _folder(root, "file-" + secrets.token_hex(12), ORPHAN_AGE_S + 60)
    with caplog.at_level(logging.WARNING, logger="sdb.service"):
        assert sweep_folders(root, FILE_ID_RE, set(), set(), FILES) == []
        gone = "file-" + secrets.token_hex(12)
        assert sweep_folders(root, FILE_ID_RE, {gone}, {gone}, FILES) == []
    assert unnamed.is_dir()
    assert "the store holds no file" in caplog.text and f"the store's file {gone} is missing here" in caplog.text
