"""The console's lists past one page, and a version's leak audit behind 200 newer ones, in a real Chromium.

The rows are written to the console server's store as submissions and uploads leave them, dated after everything
else the session made (so they are the newest, whatever ran before); running them as jobs would take minutes each.
Before, the jobs, files and keys pages showed their first page and nothing said more existed, and a model's page
said "No leak audit of this version yet" when 200 newer audits hid its audit."""
from __future__ import annotations

import json
import time
import uuid

from selenium.webdriver.common.by import By

from service.auth import create_key, parse_token
from service.jobs.runner import job_dir
from service.settings import Settings
from service.store import FileRow, JobRow, Store

from .test_console import css, shot, sign_in, visible, wait

LATER = time.time() + 86400  # newer than any row the session's other tests made


def console_store(console) -> tuple[Settings, Store]:
    settings = Settings(data_dir=console.server.log.parent / "data")  # the console fixture's data dir
    return settings, Store(settings.db_url)


def audit_row(owner: str, model: str, at: float, advantage: float) -> JobRow:
    return JobRow(id=uuid.uuid4().hex, kind="audit", owner=owner, backend="embedded", status="succeeded",
                  params=json.dumps({"data": "digits", "target": {"model": model, "version": "1"}}, sort_keys=True),
                  cancel_requested=False, progress=1.0, step="done", message="", attempts=1, created_at=at,
                  metrics=json.dumps({"max_advantage": advantage}),
                  result=json.dumps({"verdict": "protected", "policy": "probs", "worst_attack": "kd_t4"}))


def rows(driver, selector: str) -> list:
    return driver.find_elements(By.CSS_SELECTOR, selector)


def show_older(driver, what: str, selector: str, until) -> None:
    """Click "Show older <what>" until ``until(rows)`` holds (the button goes once the last page is shown)."""
    for _ in range(5):
        if until(rows(driver, selector)):
            return
        before = len(rows(driver, selector))
        button = css(driver, "p.more button")
        assert button.is_displayed() and button.text == f"Show older {what}"
        button.click()
        wait(driver, lambda d, n=before: len(rows(d, selector)) > n, what=f"older {what}")
    assert until(rows(driver, selector))


def test_a_versions_audit_behind_200_newer_ones_and_jobs_past_the_first_page(console, driver):
    settings, store = console_store(console)
    owner = parse_token(console.keys["jobs"])[0]
    mine = audit_row(owner, "digits-a", LATER, -7.25)
    newer = [audit_row(owner, f"m{i:03d}", LATER + 1 + i / 1000, 0.0) for i in range(200)]
    try:
        with store.session.begin() as s:
            s.add_all([mine, *newer])
    finally:
        store.close()
    report = job_dir(settings, mine.id) / "artifacts" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"audit": {"reference": "labels", "config": {"threshold": 1.0},
                                            "attacks": {"kd_t4": {"advantage": -7.25, "label_only": False}}}}))

    sign_in(driver, console, "jobs", "#/models/digits-a")
    sec = visible(driver, "[aria-labelledby=audit-h]")
    wait(driver, lambda d: sec.find_elements(By.CSS_SELECTOR, "[data-verdict]"), what="the version's audit")
    assert sec.find_element(By.CSS_SELECTOR, f"a[href='#/jobs/{mine.id}']") and "-7.25 points" in sec.text
    shot(driver, console, "30-audit-behind-200")

    driver.get(console.url + "/#/jobs")
    wait(driver, lambda d: len(rows(d, "#jobs-table tbody tr")) == 50, what="the first 50 jobs")
    show_older(driver, "jobs", "#jobs-table tbody tr", lambda r: any(t.get_attribute("data-job") == mine.id for t in r))
    ids = [t.get_attribute("data-job") for t in rows(driver, "#jobs-table tbody tr")]
    assert len(ids) == len(set(ids)) and ids[:201] == [j.id for j in reversed(newer)] + [mine.id]
    shot(driver, console, "31-older-jobs")


def test_files_and_keys_past_the_first_page(console, driver):
    settings, store = console_store(console)
    owner = parse_token(console.keys["jobs"])[0]
    files = [FileRow(id=f"file-{uuid.uuid4().hex[:24]}", owner=owner, purpose="image", filename=f"img{i:03d}.png",
                     size=67, sha256="0" * 64, format="png", stored="img.png", info="{}", shared=False,
                     created_at=LATER + i) for i in range(101)]
    try:
        with store.session.begin() as s:
            s.add_all(files)
        keys = [create_key(store, settings.pepper, scopes=["predict"], name=f"tenant-{i}")[1].id for i in range(100)]
    finally:
        store.close()

    sign_in(driver, console, "jobs", "#/files")
    wait(driver, lambda d: len(rows(d, "[aria-labelledby=files-h] tbody tr")) == 100, what="the first 100 files")
    show_older(driver, "files", "[aria-labelledby=files-h] tbody tr",
               lambda r: any(files[0].id in t.text for t in r))
    assert not css(driver, "p.more button").is_displayed()  # the last page: nothing more to ask for

    sign_in(driver, console, "admin", "#/keys")
    wait(driver, lambda d: len(rows(d, "#keys-table tbody tr")) == 100, what="the first 100 keys")
    listed = [t.get_attribute("data-key") for t in rows(driver, "#keys-table tbody tr")]
    assert listed == keys[::-1]  # newest first
    show_older(driver, "keys", "#keys-table tbody tr", lambda r: len(r) > 100)
    assert parse_token(console.keys["admin"])[0] in [t.get_attribute("data-key") for t in rows(driver, "#keys-table tbody tr")]
    shot(driver, console, "32-older-keys")
