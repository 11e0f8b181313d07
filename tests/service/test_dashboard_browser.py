"""The dashboard in a real headless Chromium (Debian `chromium` + `chromium-driver`, installed by
`make test`): sign in, see the figures the catalog holds, search and open a study, screenshot.

DASHBOARD_SCREENSHOT=docs/dashboard.png writes the README's screenshot too."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.archive_support import c_store, ct_dataset, database, part10_bytes, start_serve

PASSWORD = "dashboard test password"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "make test installs chromium and chromium-driver (apt)"
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(argument)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def test_sign_in_figures_and_study_drill_down(tmp_path: Path, browser: webdriver.Chrome) -> None:
    with database("sqlite", tmp_path) as url:
        archive = start_serve(tmp_path, url, require_auth="true", admin_password=PASSWORD)
        try:
            admin_key = _key(archive)
            archive.headers = {"Authorization": f"Bearer {admin_key}"}
            study = ct_dataset(seed=5).StudyInstanceUID
            datasets = [ct_dataset(rows=64, cols=64, seed=500 + i, study_uid=study) for i in range(3)]
            datasets[0].AccessionNumber = "ACC-4711"
            for ds in datasets:
                ds.AccessionNumber = "ACC-4711"
            assert c_store(archive.dicom_port, datasets, calling_ae="CT_SCANNER") == [0, 0, 0]
            other = ct_dataset(rows=64, cols=64, seed=600, patient_id="OTHER-PATIENT")
            body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part10_bytes(other) + b"\r\n--b--\r\n"
            stowed = httpx.post(
                f"{archive.http}/dicomweb/studies",
                content=body,
                headers={
                    "Authorization": f"Bearer {admin_key}",
                    "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
                },
            )
            assert stowed.status_code == 200
            for ds in [*datasets, other]:
                archive.wait_state(ds.SOPInstanceUID, {"archived"})
            # Whole-catalog figures are served from a computation refreshed in the background (a few
            # seconds on a small catalog): wait until they include all four
            deadline = time.monotonic() + 60
            while True:
                savings = httpx.get(f"{archive.http}/admin/api/savings", headers=archive.headers).json()
                if savings["instances"] == 4 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)

            wait = WebDriverWait(browser, 30)
            browser.get(f"{archive.http}/admin")
            wait.until(expected_conditions.presence_of_element_located((By.ID, "secret")))
            browser.find_element(By.ID, "secret").send_keys("not the password")
            browser.find_element(By.ID, "sign-in").click()
            wait.until(expected_conditions.presence_of_element_located((By.ID, "login-error")))
            browser.find_element(By.ID, "secret").send_keys(PASSWORD)
            browser.find_element(By.ID, "sign-in").click()
            wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "archived-count"), "4"))
            assert savings["instances"] == 4
            assert browser.find_element(By.ID, "ratio").text == f"{savings['ratio']:.2f} : 1"
            assert browser.find_element(By.ID, "corrupt").text == "0"
            # Charts are drawn client-side as SVG, one bar group per codec and per sender
            codec_bars = browser.find_elements(By.CSS_SELECTOR, "#chart-codec rect.bar-stored")
            assert len(codec_bars) == len(savings["by_codec"])
            senders = browser.find_element(By.ID, "chart-ae").text
            assert "CT_SCANNER" in senders and "admin-key" in senders  # C-STORE calling AE and STOW key

            search = browser.find_element(By.ID, "study-query")
            search.send_keys("ACC-4711")
            search.submit()
            row = wait.until(
                expected_conditions.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-study="{study}"]'))
            )
            wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#studies tbody tr")) == 1)
            row = browser.find_element(By.CSS_SELECTOR, f'tr[data-study="{study}"]')
            row.click()
            wait.until(
                expected_conditions.text_to_be_present_in_element((By.ID, "study-detail"), datasets[2].SOPInstanceUID)
            )
            detail = browser.find_element(By.ID, "study-detail").text
            assert all(ds.SOPInstanceUID in detail for ds in datasets) and "archived" in detail
            # The audit trail shows the stores
            audit = browser.find_element(By.ID, "audit").text
            assert "CT_SCANNER" in audit and "store" in audit
            screenshot = os.environ.get("DASHBOARD_SCREENSHOT")
            browser.save_screenshot(str(tmp_path / "dashboard.png"))
            if screenshot:
                shutil.copy(tmp_path / "dashboard.png", screenshot)

            # Delete the other study from its drill-down: a reason is asked for, then it is gone
            search.clear()
            search.send_keys("OTHER-PATIENT")
            search.submit()
            # The table is re-rendered when the search answers: click once it holds just that study
            wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#studies tbody tr")) == 1)
            wait.until(lambda _: _clicked(browser, f'tr[data-study="{other.StudyInstanceUID}"]'))
            wait.until(lambda _: _clicked(browser, "#delete-study"))
            prompt = wait.until(expected_conditions.alert_is_present())
            prompt.send_keys("test deletion")
            prompt.accept()
            wait.until(expected_conditions.presence_of_element_located((By.ID, "deleted-note")))
            wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "tombstones"), other.StudyInstanceUID))
            assert archive.instance(other.SOPInstanceUID) == []
            assert "test deletion" in browser.find_element(By.ID, "tombstones").text
        finally:
            archive.stop()


def _clicked(browser: webdriver.Chrome, selector: str) -> bool:
    try:
        browser.find_element(By.CSS_SELECTOR, selector).click()
        return True
    except (NoSuchElementException, StaleElementReferenceException):
        return False


def _key(archive: object) -> str:
    import subprocess
    import sys

    completed = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "--role", "admin", "--name", "admin-key"],
        env=archive.env,  # type: ignore[attr-defined]
        capture_output=True,
        text=True,
        check=True,
    )
    return completed.stdout.strip()
