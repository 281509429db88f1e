"""The dashboard served for real: `panel serve apps/dashboard.py` and `workbench serve` as subprocesses on
free ports, driven with Debian's chromium through playwright (never `playwright install`).

Screenshots of every tab land in ``test-artifacts/`` (or ``$WORKBENCH_ARTIFACTS``). Tiny models keep it
fast and offline: ``tiny:llama`` (random) for the prompt lab, the trained ``tiny-moe`` for routing."""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browser import artifacts, free_port, served  # shared with the widgets' browser tests



def _get(url: str, timeout: float = 2.0):
    return urllib.request.urlopen(urllib.request.Request(url), timeout=timeout)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (Linux /proc/net/tcp{,6})."""
    found = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A = LISTEN
                if len(addr) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:
                    raw = bytes.fromhex(addr)
                    found.add(
                        socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
                    )
    return found


@pytest.fixture(scope="module")
def dashboard_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    study = pytest.importorskip("workbench.study")
    from test_dashboard import TINY_STUDY

    (tmp / "tiny.toml").write_text(TINY_STUDY)
    study.run_study(tmp / "tiny.toml", tmp / "runs" / "tiny_loss", executor="local", resume=False)  # one run to browse
    port = free_port()
    cmd = [sys.executable, "-m", "panel", "serve", "apps/dashboard.py", "--address", "127.0.0.1", "--port", str(port),
           f"--allow-websocket-origin=127.0.0.1:{port}", "--liveness", "--warm",
           "--args", "--model", "tiny:llama", "--moe", "tiny-moe", "--runs", str(tmp / "runs")]  # fmt: skip
    with served(cmd, f"http://127.0.0.1:{port}/liveness", artifacts() / "dashboard-server.log"):
        assert listening_addresses(port) <= {"127.0.0.1"}, listening_addresses(port)
        yield f"http://127.0.0.1:{port}/dashboard"


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(url)
    page.wait_for_selector(".wb-run button", timeout=60_000)
    return page, failed


def _run_prompt(page):
    page.click(".wb-run button")
    page.wait_for_selector(".wb-output .wb-loss", timeout=60_000)
    return float(page.locator(".wb-output .wb-loss").inner_text())


def _tab(page, name: str):
    page.locator(".bk-tab", has_text=name).first.click()


def test_prompt_lab_routing_and_every_tab_in_chromium(browser, dashboard_url):
    out = artifacts()
    page, failed = _open(browser, dashboard_url)

    # a failing request shows its error in the page, and the app keeps serving
    example = page.locator(".wb-prompt textarea").input_value()
    page.fill(".wb-prompt textarea", "   ")
    page.click(".wb-run button")
    page.get_by_text("type a prompt first").wait_for(timeout=30_000)
    page.fill(".wb-prompt textarea", example)

    base_loss = _run_prompt(page)
    page.get_by_text("type a prompt first").wait_for(state="hidden", timeout=30_000)
    base_text = page.locator(".wb-output pre").inner_text()

    # click a head in the HeadGrid: the page's selection and the pattern view follow
    page.click('rect.wb-cell[data-layer="1"][data-head="2"]')
    page.locator(".wb-selected strong", has_text="L1H2").wait_for(timeout=30_000)
    page.locator('.wb-pattern-title[data-layer="1"][data-head="2"]').wait_for(timeout=30_000)

    # toggle an ablation of that head: the edited run appears, and its output differs from the baseline
    page.click(".wb-toggle-ablation button")
    page.wait_for_selector(".wb-edited-output .wb-loss", timeout=60_000)
    edited_loss = float(page.locator(".wb-edited-output .wb-loss").inner_text())
    edited_text = page.locator(".wb-edited-output .wb-diff").inner_text()
    assert "L1H2" in page.locator(".wb-edited-output .wb-edits").inner_text()
    assert edited_loss != base_loss or edited_text != base_text
    page.screenshot(path=str(out / "dashboard-prompt-lab.png"), full_page=True)

    # Retrieval: a small scan with progress in the page
    _tab(page, "Retrieval")
    page.click(".wb-scan button")
    page.wait_for_selector(".wb-top-heads table", timeout=120_000)
    page.screenshot(path=str(out / "dashboard-retrieval.png"), full_page=True)

    # Sinks
    _tab(page, "Sinks")
    page.click(".wb-sinks-scan button")
    page.wait_for_selector(".wb-sink-rate strong", timeout=120_000)
    page.screenshot(path=str(out / "dashboard-sinks.png"), full_page=True)

    # Heads: the taxonomy scan, joined with the Retrieval tab's scan
    _tab(page, "Heads")
    page.click(".wb-heads-scan button")
    page.wait_for_selector(".wb-heads-kind table", timeout=120_000)
    assert "retrieval heads that are also induction heads" in " ".join(page.locator(".wb-heads-summary pre").all_inner_texts())
    page.screenshot(path=str(out / "dashboard-heads.png"), full_page=True)

    # Routing: route the text, select an expert in the RoutingView, deactivate it, re-run
    _tab(page, "Routing")
    page.click(".wb-show-routing button")
    page.wait_for_selector("rect.wb-load-cell", timeout=60_000)
    page.click('rect.wb-load-cell[data-layer="1"][data-expert="3"]')
    page.click("button.wb-mask")
    page.click("button.wb-apply")
    page.wait_for_selector("div.wb-effect", timeout=60_000)
    effect = page.locator("div.wb-effect").first.inner_text()
    assert "expert-mask L1E3" in effect and "loss" in effect  # the expert is named
    page.screenshot(path=str(out / "dashboard-routing.png"), full_page=True)

    # Runs: the study run made by the fixture, its summary and its report
    _tab(page, "Runs")
    page.wait_for_selector(".wb-open button", timeout=30_000)
    page.click(".wb-open button")
    page.wait_for_selector(".wb-run-summary table", timeout=30_000)
    page.click(".wb-report button")
    page.wait_for_selector("iframe.wb-report-frame", timeout=60_000)
    page.frame_locator("iframe.wb-report-frame").get_by_text("Study report").first.wait_for(timeout=60_000)
    page.screenshot(path=str(out / "dashboard-runs.png"), full_page=True)

    assert not [u for u in failed if not u.startswith("http://127.0.0.1")], f"requests left the server: {failed}"
    page.close()


def test_two_browser_sessions_at_once(browser, dashboard_url):
    """Two sessions run the same prompt at the same moment, one with a head ablated: neither sees the other's edit."""
    a, _ = _open(browser, dashboard_url)
    b, _ = _open(browser, dashboard_url)
    ref = _run_prompt(a)
    _run_prompt(b)
    b.click('rect.wb-cell[data-layer="0"][data-head="1"]')
    b.locator(".wb-selected strong", has_text="L0H1").wait_for(timeout=30_000)
    b.click(".wb-toggle-ablation button")
    b.wait_for_selector(".wb-edited-output .wb-loss", timeout=60_000)
    edited = float(b.locator(".wb-edited-output .wb-loss").inner_text())
    for _ in range(3):  # both at once, repeatedly
        a.click(".wb-run button")
        b.click(".wb-run button")
        for p in (a, b):
            p.locator(".wb-status", has_text="prompt: done").wait_for(timeout=60_000)
        assert float(a.locator(".wb-output .wb-loss").inner_text()) == ref
        assert float(b.locator(".wb-output .wb-loss").inner_text()) == ref
        assert float(b.locator(".wb-edited-output .wb-loss").inner_text()) == edited
    a.close()
    b.close()


def test_workbench_serve_binds_loopback_and_asks_for_login(tmp_path):
    """`workbench serve` (no browser needed): 127.0.0.1 only, /liveness up, basic auth guards the page."""
    port = free_port()
    cmd = [sys.executable, "-m", "workbench", "serve", "--port", str(port), "--model", "tiny:llama", "--runs", str(tmp_path),
           "--basic-auth", "s3cret-pass", "--cookie-secret", "test-cookie-secret"]  # fmt: skip
    with served(cmd, f"http://127.0.0.1:{port}/liveness", artifacts() / "workbench-serve.log"):
        assert listening_addresses(port) == {"127.0.0.1"}
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            resp = opener.open(f"http://127.0.0.1:{port}/", timeout=10)
            status, location = resp.status, resp.headers.get("Location", "")
        except urllib.error.HTTPError as e:
            status, location = e.code, e.headers.get("Location", "")
        assert status in (302, 401, 403) and (status != 302 or "login" in location), (status, location)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None
