"""Routing: per-token MoE routing, expert load and specialisation; deactivate / force experts and compare outputs."""

from __future__ import annotations

import panel as pn
import param

from .common import Page, effect_html, md_escape, table
from .state import Progress, expert_name
from .validation import box_chars

EXAMPLE = "def add(a, b):\n    return a + b\n\nThe river flows to the sea. 2 + 3 = 5"


class RoutingPage(Page):
    title = "Routing"
    model_name = param.Selector(default=None, objects=[], doc="MoE model (from the server's configuration)")
    mask = param.List(default=[], doc="experts to deactivate, as 'L1E3'")
    force = param.List(default=[], doc="experts to force")

    def __init__(self, wb, **params):
        super().__init__(wb, **params)
        self.param.model_name.objects = list(wb.moe_names)
        self.model_name = wb.moe_names[0] if wb.moe_names else None
        self.text = pn.widgets.TextAreaInput(label="Text", value=EXAMPLE, height=100, max_length=box_chars(wb.caps.max_routing_chars),
                                             sizing_mode="stretch_width", css_classes=["wb-routing-text"])  # fmt: skip
        self.new_tokens = pn.widgets.IntSlider(
            label="new tokens", start=0, end=wb.caps.max_new_tokens, value=min(12, wb.caps.max_new_tokens), width=200
        )
        self.show_button = pn.widgets.Button(label="Show routing", color="primary", css_classes=["wb-show-routing"], width=130)
        self.compare_button = pn.widgets.Button(label="Compare outputs", css_classes=["wb-compare"], width=160)
        self.mask_input = pn.widgets.MultiChoice(
            label="deactivate experts", options=[], css_classes=["wb-dash-mask"], sizing_mode="stretch_width"
        )
        self.force_input = pn.widgets.MultiChoice(
            label="force experts", options=[], css_classes=["wb-dash-force"], sizing_mode="stretch_width"
        )
        self.mask_input.param.watch(lambda e: setattr(self, "mask", list(e.new)), "value")
        self.force_input.param.watch(lambda e: setattr(self, "force", list(e.new)), "value")
        self.show_button.on_click(lambda e: self.show_routing())
        self.compare_button.on_click(lambda e: self.compare())
        self.param.watch(lambda e: self._model_changed(), "model_name")
        self.outcome = None
        self.effect = None
        self.view_area = pn.Column(sizing_mode="stretch_width")
        self.effect_area = pn.pane.HTML("", css_classes=["wb-dash-effect"], sizing_mode="stretch_width")

    def _model_changed(self) -> None:
        self.mask_input.options, self.force_input.options = [], []
        self.mask_input.value, self.force_input.value = [], []
        self.view_area.objects, self.effect_area.object = [], ""

    def _expert_options(self) -> list[str]:
        spec = self.wb.moe_spec(self.model_name)
        return [expert_name(r.layer, e) for r in spec.routers for e in range(r.n_experts)]

    def show_routing(self) -> None:
        name, text, n = self.model_name, self.text.value_input or self.text.value, self.new_tokens.value
        self.text.value = text

        def work():
            from ..widgets import RoutingView

            outcome = self.wb.routing_of(name, text)
            with self.wb.using(name) as m:
                view = RoutingView(m, text, max_new_tokens=n)  # its *apply* continues as far as Compare does
            return outcome, view, self._expert_options()

        self.start("routing", work, self._show)

    def _show(self, result) -> None:
        outcome, view, options = result
        self.outcome = outcome
        self.mask_input.options = options
        self.force_input.options = options
        rec = outcome.record
        main = self.host(view, lock=self.model_name)  # its edit runs hold this model's lock, in a worker
        # the view's own deactivate / force toggles show up in this page's lists too
        names = lambda pairs: [expert_name(l, e) for l, e in pairs]  # noqa: E731
        view.observe(lambda c: setattr(self.mask_input, "value", names(c["new"])), names="masked")
        view.observe(lambda c: setattr(self.force_input, "value", names(c["new"])), names="forced")
        self.view_area.objects = [
            pn.pane.Markdown(
                f"**{md_escape(outcome.model)}**: {len(outcome.tokens)} tokens, MoE layers {list(rec.layers)}, "
                f"{rec.n_experts} experts; routing {'verified' if rec.verified else 'NOT verified'} against the experts that ran",
                css_classes=["wb-routing-summary"],
            ),  # fmt: skip
            main,
            pn.pane.Markdown("### Token specialisation (OpenMoE: I(expert; token id), per layer)"),
            table(outcome.specialisation.round(3), index=False),
            pn.pane.Markdown("### Top-1 expert per token"),
            table(outcome.per_token(), index=False, max_rows=60, css_classes=["wb-per-token"]),
        ]

    def compare(self) -> None:
        name, text, mask, force, n = (
            self.model_name,
            self.text.value_input or self.text.value,
            list(self.mask),
            list(self.force),
            self.new_tokens.value,
        )
        prog = Progress()
        self.start("compare", lambda: self.wb.routing_effect(name, text, mask=mask, force=force, max_new_tokens=n, progress=prog),
                   self._show_effect, progress=prog)  # fmt: skip

    def _show_effect(self, eff) -> None:
        """The effect on the text's own tokens: experts named, loss, per-token Δloss, the continuation as a word diff."""
        self.effect = eff
        self.effect_area.object = effect_html(eff, title="Experts edited")

    def __panel__(self):
        return pn.Column(
            self.header(
                "## MoE routing\nRouter logits are captured and the model's exact top-k recomputed; deactivated "
                "experts get −∞ logits before top-k, forced ones are always chosen."
            ),  # fmt: skip
            self.alert,
            self.notice,
            pn.Row(
                pn.widgets.Select.from_param(self.param.model_name, label="MoE model", width=220),
                self.new_tokens,
                self.show_button,
            ),
            self.text,
            self.status_row(),
            self.view_area,
            pn.pane.Markdown("### Deactivate / force experts"),
            pn.Row(self.mask_input, self.force_input, self.compare_button),
            self.effect_area,
            sizing_mode="stretch_width",
        )
