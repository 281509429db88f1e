"""Prompt lab: run a prompt, see per-head statistics and every head's pattern, drill into a head, ablate /
calibrate heads live.

Panel idiom: the page's state is its ``param`` parameters; one selection (``selected``, the head looked at)
is shared by the HeadGrid, the pattern view and the edit buttons — the grid and the view are linked to it
with Panel's own ``link(..., bidirectional=True)``, the inputs are ``from_param`` widgets, and the output
panes are methods that depend on the parameters they show. No hand-written two-way sync."""

from __future__ import annotations

import html

import panel as pn
import param

from ...attention.edits import ABLATION_MODES
from .common import Page, effect_html, link_two_way, md_escape, sync, tokens_html, unlink_two_way
from .state import HeadEdits, Progress, PromptOutcome, head_name
from .validation import DashboardError, box_chars, parse_heads
from .views import close, head_grid

MAX_HEADS_CHARS = 400  # the typed head list ("L17H3, L20H1, ...")
EXAMPLE = "The lighthouse keeper climbed the stairs every evening. Where did the keeper go every evening?"


class PromptLab(Page):
    """Prompt → kernel statistics per head (HeadGrid) → every head's pattern / the clicked head's rows →
    edits, re-run live."""

    title = "Prompt lab"
    text = param.String(default=EXAMPLE, doc="the prompt")
    chat = param.Boolean(default=False, doc="wrap the prompt in the model's chat template (its tokens are not counted in the loss)")
    new_tokens = param.Integer(default=16, bounds=(0, 64), doc="greedy continuation length")
    selected = param.List(default=[0, 0], item_type=int, doc="the head the grid, the pattern view and the edit buttons act on: [layer, head]")
    ablate = param.List(default=[], doc="heads to ablate, [[layer, head], ...] (shift-click in the grid, or the buttons)")
    mode = param.Selector(default="zero", objects=list(ABLATION_MODES), doc="ablation mode")
    calibrate = param.List(default=[], doc="heads to ACT-calibrate, [[layer, head], ...]")
    sink_keys = param.String(default="0", doc="key positions the calibration scales (comma-separated)")
    beta = param.Number(default=0.4, bounds=(0.05, 1.0), doc="ACT β")
    baseline = param.Parameter(default=None, doc="the last run without edits (PromptOutcome)")
    edited = param.Parameter(default=None, doc="the last run with the edits (PromptOutcome), None without edits")

    def __init__(self, wb, **params):
        super().__init__(wb, **params)
        caps = wb.caps
        self.param.new_tokens.bounds = (0, caps.max_new_tokens)
        self.new_tokens = min(self.new_tokens, caps.max_new_tokens)
        self.prompt = pn.widgets.TextAreaInput.from_param(self.param.text, label="Prompt", max_length=box_chars(caps.max_prompt_chars), height=110,
                                                          sizing_mode="stretch_width", css_classes=["wb-prompt"])  # fmt: skip
        self.chat_input = pn.widgets.Checkbox.from_param(self.param.chat, label="chat template", css_classes=["wb-chat"])
        self.tokens_input = pn.widgets.IntSlider.from_param(self.param.new_tokens, label="new tokens", width=200)
        self.run_button = pn.widgets.Button(label="Run", color="primary", css_classes=["wb-run"], width=100)
        self.run_button.on_click(lambda e: self.run())
        self.toggle_button = pn.widgets.Button(label="Ablate selected head (toggle)", css_classes=["wb-toggle-ablation"], width=230)
        self.toggle_button.on_click(lambda e: self.guarded(self.toggle_ablation)())
        self.calib_button = pn.widgets.Button(label="Calibrate selected head (toggle)", css_classes=["wb-toggle-calibration"], width=240)
        self.calib_button.on_click(lambda e: self.guarded(self.toggle_calibration)())
        self.clear_button = pn.widgets.Button(label="Clear edits", css_classes=["wb-clear-edits"], width=110)
        self.clear_button.on_click(lambda e: self.param.update(ablate=[], calibrate=[]))
        self.heads_input = pn.widgets.TextInput(label="or type heads to ablate", placeholder="L17H3, L20H1", width=220,
                                                max_length=box_chars(MAX_HEADS_CHARS),
                                                css_classes=["wb-heads-input"])  # fmt: skip
        self.heads_button = pn.widgets.Button(label="Set", width=60, css_classes=["wb-heads-set"])
        self.heads_button.on_click(lambda e: self.guarded(self.set_heads)(self.heads_input.value_input or self.heads_input.value))
        self.mode_input = pn.widgets.Select.from_param(self.param.mode, label="ablation mode", width=140, css_classes=["wb-ablation-mode"])
        self.keys_input = pn.widgets.TextInput.from_param(self.param.sink_keys, label="sink keys", width=120, max_length=8 * caps.max_sink_keys)
        self.beta_input = pn.widgets.FloatSlider.from_param(self.param.beta, label="β", step=0.05, width=180)
        self.grid = None  # the HeadGrid widget of the current baseline (tests, scripts)
        self.view = None  # the PatternView widget of the current baseline
        self._grid_pane = pn.pane.Markdown("Run a prompt to see its heads.")
        self._view_pane = pn.Column()
        self._links: list = []
        self._configure_bounds()
        if self.selection is not None:  # the session's selection: clicks and rankings in other tabs land here
            sync(self, self.selection, selected="selected", ablate="ablate")

    def _configure_bounds(self) -> None:
        try:
            m = self.wb.model()
        except Exception as e:  # noqa: BLE001 — the page still renders and shows why
            self.fail(e)
            return
        self.chat = bool(getattr(m.tokenizer, "chat_template", None))  # instruct models answer in chat form
        self.selected = [m.spec.n_layers // 2, 0]

    # --- the selection and the edits ----------------------------------------------------------------------
    def edits(self) -> HeadEdits:
        return self.wb.head_edits(self.ablate, self.mode, self.calibrate, self.sink_keys, self.beta)

    def _toggle(self, name: str) -> None:
        sel = [int(x) for x in self.selected]
        parse_heads([sel], self.wb.model().spec)
        cur = [list(x) for x in getattr(self, name)]
        setattr(self, name, [x for x in cur if x != sel] if sel in cur else [*cur, sel])

    def toggle_ablation(self) -> None:
        """Add the selected head to the ablation set, or take it out."""
        self._toggle("ablate")

    def toggle_calibration(self) -> None:
        self._toggle("calibrate")

    def set_heads(self, text: str) -> None:
        """``"L17H3, L20H1"`` → the ablation set (validated by ``ModelSpec.heads``)."""
        text = str(text)
        if len(text) > MAX_HEADS_CHARS:  # checked whole, never cut
            raise DashboardError(f"heads: {len(text):,} characters; the limit is {MAX_HEADS_CHARS} (write L17H3, L20H1)")
        items = [x for x in text.replace(";", ",").split(",") if x.strip()]
        self.ablate = [list(h) for h in parse_heads(items, self.wb.model().spec)]

    @param.depends("selected", "ablate", "calibrate", "mode", "beta", "sink_keys")
    def selection_view(self):
        def names(hs) -> str:  # escaped: `ablate` is linked to the grid, whose value comes from the browser
            return md_escape(", ".join(head_name(*h) if isinstance(h, (list, tuple)) and len(h) == 2 else str(h) for h in hs)) or "—"

        return pn.pane.Markdown(
            f"selected head: **{head_name(*self.selected)}** · ablate ({self.mode}): {names(self.ablate)} · "
            f"ACT calibrate (β={self.beta:g}, keys {md_escape(self.sink_keys)}): {names(self.calibrate)}",
            css_classes=["wb-selected"], sizing_mode="stretch_width")  # fmt: skip

    # --- runs ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run the prompt: baseline (statistics, loss, continuation, drill-down), then the edited run if edits are set."""
        text = self.prompt.value_input or self.text
        self.text = text
        chat, n = self.chat, self.new_tokens
        try:
            edits = self.edits()
        except Exception as e:  # noqa: BLE001
            self.clear_result()
            self.fail(e)
            return
        prog = Progress()
        layer, head = self.selected

        def work():
            base = self.wb.run_prompt(text, chat=chat, max_new_tokens=n, progress=prog)
            view = self._pattern_view(base, layer, head, prog)
            edited = self.wb.run_prompt(text, chat=chat, max_new_tokens=n, edits=edits, progress=prog) if edits else None
            return base, view, edited

        self.start("prompt", work, self._show_run, progress=prog, failed=lambda e: self.clear_result())

    def clear_result(self) -> None:
        """Take the last run off the page: an error replaces it (its output would read as this prompt's)."""
        for old in self._links:
            unlink_two_way(old)
        self._links = []
        self.grid = self.view = None
        self._grid_pane, self._view_pane = pn.pane.Markdown("Run a prompt to see its heads."), pn.Column()
        self.param.update(baseline=None, edited=None)

    def _pattern_view(self, base: PromptOutcome, layer: int, head: int, prog):
        """The PatternView of a baseline run: built from that run's own tiles and drill-down (no forward pass)."""
        import torch

        from ..widgets import PatternView

        caps = self.wb.caps
        with self.wb.using() as m:
            view = PatternView(m, torch.tensor([base.token_ids]), capture=base.pattern_capture, drilldown=base.drill, layer=layer,
                               head=head, max_pattern_tokens=caps.max_pattern_tokens, max_queries=caps.max_view_queries)  # fmt: skip
        base.pattern_capture = None  # the thumbnails and the drill-down are all that is kept
        return view

    def _show_run(self, result) -> None:
        base, view, edited = result
        grid, grid_pane = head_grid(base.metrics, title="per-head statistics (capture names)", editable=True)
        grid.selected = list(self.selected)  # the grid opens on its best cell; keep the page's selection
        grid.ablate = [list(x) for x in self.ablate]
        for old in self._links:  # the previous run's views let go of the page
            unlink_two_way(old)
        for old in (self.grid, self.view):  # and are closed: ipywidgets' registry would keep them (and a drill-down)
            close(old)
        view_pane = self.host(view)
        self._links = [link_two_way(grid_pane, self, selected="selected", ablate="ablate"), link_two_way(view_pane, self, selected="selected")]
        self.grid, self.view = grid, view
        self._grid_pane, self._view_pane = grid_pane, view_pane
        self.param.update(baseline=base, edited=edited)

    @param.depends("ablate", "mode", "calibrate", "sink_keys", "beta", watch=True)
    def _edits_changed(self) -> None:
        """Live: every change of the edits re-runs the prompt under them (the baseline stays)."""
        base = self.baseline
        if base is None:
            return
        try:
            edits = self.edits()
        except Exception as e:  # noqa: BLE001
            self.fail(e)
            return
        if not edits:
            self.edited = None
            return
        chat, n = base.chat, self.new_tokens
        prog = Progress()

        def done(outcome):
            try:
                if self.edits() != edits or self.baseline is not base:  # changed meanwhile: a newer run is queued
                    return
            except Exception:  # noqa: BLE001
                return
            self.edited = outcome

        self.start("edited run", lambda: self.wb.run_prompt(base.text, chat=chat, max_new_tokens=n, edits=edits, progress=prog),
                   done, progress=prog, queue=True)  # fmt: skip

    # --- derived views --------------------------------------------------------------------------------------
    @param.depends("baseline")
    def grid_view(self):
        return self._grid_pane

    @param.depends("baseline")
    def pattern_view(self):
        return self._view_pane

    @param.depends("baseline")
    def output_view(self):
        return pn.pane.HTML(_outcome_html("Output", self.baseline), css_classes=["wb-output"], sizing_mode="stretch_width")

    @param.depends("edited", "baseline")
    def edited_view(self):
        base, ed = self.baseline, self.edited
        if base is None:
            body = ""
        elif ed is None:
            body = "<i>no edits: select a head (grid or pattern thumbnails) and ablate or calibrate it</i>"
        else:
            body = effect_html(base.effect_of(ed), title="With edits") + f"<div style='color:#666;font-size:11px'>{ed.seconds:.1f} s</div>"
        return pn.pane.HTML(body, css_classes=["wb-edited-output"], sizing_mode="stretch_width")

    # --- layout -------------------------------------------------------------------------------------------
    def __panel__(self):
        spec_line = ""
        try:
            m = self.wb.model()
            spec_line = (f"model **{md_escape(m.source)}** — {m.spec.n_layers} layers × {m.spec.n_heads} heads; prompts up to "
                         f"{self.wb.caps.prompt_tokens(m)} tokens (every head's pattern up to {self.wb.caps.max_pattern_tokens})")  # fmt: skip
        except Exception:  # noqa: BLE001 — shown in the alert by _configure_bounds
            pass
        edits_box = pn.Column(
            pn.pane.Markdown("### Edits (re-run live)"),
            self.selection_view,
            pn.Row(self.toggle_button, self.calib_button, self.clear_button),
            pn.Row(self.heads_input, self.heads_button, self.mode_input, self.keys_input, self.beta_input),
            self.edited_view,
            sizing_mode="stretch_width",
        )
        return pn.Column(
            self.header(f"## Prompt lab\n{spec_line}"),
            self.alert,
            self.notice,
            pn.Row(self.prompt, pn.Column(self.chat_input, self.tokens_input, self.run_button)),
            self.status_row(),
            self.output_view,
            edits_box,
            pn.Row(pn.Column(self.grid_view), pn.Column(self.pattern_view, sizing_mode="stretch_width"), sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )


def _outcome_html(title: str, o: PromptOutcome | None) -> str:
    if o is None:
        return ""
    n = o.user[1] - o.user[0]
    tmpl = f"; {o.n_template} template tokens not counted" if o.n_template else ""
    return (f"<div><b>{html.escape(title)}</b>: {len(o.token_ids)} tokens ({n} yours{tmpl}), loss on your tokens "
            f"<span class='wb-loss'>{o.loss:.4f}</span> nats, {o.seconds:.1f} s"
            f"<pre class='wb-text' style='white-space:pre-wrap'>{html.escape(o.output)}</pre>"
            f"<details><summary>tokens ({len(o.token_ids)})</summary>{tokens_html(o.tokens, o.notes, o.user)}</details></div>")  # fmt: skip
