"""Issue 14 in a real browser and over real sockets: no script from file or run names runs in the app's
origin; `panel serve apps/dashboard.py` refuses to serve on every interface without auth; websocket
handshakes without an allowed Origin are refused. Debian chromium through playwright (never `playwright install`)."""
from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest

from browser import CHROMIUM_ARGS, artifacts, free_port, served

CHROMIUM = shutil.which("chromium")
XSS = "<img src=x onerror=alert(document.domain)>"  # the payload; a dialog is the proof
STUDY = 'name = "tiny_loss"\n[model]\nsource = "tiny:llama"\n[task]\nkind = "loss"\n[[grid]]\nselect = "none"\n'


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (`make browser` installs it); browser tests skipped")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _hostile_runs(root: Path) -> Path:
    """A runs directory an attacker could write to: a run named with HTML, a study.toml whose first key is
    HTML, a failure record full of HTML."""
    from workbench.study import Run

    Run.create(root / XSS, STUDY, resume=False)
    bad = root / "bad_toml"
    bad.mkdir(parents=True)
    (bad / "study.toml").write_text(f'"{XSS}" = 1\n' + STUDY)
    failed = Run.create(root / "failed", STUDY, resume=False).path
    (failed / "failures").mkdir(exist_ok=True)
    (failed / "failures" / "eval-0000000000000000.json").write_text(json.dumps(
        {"unit_id": "eval-0000000000000000", "unit": XSS, "grid": XSS, "error": XSS, "traceback": XSS, "worker": XSS}))
    return root


def _panel_cmd(port: int, runs: Path, *, address: bool = True) -> list[str]:
    return [sys.executable, "-m", "panel", "serve", "apps/dashboard.py", "--port", str(port), *(["--address", "127.0.0.1"] if address else []),
            f"--allow-websocket-origin=127.0.0.1:{port}", "--liveness", "--args", "--model", "tiny:llama", "--runs", str(runs)]  # fmt: skip


def test_no_script_from_run_names_or_files_runs_in_the_app(browser, tmp_path):
    runs = _hostile_runs(tmp_path / "runs")
    port = free_port()
    with served(_panel_cmd(port, runs), f"http://127.0.0.1:{port}/liveness", artifacts() / "xss-server.log"):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"http://127.0.0.1:{port}/dashboard")
        page.wait_for_selector(".wb-run button", timeout=60_000)
        page.locator(".bk-tab", has_text="Runs").first.click()
        page.wait_for_selector(".wb-open button", timeout=30_000)
        select = page.locator(".wb-run-select select")
        for run_id in select.locator("option").all_inner_texts():
            select.select_option(label=run_id)
            page.click(".wb-open button")
            page.wait_for_timeout(800)
            page.click(".wb-report button")
            page.wait_for_timeout(1500)
        page.click(".wb-compare-runs button")
        page.wait_for_timeout(1000)
        page.screenshot(path=str(artifacts() / "security-runs-tab.png"), full_page=True)
        text = page.locator(".wb-runs-table table").inner_text()
        assert not dialogs, f"script from a run's name or files ran in the app: alert({dialogs})"
        # the texts are shown, as text
        assert "bad_toml" in text and "<img src=x" in text
        page.close()
