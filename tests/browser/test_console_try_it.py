"""The console's "Try it" past the sizes of the digits fixture, and errors that are not the API's own, in Chromium.

Before: a photo for a model of 3x384x384 inputs came back from /inputs as 8.6 MB of JSON, sent as JSON again to
/distill, over the 8 MiB payload limit (a 413 where the keyed logits belong); the keyed table took the maximum of
every logit once per logit (50,000 classes: 37 s of a frozen tab) and drew a row per class; and an error page of a
proxy on HTTP/2, which has no status text, read "request failed".
"""
from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By

from .test_console import api, css, digit_png, field, shot, sign_in, visible, wait

KEYED_ROWS = "//h3[text()='Keyed logits (distill)']/following-sibling::div//tbody/tr"


def deploy_box(console, bundles, tmp_path, name: str, model, in_shape: tuple[int, ...], classes: int) -> None:
    """An SDB box of ``model`` (random key, no training) sealed under the console server's master key, deployed."""
    import torch

    from sdb_core.bundle import export_bundle
    from sdb_core.protect.box import SafeDistillationBox
    from sdb_core.protect.key import load_or_create_master_key

    torch.manual_seed(0)
    box = SafeDistillationBox(model.eval(), torch.randn(*in_shape), lam=0.3)
    path = export_bundle(box, tmp_path / f"{name}.sdb", name=name, in_shape=in_shape, mean=(0.5,) * in_shape[0],
                         std=(0.25,) * in_shape[0], labels=[f"class {i}" for i in range(classes)],
                         master_key=load_or_create_master_key(bundles.master_key_file))
    r = api(console, "admin", "POST", "/v1/models", files={"file": (f"{name}.sdb", path.read_bytes())})
    assert r.status_code == 201, r.text


def keyed_logits(console, name: str, image: bytes) -> np.ndarray:
    """What the keyed path answers for ``image``, asked by the API as .npy."""
    x = np.asarray(api(console, "jobs", "POST", f"/v1/models/{name}/inputs", files={"file": ("i", image)}).json()["inputs"],
                   np.float32)
    buf = io.BytesIO()
    np.save(buf, x)
    r = httpx.post(f"{console.url}/v1/models/{name}/distill", content=buf.getvalue(), timeout=60,
                   headers={"Authorization": f"Bearer {console.keys['jobs']}", "Content-Type": "application/x-npy"})
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["logits"][0])


def shown_rows(driver) -> list[tuple[str, float]]:
    return [(r.find_elements(By.TAG_NAME, "td")[0].text, float(r.find_elements(By.TAG_NAME, "td")[1].text))
            for r in driver.find_elements(By.XPATH, KEYED_ROWS)]


def test_a_photo_for_a_3x384x384_model_shows_its_keyed_logits(console, driver, bundles, tmp_path):
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 32, 32), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10))
    deploy_box(console, bundles, tmp_path, "photo-384", net, (3, 384, 384), 10)
    try:
        photo = tmp_path / "photo.jpg"  # noise: its normalised values take all their digits in JSON
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(photo, quality=95)
        sign_in(driver, console, "jobs", "#/models/photo-384")
        field(driver, "Image (PNG or JPEG)").send_keys(str(photo))
        visible(driver, "[data-top]")
        keyed = wait(driver, lambda d: d.find_elements(By.XPATH, KEYED_ROWS) or d.find_elements(
            By.XPATH, "//h3[text()='Keyed logits (distill)']/following-sibling::div[@role='alert']"), 60, "the keyed logits")
        assert keyed[0].tag_name == "tr", keyed[0].text  # not the error box (413 payload_too_large before)
        z = keyed_logits(console, "photo-384", photo.read_bytes())
        assert dict(shown_rows(driver)) == pytest.approx({f"class {i}": v for i, v in enumerate(z)}, abs=1e-3)
        shot(driver, console, "try-it-384")
    finally:
        assert api(console, "admin", "DELETE", "/v1/models/photo-384").status_code == 200


def test_the_keyed_logits_of_20000_classes_show_their_top_100_at_once_and_all_on_asking(console, driver, bundles,
                                                                                         tmp_path):
    import torch

    classes = 20_000  # 50,000 froze the tab for minutes before (and the test's browser with it)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, classes))
    deploy_box(console, bundles, tmp_path, "many-classes", net, (1, 8, 8), classes)
    try:
        image = tmp_path / "digit.png"
        image.write_bytes(digit_png(bundles, 0))
        sign_in(driver, console, "jobs", "#/models/many-classes")
        field(driver, "Image (PNG or JPEG)").send_keys(str(image))
        start = time.monotonic()
        wait(driver, lambda d: d.find_elements(By.XPATH, KEYED_ROWS), 20, "the keyed logits")
        took = time.monotonic() - start
        z = keyed_logits(console, "many-classes", image.read_bytes())
        top = np.argsort(-z, kind="stable")[:100]
        rows = shown_rows(driver)
        assert len(rows) == 100 and took < 20, (len(rows), took)
        assert [label for label, _ in rows[:5]] == [f"class {i}" for i in top[:5]]
        assert [v for _, v in rows] == pytest.approx(z[top], abs=1e-3)
        more = css(driver, "p.more button")
        assert more.text == "Show all 20,000" and "The 100 highest of 20,000 classes" in css(driver, "p.more").text
        more.click()
        count = "return document.evaluate(\"count(" + KEYED_ROWS + ")\", document, null, XPathResult.NUMBER_TYPE, null).numberValue"
        wait(driver, lambda d: d.execute_script(count) == classes, 60, "every class")
        assert not driver.find_elements(By.CSS_SELECTOR, "p.more button")
    finally:
        assert api(console, "admin", "DELETE", "/v1/models/many-classes").status_code == 200


# A proxy's error page on HTTP/2: the page's fetch answered as nginx does, with no status text (HTTP/2 has none)
PROXY_ANSWERS = """
const [status, page] = arguments;
const real = window.fetch;
window.fetch = (input, init) => String(input).includes("/v1/models/digits-a")
  ? Promise.resolve(new Response(page, { status, headers: { "Content-Type": "text/html" } }))
  : real(input, init);
"""
NGINX_413 = ("<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 Request "
             "Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


@pytest.mark.parametrize(("status", "page", "said"), [(413, NGINX_413, "413 Request Entity Too Large"),
                                                      (502, "", "HTTP 502 Bad Gateway")])
def test_a_proxys_error_page_without_a_status_text_says_its_reason(console, driver, status, page, said):
    sign_in(driver, console, "predict", "#/models")
    driver.execute_script(PROXY_ANSWERS, status, page)
    driver.execute_script("location.hash = '#/models/digits-a'")
    error = visible(driver, "#view .error")
    assert error.text == f"The server refused: {said} ({status} error)", error.text
