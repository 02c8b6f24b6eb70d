"""The subject's HTML report opened in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium): every <img> loads, and the page is not blank."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from _report_fixtures import make_subject_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
           "chromium-driver)")


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1500,1000"):
        options.add_argument(arg)
    # an explicit driver: selenium's driver manager (which would go online) never runs
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_report_page_loads_every_figure_in_chromium(tmp_path, browser):
    from PIL import Image

    page = make_subject_report(tmp_path / "out", warnings=["sub-01_Chimap: a warning"])
    browser.get(page.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
        "i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]);")
    assert [src.rsplit("_desc-", 1)[1] for src, *_ in images] == [
        "field_mosaic.png", "chimap_mosaic.png", "r2star_mosaic.png"]
    for src, complete, natural_w, natural_h, shown_w in images:
        assert complete and natural_w > 1000 and natural_h > 500, (src, natural_w, natural_h)
        assert shown_w > 1000, (src, shown_w)               # drawn large, not a thumbnail
    assert browser.execute_script("return document.querySelectorAll('figcaption').length") == 3
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1500, min(int(height) + 150, 8000))
    png = browser.get_screenshot_as_png()
    (tmp_path / "report.png").write_bytes(png)
    with Image.open(io.BytesIO(png)) as im:
        grey = np.asarray(im.convert("L"), dtype=np.float64)
    assert grey.shape[0] > 2000 and grey.shape[1] >= 1400
    assert grey.std() > 30                                  # not blank: text and slices
    # the mosaics' black background covers a good part of the page (they did render)
    assert np.mean(grey < 10) > 0.2
