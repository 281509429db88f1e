"""One view, two hosts: the HeadGrid ESM served by ``panel serve`` through ``to_panel``; a click in the
page runs the widget's Python and the linked AttentionView follows. Skips without Chromium."""
import sys

from browser import artifacts, free_port, served

APP = """
import torch
import panel as pn
from workbench.models.testing import tiny_model
from workbench.views.widgets import HeadGrid, to_panel

m = tiny_model("llama")
grid = HeadGrid({"score": torch.arange(8.0).reshape(2, 4)}, model=m, prompt="Sinks soak up attention.", max_new_tokens=2)
pn.Column(to_panel(grid), to_panel(grid.attention)).servable()
"""


def test_headgrid_in_panel_serve(tmp_path, browser):
    app = tmp_path / "app.py"
    app.write_text(APP)
    port = free_port()
    cmd = [sys.executable, "-m", "panel", "serve", str(app), "--address", "127.0.0.1", "--port", str(port),
           f"--allow-websocket-origin=127.0.0.1:{port}", "--liveness"]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with served(cmd, base + "/liveness", tmp_path / "panel.log"):
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        try:
            page.goto(f"{base}/app", timeout=60_000)
            title = page.locator(".wb-av-title")
            title.wait_for(timeout=60_000)
            assert title.get_attribute("data-layer") == "1" and title.get_attribute("data-head") == "3"  # best cell
            page.locator('rect.wb-cell[data-layer="0"][data-head="2"]').click()
            page.locator('.wb-av-title[data-layer="0"][data-head="2"]').wait_for(timeout=30_000)
            page.locator(".wb-headgrid .wb-run").click()  # ablate the selected head: Python runs edit_effect
            page.locator(".wb-effect-summary").wait_for(timeout=30_000)
            assert "head-ablation:zero" in page.locator(".wb-effect-summary").inner_text()
            page.screenshot(path=str(artifacts() / "panel_headgrid.png"), full_page=True)
        finally:
            page.close()
