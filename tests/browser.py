"""Headless Chromium for the tests of what people look at (make test-browser): Debian's chromium driven through
its chromedriver by selenium, with the flags this closed network needs, screenshots kept in test-results/."""

from __future__ import annotations

import base64
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from conftest import REPO

RESULTS = REPO / "test-results"  # screenshots: the test run's artifacts, for a person to look at afterwards
# No background networking, component updates or sync: with them Chromium keeps trying hosts it cannot reach.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")


@contextlib.contextmanager
def chromium() -> Iterator:
    """A selenium WebDriver on a fresh profile; skips the test where chromium or chromedriver is missing."""
    import pytest

    binary, driver_binary = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_binary is None:
        pytest.skip("needs Debian's chromium and chromium-driver (make test-browser installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(driver_binary), options=options)  # no Selenium Manager lookup
        try:
            yield driver
        finally:
            driver.quit()


def wait_for(driver, condition: Callable[[], object], what: str, timeout: float = 60) -> object:
    """condition()'s first truthy value, polled until `timeout`; else an AssertionError with a screenshot."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    shot = screenshot(driver, "timeout")
    raise AssertionError(f"{what}: not after {timeout:g} s ({driver.current_url}; screenshot {shot})")


def screenshot(driver, name: str) -> Path:
    """The whole page as test-results/<name>.png (the full scroll height, not the window's)."""
    RESULTS.mkdir(exist_ok=True)
    height = driver.execute_script("return Math.max(document.body.scrollHeight, window.innerHeight)")
    driver.set_window_size(1400, min(int(height) + 100, 12000))
    path = RESULTS / f"{name}.png"
    path.write_bytes(base64.b64decode(driver.get_screenshot_as_base64()))
    return path


IMAGES = """return Array.from(document.images).map(img => ({src: img.src.slice(0, 40), complete: img.complete,
    width: img.naturalWidth, height: img.naturalHeight}))"""


def images(driver) -> list[dict]:
    """Every <img> of the page: the start of its src, whether it loaded, and its decoded size (0 if it did not)."""
    return driver.execute_script(IMAGES)
