"""Issue 26 in a real browser (Debian chromium through playwright; never `playwright install`): what a new user
trips on. One `panel serve` of the dashboard over the tiny random llama (2 layers × 4 heads) and the trained
tiny MoE; its model's forward passes wait while a *gate file* exists, so a test holds the model for as long
as it needs (counting what it controls, never timing anything).

- a 100K-character paste is not cut: the server names the limit and the size, and the stale output goes;
- a session waiting for another session's work says so (what runs, for which session, since when, its
  place in line) and can cancel while waiting — two browser sessions;
- error text is escaped exactly once (quotes, ``<``, ``&``, non-ASCII) and goes when the field is fixed;
- the Heads tab's kind map: one colour per kind with a legend whose counts are the summary's, L0 at the top;
- one selection per session: a click in the Retrieval grid selects in the Prompt lab, "ablate the top K" of
  the Sinks and Heads rankings fills the Prompt lab's edits in one click;
- the enlarged pattern has token labels on both axes, the hovered one whole.

Screenshots land in ``test-artifacts/`` (or ``$WORKBENCH_ARTIFACTS``) as ``usability-*.png``."""
from __future__ import annotations

import re
import sys
import textwrap

import pytest

from browser import artifacts, free_port, served

APP = textwrap.dedent('''
    """The dashboard over tiny models whose forward passes wait while the gate file exists (tests only)."""
    import os
    import sys
    import time
    from pathlib import Path

    import panel as pn

    import workbench
    from workbench.views.dashboard.app import build
    from workbench.views.dashboard.state import Workbench

    GATE = Path(os.environ["WB_TEST_GATE"])


    # bound as defaults: Bokeh clears this module's globals when the session that ran it closes, and the
    # hook outlives it (the Workbench is shared through pn.state.cache)
    def hold(module, args, gate=GATE, clock=time.monotonic, sleep=time.sleep):
        end = clock() + 120  # never hang a test run for good
        while gate.exists() and clock() < end:
            sleep(0.05)


    def loader(source, load=workbench.load, hold=hold):
        m = load(source)
        if not m.spec.is_moe:
            m.hf.model.layers[0].register_forward_pre_hook(hold)
        return m


    # one Workbench per server process (every session shares its models and their locks), as `workbench_from_argv` gives
    wb = pn.state.cache.get("wb") or pn.state.cache.setdefault("wb", Workbench("tiny:llama", moe_models=["tiny-moe"], runs=sys.argv[1],
                                                                               loader=loader))
    build(wb).servable(title="workbench dashboard")
''')


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """(url, gate): the served dashboard and its gate file (exists → forward passes wait)."""
    tmp = tmp_path_factory.mktemp("usability")
    (tmp / "dashboard.py").write_text(APP)
    gate = tmp / "gate"
    port = free_port()
    cmd = [sys.executable, "-m", "panel", "serve", str(tmp / "dashboard.py"), "--address", "127.0.0.1", "--port", str(port),
           f"--allow-websocket-origin=127.0.0.1:{port}", "--liveness", "--args", str(tmp / "runs")]  # fmt: skip
    with served(cmd, f"http://127.0.0.1:{port}/liveness", artifacts() / "usability-server.log", env={"WB_TEST_GATE": str(gate)}):
        yield f"http://127.0.0.1:{port}/dashboard", gate
    gate.unlink(missing_ok=True)


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, timeout=120_000)
    page.wait_for_selector(".wb-run button", timeout=120_000)
    return page


def _tab(page, name: str):
    page.locator(".bk-tab", has_text=name).first.click()


def _run(page, text: str | None = None):
    if text is not None:
        page.fill(".wb-prompt textarea", text)
    page.click(".wb-run button")
    page.locator(".wb-status", has_text="prompt: done").wait_for(timeout=60_000)


def _session(page) -> int:
    return int(re.search(r"session (\d+)", page.locator(".wb-session").inner_text()).group(1))


def _alert(page) -> str:
    """The error shown (Panel renders the pane's text inside its shadow root)."""
    return " ".join(page.locator(".wb-error p").all_inner_texts())


def test_a_long_paste_is_refused_whole_and_clears_the_old_output(browser, gated):
    url, _ = gated
    page = _open(browser, url)
    _run(page)
    assert page.locator(".wb-output .wb-loss").count() == 1
    text = ("The lighthouse keeper climbed the stairs. " * 2500)[:100_000]  # 100,000 characters
    page.fill(".wb-prompt textarea", text)
    assert len(page.locator(".wb-prompt textarea").input_value()) == 100_000  # the box did not cut the paste
    page.click(".wb-run button")
    page.locator(".wb-status", has_text="prompt: failed").wait_for(timeout=60_000)
    shown = _alert(page)
    assert "prompt has 100,000 characters; the limit is 60,000 characters" in shown, shown  # the size, whole
    assert page.locator(".wb-output .wb-loss").count() == 0  # the old run's output went with the error
    page.screenshot(path=str(artifacts() / "usability-long-paste.png"), full_page=True)
    page.close()


def test_a_session_waiting_for_the_model_sees_the_line_and_can_cancel(browser, gated):
    url, gate = gated
    a, b = _open(browser, url), _open(browser, url)
    sa, sb = _session(a), _session(b)
    assert sa != sb
    gate.touch()  # the model's forward passes wait: session A's prompt holds the model
    try:
        a.click(".wb-run button")
        a.locator(".wb-status", has_text="running: prompt").wait_for(timeout=30_000)
        b.click(".wb-run button")
        note = b.locator(".wb-queue")
        note.get_by_text("waiting for the model").wait_for(timeout=30_000)
        line = note.locator("p").inner_text()
        assert f"it runs prompt for session {sa} since" in line and "you are 1st in line" in line, line
        assert re.search(r"since \d\d:\d\d:\d\d", line), line
        assert "lighthouse" not in line  # the other session's prompt is never shown
        b.screenshot(path=str(artifacts() / "usability-queue-waiting.png"), full_page=True)
        b.click(".wb-cancel button")  # leave the line
        b.locator(".wb-status", has_text="prompt: stopped").wait_for(timeout=30_000)
        note.wait_for(state="hidden", timeout=30_000)
        assert a.locator(".wb-status", has_text="running: prompt").count() == 1  # A still holds the model
        b.click(".wb-run button")  # queue again, then let A finish: B runs next
        note.get_by_text("1st in line").wait_for(timeout=30_000)
    finally:
        gate.unlink(missing_ok=True)
    for p in (a, b):
        p.locator(".wb-status", has_text="prompt: done").wait_for(timeout=60_000)
        assert p.locator(".wb-output .wb-loss").count() == 1
    assert b.locator(".wb-queue").is_hidden()
    b.screenshot(path=str(artifacts() / "usability-queue-done.png"), full_page=True)
    a.close()
    b.close()


def test_errors_are_escaped_once_and_cleared_when_fixed(browser, gated):
    from workbench.views.dashboard.validation import DashboardError, parse_heads
    from workbench.models.testing import tiny_model

    spec = tiny_model("llama").spec
    url, _ = gated
    page = _open(browser, url)
    for typed in ("abc", '<b>&x "é" ß'):  # quotes, <, &, non-ASCII (no ',' or ';': they separate heads)
        with pytest.raises(DashboardError) as err:
            parse_heads([typed], spec)
        page.fill(".wb-heads-input input", typed)
        page.click(".wb-heads-set button")
        page.locator(".wb-error p", has_text=str(err.value)).first.wait_for(timeout=30_000)
        shown = _alert(page)
        assert str(err.value) in shown, (shown, str(err.value))  # exactly the message: escaped once, no entity left
        assert "&#" not in shown and "&lt;" not in shown and "\\" not in shown
        if typed == "abc":
            assert "'abc' is not a head" in shown, shown
    page.screenshot(path=str(artifacts() / "usability-error-escaped.png"), full_page=True)
    page.fill(".wb-heads-input input", "")  # the field fixed (emptied) and Set: the error goes
    page.click(".wb-heads-set button")
    page.locator(".wb-error").first.wait_for(state="hidden", timeout=30_000)
    page.screenshot(path=str(artifacts() / "usability-error-cleared.png"), full_page=True)
    page.close()


def test_one_selection_across_tabs_and_ablate_the_top_k(browser, gated):
    url, _ = gated
    page = _open(browser, url)
    _run(page)
    # a click in the Retrieval tab's grid selects the head in the Prompt lab
    _tab(page, "Retrieval")
    page.click(".wb-scan button")
    page.wait_for_selector(".wb-top-heads table", timeout=120_000)
    cell = page.locator(".wb-headgrid").first.locator('rect.wb-cell[data-layer="1"][data-head="3"]')
    if "NaN" in page.locator(".wb-top-heads table").inner_text():  # a random model answers no test: undefined scores ...
        assert cell.get_attribute("fill") == "#ddd"  # ... are grey, not the colour scale's 0
    cell.click()
    page.screenshot(path=str(artifacts() / "usability-retrieval-click.png"), full_page=True)
    _tab(page, "Prompt lab")
    page.locator(".wb-selected strong", has_text="L1H3").wait_for(timeout=30_000)
    page.locator('.wb-pattern-title[data-layer="1"][data-head="3"]').wait_for(timeout=30_000)  # the pattern view follows
    # "ablate the top K" of the Sinks ranking: the Prompt lab ablates them and re-runs
    _tab(page, "Sinks")
    page.click(".wb-sinks-scan button")
    page.wait_for_selector(".wb-sink-rate strong", timeout=120_000)
    page.locator(".wb-rank-k input").first.fill("3")
    page.locator(".wb-ablate-top button").first.click()
    page.locator(".wb-notice", has_text="Prompt lab: ablating").first.wait_for(timeout=30_000)
    named = re.findall(r"L\d+H\d+", page.locator(".wb-notice p").first.inner_text())
    assert len(named) == 3, named
    _tab(page, "Prompt lab")
    page.wait_for_selector(".wb-edited-output .wb-loss", timeout=60_000)
    edits = page.locator(".wb-edited-output .wb-edits").inner_text()
    assert all(h in edits for h in named), (edits, named)
    page.screenshot(path=str(artifacts() / "usability-ablate-top-k.png"), full_page=True)
    # and from the Heads tab's ranking: the selection there is the same head
    _tab(page, "Heads")
    page.click(".wb-heads-scan button")
    page.wait_for_selector(".wb-heads-kind table", timeout=120_000)
    page.locator(".wb-headgrid").first.locator('rect.wb-cell[data-layer="0"][data-head="2"]').click()  # a click here selects too
    _tab(page, "Prompt lab")
    page.locator(".wb-selected strong", has_text="L0H2").wait_for(timeout=30_000)
    _tab(page, "Heads")
    page.locator(".wb-rank-k input").last.fill("2")
    page.locator(".wb-ablate-top button").last.click()
    page.locator(".wb-notice", has_text="Prompt lab: ablating").last.wait_for(timeout=30_000)
    named = re.findall(r"L\d+H\d+", page.locator(".wb-notice p").last.inner_text())
    _tab(page, "Prompt lab")
    page.locator(".wb-edited-output .wb-edits", has_text=", ".join(named)).wait_for(timeout=60_000)
    page.close()


def test_the_heads_kind_map_is_categorical_with_counts_and_l0_on_top(browser, gated):
    url, _ = gated
    page = _open(browser, url)
    _tab(page, "Heads")
    page.click(".wb-heads-scan button")
    page.wait_for_selector(".wb-heads-kind table", timeout=120_000)
    summary = page.locator(".wb-heads-summary pre").first.inner_text()
    counts = dict((k, int(n)) for k, n in re.findall(r"([a-z-]+) (\d+)", summary.splitlines()[0].split(":", 1)[1]))
    kind_map = page.locator(".wb-kind-map")
    legend = [t.strip() for t in kind_map.locator(".legendtext").all_text_contents()]
    for kind, n in counts.items():
        assert f"{kind} ({n})" in legend, (kind, n, legend)  # the map's legend counts what the summary counts
    ticks = kind_map.locator(".ytick text")
    ys = {t.text_content(): t.bounding_box()["y"] for t in ticks.all()}
    assert ys["L0"] < ys["L1"], ys  # layers top-down, like every grid
    kind_map.screenshot(path=str(artifacts() / "usability-kind-map.png"))
    page.screenshot(path=str(artifacts() / "usability-heads.png"), full_page=True)
    page.close()


def test_the_enlarged_pattern_labels_both_axes(browser, gated):
    url, _ = gated
    page = _open(browser, url)
    _run(page)
    page.locator("canvas.wb-thumb[data-layer='1'][data-head='2']").click()
    page.locator('.wb-pattern-title[data-layer="1"][data-head="2"]').wait_for(timeout=30_000)
    n = int(re.search(r"(\d+) queries", page.locator(".wb-pattern-title").inner_text()).group(1))
    for axis in (".wb-axis-q", ".wb-axis-k"):
        labels = page.locator(f"{axis} .wb-axis-label")
        step = int(page.locator(axis).get_attribute("data-step"))
        assert labels.count() == -(-n // step) and 1 <= step, (axis, labels.count(), n, step)  # one label every `step` tokens
        assert all(t.strip() for t in labels.all_inner_texts())
    canvas = page.locator("canvas.wb-pattern-canvas")
    box = canvas.bounding_box()
    canvas.hover(position={"x": box["width"] * 0.8, "y": box["height"] * 0.9})  # a cell low and right: query and key shown whole
    active = page.locator(".wb-axis-q .wb-axis-active")
    active.wait_for(timeout=10_000)
    assert re.match(r"\d+ ", active.inner_text())
    page.locator(".wb-enlarged").screenshot(path=str(artifacts() / "usability-pattern-axes.png"))
    page.close()


def test_a_head_of_several_kinds_is_drawn_with_every_kind(browser, tmp_path):
    """The kind map of planted heads (test_figures): L0H1 sink + previous-token and L1H2 sink + induction show
    both colours, side by side; the legend counts each kind's heads as the summary does."""
    from test_figures import _planted_taxonomy

    from workbench.views import report
    from workbench.models.testing import tiny_model

    r = _planted_taxonomy(lambda name: tiny_model(name))
    page_file = report.write_html(tmp_path / "kinds.html", "kinds", [("kinds", r.figure("kinds"))])
    page = browser.new_page(viewport={"width": 900, "height": 700})
    page.goto(page_file.as_uri())
    page.wait_for_selector(".legendtext")
    legend = page.locator(".legendtext").all_text_contents()
    for kind, n in r.kind_counts().items():
        assert f"{kind} ({n})" in legend or kind == "retrieval", (kind, n, legend)  # retrieval: not joined, not drawn
    paths = page.locator(".scatterlayer .trace path.js-fill")
    fills = {p.evaluate("e => getComputedStyle(e).fill") for p in paths.all()}
    assert len(fills) >= 4, fills  # sink, previous-token, induction, none: one colour each
    page.locator(".plotly-graph-div").screenshot(path=str(artifacts() / "usability-kind-map-planted.png"))
    page.close()
