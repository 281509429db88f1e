"""The quickstart notebook in a real JupyterLab and Chromium: run every cell, click a head in the
HeadGrid, and see the attention drill-down follow. Skips when Chromium or Playwright is missing."""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from browser import CHROMIUM, ROOT, artifacts, free_port, served

NOTEBOOK = ROOT / "notebooks" / "01_quickstart.ipynb"

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make browser)"),
]


@pytest.fixture(scope="module")
def jupyterlab():
    """A JupyterLab on 127.0.0.1 serving a copy of the notebook (autosave must not touch the repository),
    with throwaway settings and a kernelspec pinned to this interpreter (the venv's)."""
    pytest.importorskip("jupyterlab")
    tmp = Path(tempfile.mkdtemp(prefix="wb-lab-"))
    (tmp / "root").mkdir()
    shutil.copy(NOTEBOOK, tmp / "root" / NOTEBOOK.name)
    kernel = tmp / "data" / "kernels" / "python3"
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (workbench)", "language": "python",
    }))  # fmt: skip
    notify = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    notify.mkdir(parents=True)
    (notify / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = {"JUPYTER_PATH": str(tmp / "data"), "JUPYTERLAB_SETTINGS_DIR": str(tmp / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp / "config")}  # fmt: skip
    port = free_port()
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", "127.0.0.1", f"--port={port}", "--allow-root",
           "--IdentityProvider.token=", f"--ServerApp.root_dir={tmp / 'root'}", "--ServerApp.password="]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        with served(cmd, base + "/api/status", tmp / "lab.log", env=env, timeout=60):
            yield base
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_quickstart_headgrid_click_updates_attention(jupyterlab, browser):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    try:
        page.goto(f"{jupyterlab}/lab/tree/{NOTEBOOK.name}?reset")
        page.get_by_text("| Idle").first.wait_for(timeout=60_000)  # the kernel started
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        # the last cell's output (an EditEffect table) means every cell ran
        page.locator("table.workbench-edit-effect").wait_for(timeout=150_000)
        title = page.locator(".wb-av-title")
        assert title.get_attribute("data-layer") == "20" and title.get_attribute("data-head") == "3"  # set from Python
        page.locator('.wb-headgrid rect.wb-cell[data-layer="5"][data-head="2"]').click()
        page.locator('.wb-av-title[data-layer="5"][data-head="2"]').wait_for(timeout=30_000)
        assert "layer 5 · head 2" in title.inner_text()
        tokens = page.locator(".wb-pattern .wb-rowview .wb-tok")
        assert tokens.count() > 20
        assert tokens.first.evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"  # coloured
        assert page.locator(".wb-pattern canvas.wb-thumb").count() == 270  # every head's pattern (PatternView)
        # one selection: a click on a pattern thumbnail moves the grid's selection too
        page.locator('.wb-pattern canvas.wb-thumb[data-layer="17"][data-head="3"]').click()
        page.locator('.wb-pattern-title[data-layer="17"][data-head="3"]').wait_for(timeout=30_000)
        cell = page.locator('.wb-headgrid rect.wb-cell[data-layer="17"][data-head="3"]')
        expect(cell).to_have_attribute("stroke", "#d62728", timeout=30_000)
        output = page.locator(".jp-OutputArea-output", has=page.locator(".wb-pattern"))
        output.screenshot(path=str(artifacts() / "quickstart_headgrid.png"))  # the grid and its drill-down
    except Exception:
        page.screenshot(path=str(artifacts() / "quickstart_failure.png"), full_page=True)
        raise
    finally:
        page.close()
