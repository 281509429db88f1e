"""``RoutingView``: MoE routing of a text — top-1 expert per token and layer, expert load, and
deactivate / force toggles that re-run the text and show what changed."""
from __future__ import annotations

from typing import Sequence

import torch
import traitlets

from ...base.errors import ProbeError
from ...routing import routing_rows
from ._base import WorkbenchWidget, esm, nested, optional_pair, unique_pairs


class RoutingView(WorkbenchWidget):
    """Token × layer grid coloured by each token's top-1 expert, expert load per layer, and edits.

    Click a load cell or a grid cell to select ``selected = [layer, expert]``: the tokens routed to
    that expert (any of their top-k slots) light up. ``masked`` / ``forced`` list the experts to
    deactivate (:class:`~workbench.ExpertMask`) or force (:class:`~workbench.ExpertForce`); the view's
    *apply* (or :meth:`apply`) re-runs the text with them and shows the new top-1 grid (changed cells
    outlined) and the effect on the text's own tokens (loss, per-token Δloss, logits, the greedy continuation as a
    word diff, the experts named)."""

    _esm = esm("routing_view")
    tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
    layers = traitlets.List(traitlets.Int()).tag(sync=True)  # the MoE layers, rows of every array
    n_experts = traitlets.Int(0).tag(sync=True)
    top1 = traitlets.List().tag(sync=True)  # [layer][token] expert
    experts = traitlets.List().tag(sync=True)  # [layer][token][k] experts, best first (-1 pads)
    load = traitlets.List().tag(sync=True)  # [layer][expert] share of assignments
    selected = traitlets.List(traitlets.Int()).tag(sync=True)  # [layer, expert] or []
    masked = traitlets.List(traitlets.List(traitlets.Int())).tag(sync=True)
    forced = traitlets.List(traitlets.List(traitlets.Int())).tag(sync=True)
    run = traitlets.Int(0).tag(sync=True)  # the view increments it to apply the edits
    edited_top1 = traitlets.List().tag(sync=True)  # [] until edits were applied
    edited_load = traitlets.List().tag(sync=True)
    effect = traitlets.Dict().tag(sync=True)
    _inputs = ("selected", "masked", "forced", "run")  # what the view sets; the rest is output

    def __init__(self, model, text, *, max_new_tokens: int = 8, **kwargs):
        from ...models.tokens import token_labels

        if not model.spec.is_moe:
            raise ProbeError(f"RoutingView: {model.source} has no MoE layers (no router to show); load an MoE model")
        self.model, self.text, self.max_new_tokens = model, text, max_new_tokens
        self.ids = model.encode(text)
        self.record = routing_rows(model, self.ids)
        self.edited_record = None
        self.last_effect = None
        self.last_prompt_effect = None
        super().__init__(tokens=token_labels(model.tokenizer, self.ids[0])[0], layers=list(self.record.layers),
                         n_experts=self.record.n_experts, **self._arrays(self.record), **kwargs)  # fmt: skip

    def input_limit(self, name: str) -> int | None:
        return {"selected": 2, "masked": len(self.layers) * self.n_experts, "forced": len(self.layers) * self.n_experts}.get(name)

    @staticmethod
    def _arrays(rec) -> dict:
        from ...routing import expert_load

        return {"top1": rec.experts[..., 0].tolist(), "experts": rec.experts.tolist(), "load": nested(expert_load(rec))}

    @traitlets.validate("selected")
    def _valid_selected(self, proposal):
        return optional_pair(proposal["value"], self._check)

    @traitlets.validate("masked", "forced")
    def _valid_edits(self, proposal):
        return unique_pairs(proposal["value"], self._check, len(self.layers) * self.n_experts)

    def _check(self, pair: list[int]) -> None:
        if len(pair) != 2 or pair[0] not in self.layers or not 0 <= pair[1] < self.n_experts:
            raise ProbeError(
                f"RoutingView: {pair} is not a [layer, expert] pair (MoE layers {self.layers}, experts 0..{self.n_experts - 1})"
            )

    def tokens_of(self, layer: int, expert: int) -> list[int]:
        """Token positions routed to ``expert`` in ``layer`` (any top-k slot): what the view highlights."""
        self._check([layer, expert])
        ex = self.record.experts[self.layers.index(layer)]
        return (ex == expert).any(-1).nonzero().flatten().tolist()

    @traitlets.observe("run")
    def _run_requested(self, change):
        edits = self._edits()
        self._compute("re-running with expert edits", lambda: self._measure(edits), self._show)

    def _edits(self) -> list:
        from ...routing import ExpertForce, ExpertMask

        return ([ExpertMask([tuple(p) for p in self.masked])] if self.masked else []) + (
            [ExpertForce([tuple(p) for p in self.forced])] if self.forced else []
        )

    def _measure(self, edits):
        from ...measure.effects import prompt_effect

        if not edits:
            return None
        rec = routing_rows(self.model, self.ids, edits)
        return rec, prompt_effect(self.model, self.text, edits, max_new_tokens=self.max_new_tokens, cancel=self.stop_event)

    def _show(self, result) -> None:
        if result is None:
            self.edited_record, self.last_effect, self.last_prompt_effect = None, None, None
            self.edited_top1, self.edited_load, self.effect = [], [], {}
            return
        rec, pe = result
        arrays = self._arrays(rec)
        self.edited_record, self.last_prompt_effect, self.last_effect = rec, pe, pe.edit_effect()
        changed = (rec.experts[..., 0] != self.record.experts[..., 0]).sum().item()
        self.edited_top1, self.edited_load = arrays["top1"], arrays["load"]
        self.effect = {"changed_top1": changed, **pe.payload()}

    def apply(self):
        """Re-run the text with ``masked`` / ``forced``; returns the EditEffect (None when no edits: reset)."""
        self._show(self._measure(self._edits()))
        return self.last_effect
