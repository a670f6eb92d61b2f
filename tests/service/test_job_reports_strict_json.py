"""A job's report is strict JSON: json.dumps wrote NaN and Infinity bare (an unsampled branching candidate's
search loss, AFK's AP of a class without a positive), and JSON.parse, jq and the console's job page refused the
whole report. Undefined numbers are null there, and in the job's stored metrics and result."""
from __future__ import annotations

import json
import math

import pytest

from service.auth import create_key
from service.jobs.kinds import KINDS, JobParams, Kind
from service.jobs.queue import JobQueue
from service.jobs.runner import execute, job_dir
from service.settings import Settings
from service.store import Store


def _strict(text: str):
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def settings(tmp_path) -> Settings:
    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    return settings


def test_undefined_numbers_of_a_report_are_written_as_null(settings, monkeypatch):
    def undefined(ctx, params) -> dict:
        return {"summary": "done", "metrics": {"map": math.nan, "top1": 0.5},
                "result": {"per_class_ap": [0.75, math.nan], "loss": -math.inf},
                "branching": {"search_losses": {"seg": {"dec1": 0.25, "enc3": math.inf}}}}

    monkeypatch.setitem(KINDS._items, "undefined", Kind("undefined", JobParams, undefined))
    store = Store(settings.db_url)
    try:
        _, api_key = create_key(store, settings.pepper, scopes=["jobs"])
        queue = JobQueue(store)
        job = queue.claim("w", job_id=queue.submit("undefined", {}, api_key.id)[0].id)
        assert execute(settings, queue, job, "w") == "succeeded"
        artifacts = next(job_dir(settings, job.id).glob("artifacts*"))
        report = _strict((artifacts / "report.json").read_text())
        assert report["metrics"] == {"map": None, "top1": 0.5}
        assert report["result"] == {"per_class_ap": [0.75, None], "loss": None}
        assert report["branching"]["search_losses"] == {"seg": {"dec1": 0.25, "enc3": None}}
        row = queue.get(job.id)
        assert _strict(row.metrics) == {"map": None, "top1": 0.5}
        assert _strict(row.result) == {"per_class_ap": [0.75, None], "loss": None}
    finally:
        store.close()


def test_the_report_writer_writes_strict_json():
    """report.json, check.json and audit.json go through one writer (sdb_core.reports): a refused wrap's check.json
    and an audit's figures were written with json.dumps, NaN and Infinity bare."""
    from sdb_core.reports import report_json

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    text = report_json({"ap": {"3": float("nan")}, "losses": [float("inf"), -float("inf"), 1.5], "n": 2})
    assert json.loads(text, parse_constant=refuse) == {"ap": {"3": None}, "losses": [None, None, 1.5], "n": 2}
