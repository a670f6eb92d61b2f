"""The console under a reverse proxy's path prefix, in headless Chromium: ``sdb serve --root-path /sdb`` opened at
http://127.0.0.1:PORT/sdb, as a proxy that keeps the prefix forwards it (the server takes it off to route; one that
strips it is tested in process in tests/service/test_root_path.py). Every URL the page asks for must be under the
prefix: one at the host's root is another site's behind the proxy (a blank page, then 404s).
"""
from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.service.conftest import Server
from tests.service.jobs_helpers import FAST, key, prepare

from .conftest import drain, screenshot
from .test_console import visible, wait

ROOT = "/sdb"


@pytest.fixture(scope="module")
def prefixed(tmp_path_factory, bundles):
    """The server under ROOT with digits-a, and a key per role."""
    data = tmp_path_factory.mktemp("console-root-path") / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    keys = {"distill": key(settings, ["distill"], name="lab-under-a-prefix"),
            "deploy": key(settings, ["deploy"], name="deployer-under-a-prefix")}
    server = Server(data, bundles, env=FAST, args=("--root-path", ROOT))
    try:
        yield server, keys
    finally:
        server.stop()


def sign_in(driver, page: str, token: str) -> None:
    """A fresh load of ``page`` (a console URL), signed in through the form."""
    driver.get(page)
    driver.execute_script("sessionStorage.clear()")
    driver.get("about:blank")
    driver.get(page)
    box = visible(driver, "#signin-key")
    box.send_keys(token, Keys.ENTER)
    visible(driver, "#signout")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#view h1"), what="a page shown")


CANCELLED = 0  # the status requests_seen gives a load the browser cancelled itself


def requests_seen(driver, console, settle_s: float = 5.0) -> dict[str, int | None]:
    """Every http URL the browser asked for since the last look, with the status of its answer (None: none came);
    kept in the run's URLs for its secrets check. The log is read again for up to ``settle_s`` while an answer is
    still to come (the favicon is asked for last, and its answer could be logged after the first read)."""
    asked: dict[str, int | None] = {}
    urls: dict[str, str] = {}  # request id -> its URL (a cancelled load names its request alone)
    deadline = time.monotonic() + settle_s
    while True:
        for entry in driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            params = msg.get("params", {})
            if msg["method"] == "Network.requestWillBeSent":
                urls[params["requestId"]] = params["request"]["url"]
                asked.setdefault(params["request"]["url"], None)
            elif msg["method"] == "Network.responseReceived":
                asked[params["response"]["url"]] = params["response"]["status"]
            elif msg["method"] == "Network.loadingFailed" and params.get("canceled") and params["requestId"] in urls:
                # the browser gave up on it (a favicon when the page moved on): asked, never refused
                asked[urls[params["requestId"]]] = asked.get(urls[params["requestId"]]) or CANCELLED
        pending = [u for u, status in asked.items() if status is None and u.startswith("http")]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # the browser's log has no event to wait on
    console.urls.extend(asked)
    return {u: s for u, s in asked.items() if u.startswith("http")}


FAVICON = ROOT + "/console/static/icon.svg"  # fetched by the browser itself: its answer is not always in the log


def assert_all_under_the_prefix(asked: dict[str, int | None], server) -> None:
    assert asked
    elsewhere = [u for u in asked if not u.startswith(server.url + "/")
                 or not (urlsplit(u).path == ROOT or urlsplit(u).path.startswith(ROOT + "/"))]
    assert not elsewhere, f"asked for outside {ROOT}: {elsewhere}"
    # Chrome's favicon loader logs its request but not always its answer (1 CI run in 3): asked under the prefix
    # is what the page decides; that the server answers it there is asked of the server directly
    unlogged = {u for u, s in asked.items() if s is None and urlsplit(u).path == FAVICON}
    failed = {u: s for u, s in asked.items() if (s is None or s >= 400) and u not in unlogged}
    assert not failed, f"not answered, or refused: {failed}"
    assert httpx.get(server.url + FAVICON, timeout=30).status_code == 200


def test_the_console_asks_for_everything_under_the_prefix(console, driver, prefixed):
    server, keys = prefixed
    drain(driver, console)  # what earlier tests left in the browser's log
    sign_in(driver, f"{server.url}{ROOT}#/models", keys["distill"])  # no trailing slash: a relative URL breaks here
    row = visible(driver, "#view table").find_element(By.XPATH, ".//tr[td/a[text()='digits-a']]")
    row.find_element(By.LINK_TEXT, "digits-a").click()
    visible(driver, "#try-h")
    # a sample image: fetched from the server, then sent; the picker fills in once the samples' index has come
    visible(driver, "button[data-sample='digits-3.png']").click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-top]"), 20, what="the prediction")
    wait(driver, lambda d: d.find_elements(By.XPATH, "//h3[text()='Keyed logits (distill)']"), 20, what="the logits")
    screenshot(driver, console.shots / "root-path-model.png")
    asked = requests_seen(driver, console)
    assert_all_under_the_prefix(asked, server)
    for path in ("/console/static/app.js", "/console/static/console.css", "/console/static/icon.svg",
                 "/v1/keys/me", "/v1/models", "/console/static/samples/index.json",
                 "/console/static/samples/digits-3.png", "/v1/models/digits-a/predict", "/v1/models/digits-a/distill"):
        assert any(urlsplit(u).path == ROOT + path for u in asked), f"{ROOT}{path} never asked for: {sorted(asked)}"


def test_the_api_docs_link_is_under_the_prefix_and_renders(console, driver, prefixed):
    server, keys = prefixed
    drain(driver, console)
    sign_in(driver, f"{server.url}{ROOT}/#/files", keys["deploy"])
    link = visible(driver, "#deploy-how a")
    assert link.get_attribute("href") == f"{server.url}{ROOT}/docs#/models/deploy_v1_models_post"
    link.click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"), 30, what="the API docs rendered")
    screenshot(driver, console.shots / "root-path-docs.png")
    assert_all_under_the_prefix(requests_seen(driver, console), server)
    assert keys["deploy"].rsplit("_", 1)[1] not in "\n".join(console.urls)
