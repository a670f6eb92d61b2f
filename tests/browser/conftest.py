"""The console in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, which
``make browser`` installs as a prerequisite of ``make test``) driven by selenium, against ``sdb serve``
with one job worker on a free loopback port.

A missing browser is an error that says what to install, never a skip. Every page a test looks at is
saved as a screenshot in one folder (under pytest's temporary directory, or ``SDB_CONSOLE_SCREENSHOTS``),
printed at the start and at the end of the run; every URL the browser asked for, and everything the
server wrote, are kept for the secrets check.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import (
    SDB,
    bundles,  # noqa: F401  (fixture, found by name)
    free_port,
    sdb_env,
)
from tests.service.jobs_helpers import FAST, key, prepare

INSTALL = "make browser (as root: apt-get install -y chromium chromium-driver)"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
_shots_dir: Path | None = None


def find_browser() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver") or next((p for p in ("/usr/lib/chromium/chromedriver",) if Path(p).exists()),
                                                  None)
    if browser is None or driver is None:
        missing = " and ".join(n for n, p in (("a Chromium browser", browser), ("chromedriver", driver)) if p is None)
        pytest.fail(f"the console's browser tests need {missing}: {INSTALL}", pytrace=False)
    return browser, driver


class ConsoleServer:
    """``sdb serve --access-log`` with one job worker; stdout and stderr (its log) go to one file."""

    def __init__(self, data_dir: Path, trained, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**sdb_env(data_dir, trained, self.port), **FAST, "SDB_WORKERS": "1", "SDB_USAGE_FLUSH_S": "0.1"}
        self._out = open(log, "w")  # noqa: SIM115  (open while the server runs)
        self.proc = subprocess.Popen([SDB, "serve", "--host", "127.0.0.1", "--access-log"], env=env,
                                     stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sdb serve exited {self.proc.returncode}: {log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"sdb serve did not become ready; its log ends:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # workers put their jobs back and exit
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@dataclass
class Console:
    """The server, the keys the tests sign in with, and what the run leaves to check."""

    server: ConsoleServer
    keys: dict[str, str]  # role → token
    shots: Path
    downloads: Path
    secrets: set[str] = field(default_factory=set)  # every token the run used (keys created in the page too)
    urls: list[str] = field(default_factory=list)  # every URL the browser requested or showed

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="session")
def console(tmp_path_factory, bundles):  # noqa: F811
    global _shots_dir
    root = tmp_path_factory.mktemp("console")
    chosen = os.environ.get("SDB_CONSOLE_SCREENSHOTS")  # a folder that outlives pytest's three kept runs
    shots = _shots_dir = Path(chosen) if chosen else tmp_path_factory.mktemp("console-screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots: {shots}")
    data = root / "data"
    settings = prepare(data, bundles, {"digits-a": bundles.a})
    keys = {"admin": key(settings, ["admin"], name="owner"),
            "predict": key(settings, ["predict"], name="viewer"),
            "distill": key(settings, ["distill"], models=["digits-a"], quota=10_000, name="lab-7"),
            "jobs": key(settings, ["jobs", "distill"], name="trainer"),
            "deploy": key(settings, ["deploy"], name="deployer")}
    server = ConsoleServer(data, bundles, root / "server.log")
    downloads = root / "downloads"
    downloads.mkdir()
    try:
        yield Console(server, keys, shots, downloads, secrets=set(keys.values()))
    finally:
        server.stop()


@pytest.fixture(scope="session")
def driver(console):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = find_browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
              "--disable-extensions", "--no-first-run", "--disable-background-networking", "--disable-sync",
              "--password-store=basic"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    opts.add_experimental_option("prefs", {"download.default_directory": str(console.downloads),
                                           "download.prompt_for_download": False})
    log = console.shots.parent / "chromedriver.log"
    d = webdriver.Chrome(service=Service(chromedriver, log_output=str(log)), options=opts)
    d.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(console.downloads)})
    d.set_script_timeout(30)
    try:
        yield d
    finally:
        d.quit()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[_failed] = report.failed
    return report


_failed = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _browser_logs(request, console, driver):
    """After each test: keep every URL the browser requested; fail on a CSP violation or a script error.
    A failed test leaves a screenshot of where the page was, named after the test."""
    yield
    if request.node.stash.get(_failed, False):
        screenshot(driver, console.shots / f"FAILED-{request.node.name}.png")
    drain(driver, console)


def screenshot(driver, path: Path) -> None:
    """The whole page, not only the window."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 8000), "scale": 1}
    png = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
    path.write_bytes(base64.b64decode(png["data"]))


def drain(driver, console) -> list[str]:
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            console.urls.append(msg["params"]["request"]["url"])
            console.urls.append(msg["params"].get("documentURL", ""))
    console.urls.append(driver.current_url)
    problems = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
                and "Failed to load resource" not in e["message"]]  # an API refusal the page shows is not a bug
    assert not problems, problems
    return problems


def pytest_terminal_summary(terminalreporter):
    if _shots_dir is not None:
        terminalreporter.write_line(f"console screenshots: {_shots_dir}")

