"""``HeadGrid``: a layer × head heatmap of per-head scores, head selection, ablation and a linked drill-down."""
from __future__ import annotations

from typing import Sequence

import traitlets

from ..attention.edits import ABLATION_MODES
from ..errors import ProbeError
from ..result import top_cells
from ._base import WorkbenchWidget, esm, nested, optional_pair, unique_pairs
from .scores import head_scores


class HeadGrid(WorkbenchWidget):
    """Per-head scores as a layer × head heatmap.

    ``scores``: mapping name → ``[layer, head]`` tensor, or a ``RetrievalResult``, ``SinkResult``,
    ``DuoResult`` or a ``Capture`` (see :func:`head_scores`). Hover shows the value; the
    selector picks the metric; clicking a cell sets ``selected = [layer, head]``. With a ``model``
    and a ``prompt``: :attr:`attention` is an :class:`AttentionView` that follows the selection, and
    the ablation control ablates the heads in ``ablate`` (``HeadAblation``, ``mode`` zero / mean /
    uniform; ``mean`` uses the prompt's own tokens unless ``reference`` texts are given), re-runs the
    prompt and reports the effect (:func:`workbench.effects.edit_effect`: loss, logit and text change)."""

    _esm = esm("head_grid")
    heading = traitlets.Unicode("").tag(sync=True)
    metrics = traitlets.List(traitlets.Unicode()).tag(sync=True)
    metric = traitlets.Unicode("").tag(sync=True)
    values = traitlets.Dict().tag(sync=True)  # metric -> [layer][head] (None = NaN)
    selected = traitlets.List(traitlets.Int()).tag(sync=True)  # [layer, head] or []
    ablate = traitlets.List(traitlets.List(traitlets.Int())).tag(sync=True)  # heads to ablate
    mode = traitlets.Unicode("zero").tag(sync=True)
    modes = traitlets.List(traitlets.Unicode(), list(ABLATION_MODES)).tag(sync=True)
    can_ablate = traitlets.Bool(False).tag(sync=True)
    run = traitlets.Int(0).tag(sync=True)  # the view increments it to ask for an ablation run
    effect = traitlets.Dict().tag(sync=True)
    _inputs = ("metric", "selected", "ablate", "mode", "run")  # what the view sets; the rest is output

    def __init__(self, scores, *, model=None, prompt=None, title: str | None = None,
                 reference: Sequence[str] | None = None, max_new_tokens: int = 16, **kwargs):  # fmt: skip
        from ..capture import Capture

        if model is None and isinstance(scores, Capture):
            model = scores.model  # a capture knows its model
        self.scores = head_scores(scores, model)
        self.model, self.prompt, self.reference, self.max_new_tokens = model, prompt, reference, max_new_tokens
        self.last_effect = None
        if prompt is not None and model is None:
            raise ProbeError("HeadGrid: a prompt needs a model to run on; pass model=")
        names = list(self.scores)
        first = self.scores[names[0]]
        best = top_cells(first, 1)[0]
        self.attention = None  # the drill-down, made before the traits so that `selected` can drive it
        if model is not None and prompt is not None:
            from .attention_view import AttentionView

            self.attention = AttentionView(model, prompt, layer=best[0], head=best[1])
        super().__init__(
            heading=title or "", metrics=names, metric=names[0], values={n: nested(v) for n, v in self.scores.items()},
            selected=[best[0], best[1]], can_ablate=model is not None and prompt is not None, **kwargs,
        )  # fmt: skip

    def input_limit(self, name: str) -> int | None:
        L, H = self.shape
        return {"selected": 2, "ablate": L * H}.get(name)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.scores[self.metrics[0]].shape)

    def value(self, layer: int, head: int, metric: str | None = None) -> float:
        """The score the grid shows at (layer, head) for ``metric`` (default: the current one)."""
        return float(self.scores[metric or self.metric][layer, head])

    def top(self, k: int = 10, metric: str | None = None) -> list[tuple[int, int, float]]:
        """The ``k`` highest cells of ``metric`` (default: the current one) as (layer, head, value)."""
        return top_cells(self.scores[metric or self.metric], k)

    def view(self):
        """The grid with its attention drill-down underneath (an ipywidgets VBox), or the grid alone."""
        if self.attention is None:
            return self
        import ipywidgets

        return ipywidgets.VBox([self, self.attention])

    @traitlets.validate("metric")
    def _valid_metric(self, proposal):
        if proposal["value"] not in self.scores:
            raise ProbeError(f"HeadGrid: no metric {proposal['value'][:80]!r}; metrics: {list(self.scores)}")
        return proposal["value"]

    @traitlets.validate("selected")
    def _valid_selected(self, proposal):
        return optional_pair(proposal["value"], self._check)

    @traitlets.validate("ablate")
    def _valid_ablate(self, proposal):
        L, H = self.shape
        return unique_pairs(proposal["value"], self._check, L * H)

    @traitlets.validate("mode")
    def _valid_mode(self, proposal):
        if proposal["value"] not in ABLATION_MODES:
            raise ProbeError(f"HeadGrid: ablation mode must be one of {ABLATION_MODES}, got {proposal['value'][:80]!r}")
        return proposal["value"]

    def _check(self, head: list[int]) -> None:
        L, H = self.shape
        if len(head) != 2 or not (0 <= head[0] < L and 0 <= head[1] < H):
            raise ProbeError(f"HeadGrid: head {head} is not a [layer, head] cell of the {L} × {H} grid")

    @traitlets.observe("selected")
    def _follow(self, change):
        if self.attention is not None and self.selected:
            with self._action("fetching attention"):
                self.attention.show(*self.selected)

    @traitlets.observe("run")
    def _run_requested(self, change):
        with self._action("running ablation"):
            self.run_ablation()

    def run_ablation(self, heads: Sequence[Sequence[int]] | None = None, mode: str | None = None):
        """Ablate ``heads`` (default: ``ablate``, else the selected head) and report the effect on the
        prompt; returns the :class:`~workbench.effects.EditEffect` and shows it in the view."""
        from ..attention import HeadAblation
        from ..effects import edit_effect

        if not self.can_ablate:
            raise ProbeError("HeadGrid: ablation needs model= and prompt=")
        heads = [tuple(h) for h in (heads if heads is not None else self.ablate or ([self.selected] if self.selected else []))]
        if not heads:
            raise ProbeError("HeadGrid: no heads to ablate; click a cell or fill `ablate`")
        mode = mode or self.mode
        reference = list(self.reference) if self.reference else [self.prompt]
        edit = HeadAblation(heads, mode=mode, reference=reference if mode == "mean" else None)
        eff = edit_effect(self.model, self.prompt, edit, max_new_tokens=self.max_new_tokens)
        self.last_effect = eff
        self.effect = {
            "heads": [list(h) for h in heads], "mode": mode, "summary": eff.summary(),
            "loss_before": eff.loss_before, "loss_after": eff.loss_after, "delta_loss": eff.delta_loss,
            "max_logit_change": eff.max_logit_change, "mean_kl": eff.mean_kl,
            "text_before": eff.text_before, "text_after": eff.text_after, "diff": list(eff.diff),
        }  # fmt: skip
        return eff
