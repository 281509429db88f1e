"""Issue 14 in a real browser and over real sockets: no script from file or run names runs in the app's
origin; `panel serve apps/dashboard.py` refuses to serve on every interface without auth; websocket
handshakes without an allowed Origin are refused. Debian chromium through playwright (never `playwright install`)."""
from __future__ import annotations

import json
import re
import sys
import urllib.request
from pathlib import Path

import pytest

from browser import artifacts, free_port, served

XSS = "<img src=x onerror=alert(document.domain)>"  # the payload; a dialog is the proof
STUDY = 'name = "tiny_loss"\n[model]\nsource = "tiny:llama"\n[task]\nkind = "loss"\n[[grid]]\nselect = "none"\n'


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
            f"--allow-websocket-origin=127.0.0.1:{port}", "--liveness", "--args", "--model", "tiny:llama", "--moe", "tiny-moe",
            "--runs", str(runs), "--max-prompt-chars", "4000"]  # fmt: skip


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    """`panel serve apps/dashboard.py` on loopback over a runs directory full of HTML; yields the port."""
    runs = _hostile_runs(tmp_path_factory.mktemp("hostile") / "runs")
    port = free_port()
    with served(_panel_cmd(port, runs), f"http://127.0.0.1:{port}/liveness", artifacts() / "xss-server.log"):
        yield port


def test_no_script_from_run_names_or_files_runs_in_the_app(browser, hostile_server):
    port = hostile_server
    if True:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"http://127.0.0.1:{port}/dashboard")
        page.wait_for_selector(".wb-run button", timeout=60_000)
        # typed text: a prompt made of HTML runs, its output and tokens are drawn as text
        page.fill(".wb-prompt textarea", f"{XSS} {XSS}")
        page.click(".wb-run button")
        page.wait_for_selector(".wb-output .wb-loss", timeout=60_000)
        page.fill(".wb-prompt textarea", XSS * 2000)  # over the character cap: the error quotes nothing raw
        page.click(".wb-run button")
        page.wait_for_timeout(1000)
        page.locator(".bk-tab", has_text="Routing").first.click()
        page.fill(".wb-routing-text textarea", XSS)
        page.click(".wb-show-routing button")
        page.wait_for_selector("rect.wb-load-cell", timeout=60_000)
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


# --- row 2: exposure --------------------------------------------------------------------------------------------


def _ws_connect(port: int, origin: str | None):
    """A websocket handshake to the dashboard's session, as a script would make it (token from the page)."""
    import asyncio

    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    html = urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=30).read().decode()
    token = re.search(r'"token":\s*"([^"]+)"', html).group(1)
    headers = {"Origin": origin} if origin else {}
    request = HTTPRequest(f"ws://127.0.0.1:{port}/dashboard/ws", headers=headers)

    async def go():
        conn = await websocket_connect(request, subprotocols=["bokeh", token])
        conn.close()

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # its own event loop (playwright's runs in this thread)
        pool.submit(asyncio.run, asyncio.wait_for(go(), 30)).result()


def test_websocket_without_origin_is_refused(hostile_server):
    from tornado.httpclient import HTTPClientError

    _ws_connect(hostile_server, f"http://127.0.0.1:{hostile_server}")  # a browser's handshake: accepted
    with pytest.raises(HTTPClientError, match="403"):
        _ws_connect(hostile_server, None)
    with pytest.raises(HTTPClientError, match="403"):
        _ws_connect(hostile_server, "http://evil.example")  # Bokeh's own allow-list, unchanged


def test_panel_serve_without_address_refuses_every_visitor(browser, tmp_path):
    from test_dashboard_browser import listening_addresses

    port = free_port()
    with served(_panel_cmd(port, tmp_path, address=False), f"http://127.0.0.1:{port}/liveness", artifacts() / "exposed-server.log"):
        assert listening_addresses(port) - {"127.0.0.1", "::1"}  # Panel's default: every interface
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/dashboard")
        page.wait_for_selector(".wb-refused", timeout=60_000)
        text = page.get_by_text("refusing to serve").first.inner_text(timeout=30_000)
        assert "every interface" in text and "--address 127.0.0.1" in text
        assert page.locator(".wb-run").count() == 0  # no dashboard, nothing to run
        page.close()


def test_workbench_serve_refuses_a_public_address_without_auth(tmp_path):
    import subprocess
    import socket

    proc = subprocess.run([sys.executable, "-m", "workbench", "serve", "--address", "0.0.0.0", "--port", str(free_port()),
                           "--model", "tiny:llama", "--runs", str(tmp_path)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "without authentication" in proc.stderr and "Traceback" not in proc.stderr
    assert "loading" not in proc.stdout  # refused before the model loads
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = subprocess.run([sys.executable, "-m", "workbench", "serve", "--port", str(busy.getsockname()[1]),
                               "--model", "tiny:llama", "--runs", str(tmp_path)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "already in use" in proc.stderr and "Traceback" not in proc.stderr


# --- issue 27 row 1: DNS rebinding — the Host header must name this server -------------------------------------------


def _get(port: int, path: str, host: str) -> tuple[int, str]:
    """``GET path`` on 127.0.0.1:port with this ``Host`` header, as a browser sends it for a page whose name
    resolves to 127.0.0.1 (DNS rebinding)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def _ws_as(port: int, path: str, token: str, host: str) -> None:
    """A websocket handshake whose Origin equals its Host (tornado then skips Bokeh's origin check)."""
    import asyncio
    import concurrent.futures

    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    request = HTTPRequest(f"ws://127.0.0.1:{port}{path}", headers={"Host": host, "Origin": f"http://{host}"})

    async def go():
        conn = await websocket_connect(request, subprotocols=["bokeh", token])
        conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, asyncio.wait_for(go(), 30)).result()


def _rebinding_refused(port: int, page: str) -> None:
    from tornado.httpclient import HTTPClientError

    evil = f"evil.example:{port}"
    for path in (page, "/liveness", f"{page}/autoload.js"):
        status, _ = _get(port, path, evil)
        assert status == 403, (path, status)
    status, html = _get(port, page, f"127.0.0.1:{port}")
    assert status == 200 and "refused</title>" not in html
    token = re.search(r'"token":\s*"([^"]+)"', html).group(1)
    with pytest.raises(HTTPClientError, match="403"):
        _ws_as(port, f"{page.rstrip('/')}/ws", token, evil)
    _ws_as(port, f"{page.rstrip('/')}/ws", token, f"localhost:{port}")  # loopback names stay allowed
    assert _get(port, "/liveness", f"[::1]:{port}")[0] == 200


def _rebound_browser(browser, port: int, path: str) -> tuple[int, str]:
    """Chromium with ``evil.example`` resolving to 127.0.0.1 (what a rebinding DNS server does) opens the
    dashboard under that name: the HTTP status and page title it gets. (A second Chromium from the module's
    Playwright: the name mapping is a launch option.)"""
    from browser import CHROMIUM, CHROMIUM_ARGS

    rebound = browser.browser_type.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP evil.example 127.0.0.1"])
    try:
        page = rebound.new_page()
        response = page.goto(f"http://evil.example:{port}{path}")
        page.wait_for_timeout(1500)  # a dashboard would open its websocket and draw the prompt lab by now
        assert page.locator(".wb-run").count() == 0  # nothing to run from the attacker's page
        return response.status, page.title()
    finally:
        rebound.close()


def test_panel_serve_refuses_a_rebound_host_name(browser, tmp_path):
    """`panel serve apps/dashboard.py --address 127.0.0.1` served the dashboard to ``Host: evil.example:PORT``
    (Origin equal to Host passes Bokeh's check): any web page could run prompts and read runs."""
    port = free_port()
    with served(_panel_cmd(port, tmp_path), f"http://127.0.0.1:{port}/liveness", artifacts() / "rebinding-panel.log"):
        status, html = _get(port, "/dashboard", f"evil.example:{port}")  # the very first page: checked by the app
        assert status == 403 or "<title>workbench dashboard: refused</title>" in html, status  # the refusal page
        _rebinding_refused(port, "/dashboard")
        assert _rebound_browser(browser, port, "/dashboard")[0] == 403


def test_workbench_serve_refuses_a_rebound_host_name(browser, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "workbench", "serve", "--port", str(port), "--model", "tiny:llama", "--runs", str(tmp_path)]
    with served(cmd, f"http://127.0.0.1:{port}/liveness", artifacts() / "rebinding-serve.log"):
        assert _rebound_browser(browser, port, "/")[0] == 403  # the very first request, from a real browser
        _rebinding_refused(port, "/")
