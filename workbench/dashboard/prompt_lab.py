"""Prompt lab: run a prompt, see per-head statistics, drill into a head, ablate / calibrate heads live."""

from __future__ import annotations

import html

import panel as pn
import param

from ..attention.edits import ABLATION_MODES
from .common import Page, md_escape
from .state import HeadEdits, PromptOutcome, head_name, parse_heads
from .views import HeadGridView, locked_attention_view

EXAMPLE = "The lighthouse keeper climbed the stairs every evening. Where did the keeper go every evening?"


class PromptLab(Page):
    """Prompt → kernel statistics per head (HeadGrid) → attention of the clicked head → edits, re-run live."""

    title = "Prompt lab"
    layer = param.Integer(default=0, bounds=(0, None), doc="selected head's layer")
    head = param.Integer(default=0, bounds=(0, None), doc="selected head")
    ablate = param.List(default=[], doc="heads to ablate, as 'L3H2'")
    mode = param.Selector(default="zero", objects=list(ABLATION_MODES), doc="ablation mode")
    calibrate = param.List(default=[], doc="heads to ACT-calibrate")
    sink_keys = param.String(default="0", doc="key positions the calibration scales (comma-separated)")
    beta = param.Number(default=0.4, bounds=(0.05, 1.0), doc="ACT β")

    def __init__(self, wb, **params):
        super().__init__(wb, **params)
        caps = wb.caps
        self.baseline: PromptOutcome | None = None
        self.edited: PromptOutcome | None = None
        self.prompt = pn.widgets.TextAreaInput(label="Prompt", value=EXAMPLE, max_length=caps.max_prompt_chars, height=110,
                                               sizing_mode="stretch_width", css_classes=["wb-prompt"])  # fmt: skip
        self.chat = pn.widgets.Checkbox(label="chat template", value=False, css_classes=["wb-chat"])
        self.new_tokens = pn.widgets.IntSlider(
            label="new tokens", start=0, end=caps.max_new_tokens, value=min(16, caps.max_new_tokens), width=200
        )
        self.run_button = pn.widgets.Button(label="Run", color="primary", css_classes=["wb-run"], width=100)
        self.run_button.on_click(lambda e: self.run())
        self.output = pn.pane.HTML("", css_classes=["wb-output"], sizing_mode="stretch_width")
        self.edited_output = pn.pane.HTML("", css_classes=["wb-edited-output"], sizing_mode="stretch_width")
        self.grid_area = pn.Column(pn.pane.Markdown("Run a prompt to see its heads."), sizing_mode="stretch_width")
        self.attention_area = pn.Column(sizing_mode="stretch_width")
        self.selected_label = pn.pane.Markdown("", css_classes=["wb-selected"])
        self.grid: HeadGridView | None = None

        self.layer_input = pn.widgets.IntInput.from_param(
            self.param.layer, label="layer", width=90, css_classes=["wb-layer"]
        )
        self.head_input = pn.widgets.IntInput.from_param(
            self.param.head, label="head", width=90, css_classes=["wb-head"]
        )
        self.toggle_button = pn.widgets.Button(
            label="Toggle ablation of selected head", css_classes=["wb-toggle-ablation"], width=260
        )
        self.toggle_button.on_click(lambda e: self.guarded(self.toggle_ablation)())
        self.calib_button = pn.widgets.Button(
            label="Toggle ACT calibration of selected head", css_classes=["wb-toggle-calibration"], width=280
        )
        self.calib_button.on_click(lambda e: self.guarded(self.toggle_calibration)())
        self.ablate_input = pn.widgets.MultiChoice(
            label="ablated heads", options=[], css_classes=["wb-ablate"], sizing_mode="stretch_width"
        )
        self.calib_input = pn.widgets.MultiChoice(
            label="calibrated heads (ACT)", options=[], css_classes=["wb-calibrate"], sizing_mode="stretch_width"
        )
        self._sync(self.ablate_input, "ablate")
        self._sync(self.calib_input, "calibrate")
        self.mode_input = pn.widgets.Select.from_param(self.param.mode, label="ablation mode", width=140)
        self.keys_input = pn.widgets.TextInput.from_param(self.param.sink_keys, label="sink keys", width=120)
        self.beta_input = pn.widgets.FloatSlider.from_param(self.param.beta, label="β", step=0.05, width=180)
        self.param.watch(self._select_changed, ["layer", "head"])
        self.param.watch(self.guarded(self._ablate_to_grid), ["ablate"])
        self.param.watch(self._edits_changed, ["ablate", "mode", "calibrate", "sink_keys", "beta"])
        self._configure_bounds()

    def _sync(self, widget, name: str) -> None:
        """Widget value ⇄ parameter ``name``, both ways, without echo loops."""
        widget.param.watch(
            lambda e: setattr(self, name, list(e.new)) if list(e.new) != getattr(self, name) else None, "value"
        )
        self.param.watch(
            lambda e: setattr(widget, "value", list(e.new)) if list(e.new) != list(widget.value) else None, name
        )

    def _configure_bounds(self) -> None:
        try:
            spec = self.wb.model().spec
        except Exception as e:  # noqa: BLE001 — the page still renders and shows why
            self.fail(e)
            return
        self.chat.value = bool(
            getattr(self.wb.model().tokenizer, "chat_template", None)
        )  # instruct models answer in chat form
        self.param.layer.bounds = (0, spec.n_layers - 1)
        self.param.head.bounds = (0, spec.n_heads - 1)
        names = [head_name(l, h) for l in range(spec.n_layers) for h in range(spec.n_heads)]
        self.ablate_input.options = names
        self.calib_input.options = names

    # --- actions ------------------------------------------------------------------------------------------
    def edits(self) -> HeadEdits:
        spec = self.wb.model().spec
        from .state import DashboardError

        cap = self.wb.caps.max_sink_keys
        text = self.sink_keys
        if len(text) > 8 * cap:
            raise DashboardError(f"sink keys: at most {cap} comma-separated positions, got {len(text)} characters")
        try:
            keys = tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise DashboardError(f"sink keys must be comma-separated integers, got {text[:40]!r}") from None
        if len(keys) > cap:
            raise DashboardError(f"sink keys: at most {cap} positions, got {len(keys)}")
        limit = self.wb.caps.prompt_tokens(self.wb.model())
        if any(not 0 <= k < limit for k in keys):
            raise DashboardError(f"sink keys must be token positions in 0..{limit - 1}")
        return HeadEdits(ablate=parse_heads(self.ablate, spec), mode=self.mode, calibrate=parse_heads(self.calibrate, spec),
                         sink_keys=keys or (0,), beta=float(self.beta))  # fmt: skip

    def run(self) -> None:
        """Run the prompt: baseline (statistics, loss, continuation), then the edited run if edits are set."""
        text, chat, n = self.prompt.value_input or self.prompt.value, self.chat.value, self.new_tokens.value
        self.prompt.value = text
        try:
            edits = self.edits()
        except Exception as e:  # noqa: BLE001
            self.fail(e)
            return

        def work():
            base = self.wb.run_prompt(text, chat=chat, max_new_tokens=n)
            edited = self.wb.run_prompt(text, chat=chat, max_new_tokens=n, edits=edits) if edits else None
            return base, edited

        self.start("prompt", work, self._show_run)

    def _show_run(self, result) -> None:
        base, edited = result
        self.baseline, self.edited = base, edited
        self.output.object = _outcome_html("Output", base)
        self.edited_output.object = (
            _outcome_html("With edits", edited, base)
            if edited
            else "<i>no edits: toggle an ablation or a calibration</i>"
        )
        self.grid = HeadGridView(base.metrics, title="per-head statistics", on_select=self._grid_selected,
                                 on_ablate=self._grid_ablate)  # fmt: skip
        self.grid_area.objects = [self.grid.panel]
        if self.grid.widget is not None:  # the grid opens on its best cell; keep the page's selection instead
            self.grid.widget.selected = [self.layer, self.head]
        self._show_head()

    def _grid_selected(self, layer: int, head: int) -> None:
        if (layer, head) != (self.layer, self.head):
            self.param.update(layer=layer, head=head)  # one event → _select_changed

    def _grid_ablate(self, heads) -> None:
        names = [head_name(l, h) for l, h in heads]
        if names != list(self.ablate):
            self.ablate = names

    def _ablate_to_grid(self, *_) -> None:
        if self.grid is not None and self.grid.widget is not None:
            heads = [list(h) for h in parse_heads(self.ablate, self.wb.model().spec)]
            if heads != self.grid.widget.ablate:
                self.grid.widget.ablate = heads

    def _select_changed(self, *_):
        if (
            self.grid is not None
            and self.grid.widget is not None
            and list(self.grid.widget.selected) != [self.layer, self.head]
        ):
            self.grid.widget.selected = [
                self.layer,
                self.head,
            ]  # the grid follows the inputs (its callback is a no-op then)
        self._show_head()

    def _show_head(self) -> None:
        """The selected head's attention over the tokens (the AttentionView widget: exact rows)."""
        self.selected_label.object = f"selected head: **{head_name(self.layer, self.head)}**"
        if self.baseline is None:
            return
        text, chat = self.baseline.text, self.chat.value
        layer, head = self.layer, self.head
        view = getattr(self, "_attention_widget", None)
        if view is not None and getattr(view, "_text", None) == (text, chat):
            try:
                view.show(layer, head)
            except Exception as e:  # noqa: BLE001
                self.fail(e)
            return
        self.start("attention", lambda: locked_attention_view(self.wb, text, layer, head, chat=chat), self._show_attention_widget,
                   queue=True)  # fmt: skip

    def _show_attention_widget(self, view) -> None:
        from .views import _to_panel

        view._text = (self.baseline.text, self.chat.value)
        self._attention_widget = view
        self.attention_area.objects = [_to_panel(view)]
        if (view.layer, view.head) != (self.layer, self.head):
            view.show(self.layer, self.head)

    def toggle_ablation(self) -> None:
        name = head_name(self.layer, self.head)
        self.ablate = [h for h in self.ablate if h != name] if name in self.ablate else [*self.ablate, name]

    def toggle_calibration(self) -> None:
        name = head_name(self.layer, self.head)
        self.calibrate = [h for h in self.calibrate if h != name] if name in self.calibrate else [*self.calibrate, name]

    def _edits_changed(self, *_):
        """Live: every change of the edits re-runs the prompt under them (the baseline stays)."""
        if self.baseline is None:
            return
        try:
            edits = self.edits()
        except Exception as e:  # noqa: BLE001
            self.fail(e)
            return
        base, chat, n = self.baseline, self.chat.value, self.new_tokens.value
        if not edits:
            self.edited = None
            self.edited_output.object = "<i>no edits: toggle an ablation or a calibration</i>"
            return

        def done(outcome):
            try:
                if self.edits() != edits:  # changed meanwhile: a newer run is queued, or edits were cleared
                    return
            except Exception:  # noqa: BLE001
                return
            self.edited = outcome
            self.edited_output.object = _outcome_html("With edits", outcome, base)

        self.start(
            "edited run",
            lambda: self.wb.run_prompt(base.text, chat=chat, max_new_tokens=n, edits=edits),
            done,
            queue=True,
        )

    # --- layout -------------------------------------------------------------------------------------------
    def __panel__(self):
        spec_line = ""
        try:
            m = self.wb.model()
            spec_line = f"model **{md_escape(m.source)}** — {m.spec.n_layers} layers × {m.spec.n_heads} heads; prompts up to {self.wb.caps.prompt_tokens(m)} tokens"
        except Exception:  # noqa: BLE001 — shown in the alert by _configure_bounds
            pass
        edits_box = pn.Column(
            pn.pane.Markdown("### Edits (re-run live)"),
            pn.Row(self.toggle_button, self.calib_button),
            pn.Row(self.ablate_input, self.mode_input),
            pn.Row(self.calib_input, self.keys_input, self.beta_input),
            self.edited_output,
            sizing_mode="stretch_width",
        )
        return pn.Column(
            self.header(f"## Prompt lab\n{spec_line}"),
            self.alert,
            pn.Row(self.prompt, pn.Column(self.chat, self.new_tokens, self.run_button)),
            self.status,
            self.output,
            edits_box,
            pn.Row(
                self.grid_area,
                pn.Column(
                    pn.Row(self.layer_input, self.head_input),
                    self.selected_label,
                    self.attention_area,
                    sizing_mode="stretch_width",
                ),
            ),  # fmt: skip
            sizing_mode="stretch_width",
        )


def _outcome_html(title: str, o: PromptOutcome | None, base: PromptOutcome | None = None) -> str:
    if o is None:
        return ""
    delta = "" if base is None else f" (Δ {o.loss - base.loss:+.4f})"
    changed = "" if base is None else (" — <b>output changed</b>" if o.output != base.output else " — output unchanged")
    return (f"<div><b>{html.escape(title)}</b> <span class='wb-edits'>[{html.escape(o.edits.describe())}]</span>: "
            f"{len(o.token_ids)} tokens, loss <span class='wb-loss'>{o.loss:.4f}</span>{delta}{changed}, {o.seconds:.1f} s"
            f"<pre class='wb-text' style='white-space:pre-wrap'>{html.escape(o.output)}</pre></div>")  # fmt: skip
