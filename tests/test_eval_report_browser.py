"""The eval HTML report in a real browser: Debian's headless Chromium, driven by Selenium.

It must render with no console errors and make no network request (all
plots and thumbnails are data URIs). A screenshot is kept under artifacts/.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from labelstream.cli import main as cli_main

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "artifacts"
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CLASSES = ("nominal", "local", "global")
PER_CLASS = 30
# The shared textile taxonomy, as a multi-label audit with one template.
TAXONOMY = (
    (REPO_ROOT / "examples" / "textile.yaml").read_text()
    .replace("name: textile\n", "name: textile-audit\nmode: multi_label\n")
    .replace('"a photo of {} fabric.", "a close-up photo of {} cloth."', '"a photo of {} fabric."')
)
# Chromium's own background traffic (updates, sync, field trials) is off, so any request would be the page's.
CHROME_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
    "--disable-sync", "--disable-extensions", "--no-first-run", "--metrics-recording-only",
    "--window-size=1280,1600",
)


@pytest.fixture(scope="module")
def report(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    import conformal_clip_data

    work = tmp_path_factory.mktemp("report")
    root = Path(conformal_clip_data.__file__).parent / "data" / "textile_images" / "simulated"
    for label in CLASSES:
        (work / "data" / label).mkdir(parents=True)
        for source in sorted((root / label).glob("*.jpg"))[:PER_CLASS]:
            shutil.copyfile(source, work / "data" / label / source.name)
    (work / "taxonomy.yaml").write_text(TAXONOMY)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("LABELSTREAM_MODEL__NAME", str(tiny_model.config_path))
        monkeypatch.setenv("LABELSTREAM_MODEL__PRETRAINED", str(tiny_model.checkpoint_path))
        monkeypatch.setenv("LABELSTREAM_MODEL__DEVICE", "cpu")
        monkeypatch.setenv("LABELSTREAM_LOG__FORMAT", "json")
        code = cli_main(["eval", str(work / "data"), "--taxonomy", str(work / "taxonomy.yaml"),
                         "--target-precision", "0.6", "--report", str(work / "report.html"),
                         "--json", str(work / "report.json"), "--no-cache"])
    structlog.reset_defaults()
    assert code == 0
    yield work / "report.html", json.loads((work / "report.json").read_text())


@pytest.fixture
def browser() -> Iterator[Any]:
    # `make setup` installs Debian's chromium-driver; its absence is a broken set-up, not a reason to skip.
    assert CHROMEDRIVER.exists(), "Debian chromium-driver is not installed: run `make setup`"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def network_requests(driver: Any) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_report_renders_offline_with_headings_images_and_classes(
    report: tuple[Path, dict[str, Any]], browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    path, output = report
    browser.get(path.as_uri())
    headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
    assert headings[:3] == ["Summary", "Per-class metrics", "Confusion matrix"]
    assert any(h.startswith("Thresholds") for h in headings)
    assert {"Precision-recall curves", "Galleries"} <= set(headings)
    images_cell = browser.find_element(By.CSS_SELECTOR, 'td[data-key="images"]')
    assert images_cell.text == str(3 * PER_CLASS) == str(output["n_images"])
    body = browser.find_element(By.TAG_NAME, "body").text
    for name in CLASSES:
        assert name in body
    gallery_headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h3")]
    assert set(CLASSES) <= set(gallery_headings)

    images = browser.find_elements(By.TAG_NAME, "img")
    sources = [img.get_attribute("src") for img in images]
    assert len(images) >= 3 + 3  # heatmap, curves, and at least a thumbnail per class
    assert all(src.startswith("data:image/") for src in sources)
    # Every image decoded (naturalWidth is 0 for a broken image).
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images)
    assert browser.find_elements(By.TAG_NAME, "script") == []

    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []
    assert [u for u in network_requests(browser) if u.startswith(("http:", "https:", "ws:", "wss:"))] == []

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "eval-report.png"))
    assert (ARTIFACTS / "eval-report.png").stat().st_size > 10_000
