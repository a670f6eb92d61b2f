"""A job's log lines carry the time in UTC, marked ``Z``, whatever the worker host's time zone: every other time SDB
gives is UTC, and a log read beside them in another zone's local time was off by hours."""
from __future__ import annotations

import os
import re
import time
from datetime import UTC, datetime

import pytest

from service.jobs.context import JobContext
from service.jobs.queue import JobQueue
from service.settings import Settings
from service.store import Store


@pytest.fixture
def st_johns():
    """The process in Newfoundland's time zone (UTC-3:30 or -2:30: no whole hour hides a bug), restored after."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/St_Johns"
    time.tzset()
    yield
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()


def test_a_job_log_line_carries_the_utc_time(tmp_path, st_johns):
    assert time.localtime().tm_gmtoff != 0  # the zone took
    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    store = Store(settings.db_url)
    try:
        queue = JobQueue(store)
        job, _ = queue.submit("distill", {}, "owner")
        ctx = JobContext(settings, queue, job, "worker:test", tmp_path / "job")
        before = datetime.now(UTC)
        ctx.log("claimed")
        after = datetime.now(UTC)
        ctx.close()
    finally:
        store.close()
    line = (tmp_path / "job" / "log.txt").read_text(encoding="utf-8")
    m = re.fullmatch(r"(\d\d:\d\d:\d\d)Z claimed\n", line)
    assert m, line
    assert m[1] in {before.strftime("%H:%M:%S"), after.strftime("%H:%M:%S")}, (line, before, after)
