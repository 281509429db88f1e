"""``HeadGrid``: a layer × head heatmap of per-head scores, head selection, ablation and a linked drill-down.

One selection: ``selected`` (the head looked at) is shared with the drill-down view (click a cell or a
pattern thumbnail — both follow), and ``ablate`` (the edit set; empty: the selected head) is what
*run ablation* edits."""
from __future__ import annotations

from typing import Sequence

import traitlets

from ...attention.edits import ABLATION_MODES
from ...base.errors import ProbeError, WorkbenchError
from ...measure.result import top_cells
from ._base import WorkbenchWidget, esm, nested, optional_pair, unique_pairs
from .scores import head_scores


class HeadGrid(WorkbenchWidget):
    """Per-head scores as a layer × head heatmap.

    ``scores``: mapping name → ``[layer, head]`` tensor, or a ``RetrievalResult``, ``SinkResult``,
    ``DuoResult`` or a ``Capture`` (see :func:`head_scores`). Hover shows the value; the
    selector picks the metric (capture names: ``attn.alpha[0]``, ``attn.entropy``, … — the same in the
    dashboard); clicking a cell sets ``selected = [layer, head]``; shift-click adds it to ``ablate``. With a
    ``model`` and a ``prompt``: :attr:`attention` is a :class:`PatternView` (every head's pattern on short
    prompts, the row view on long ones) linked to the same ``selected``, and the ablation control ablates the
    heads in ``ablate`` (or the selected head; ``HeadAblation``, ``mode`` zero / mean / uniform; ``mean`` uses
    the prompt's own tokens unless ``reference`` texts are given), re-runs the prompt and reports the effect
    on the user's own tokens (:func:`workbench.effects.prompt_effect`: loss, per-token Δloss, logit
    change, the continuation as a word diff, the heads named)."""

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
    editable = traitlets.Bool(False).tag(sync=True)  # shift-click collects heads in `ablate` (default: can_ablate)
    run = traitlets.Int(0).tag(sync=True)  # the view increments it to ask for an ablation run
    effect = traitlets.Dict().tag(sync=True)
    _inputs = ("metric", "selected", "ablate", "mode", "run")  # what the view sets; the rest is output

    def __init__(self, scores, *, model=None, prompt=None, title: str | None = None,
                 reference: Sequence[str] | None = None, max_new_tokens: int = 16, chat: bool = False, **kwargs):  # fmt: skip
        from ...core.capture import Capture

        if model is None and isinstance(scores, Capture):
            model = scores.model  # a capture knows its model
        self.scores = head_scores(scores, model)
        self.model, self.prompt, self.reference, self.max_new_tokens, self.chat = model, prompt, reference, max_new_tokens, chat
        self.last_effect = None
        self.last_prompt_effect = None
        if prompt is not None and model is None:
            raise ProbeError("HeadGrid: a prompt needs a model to run on; pass model=")
        names = list(self.scores)
        first = self.scores[names[0]]
        best = top_cells(first, 1)[0]
        self.attention = None  # the drill-down, made before the traits so that `selected` can drive it
        if model is not None and prompt is not None:
            from .pattern_view import PatternView

            self.attention = PatternView(model, prompt, layer=best[0], head=best[1], chat=chat)
        super().__init__(
            heading=title or "", metrics=names, metric=names[0], values={n: nested(v) for n, v in self.scores.items()},
            selected=[best[0], best[1]], can_ablate=model is not None and prompt is not None,
            **{"editable": model is not None and prompt is not None, **kwargs},
        )  # fmt: skip
        if self.attention is not None:  # one selection: the grid and the drill-down show the same head
            self._link = traitlets.link((self, "selected"), (self.attention, "selected"))

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

    @traitlets.observe("run")
    def _run_requested(self, change):
        try:
            heads, mode = self._edit_heads(None), self.mode
        except WorkbenchError as e:  # from the browser: shown in the view, not raised
            self.error = str(e)
            return
        self._compute(f"ablating {', '.join(f'L{l}H{h}' for l, h in heads)}", lambda: self._measure(heads, mode),
                      self._show_effect)  # fmt: skip

    def _edit_heads(self, heads) -> list[tuple[int, int]]:
        if not self.can_ablate:
            raise ProbeError("HeadGrid: ablation needs model= and prompt=")
        heads = [tuple(h) for h in (heads if heads is not None else self.ablate or ([self.selected] if self.selected else []))]
        if not heads:
            raise ProbeError("HeadGrid: no heads to ablate; click a cell or fill `ablate`")
        return self.model.spec.heads(heads, what="HeadGrid")

    def _measure(self, heads, mode):
        from ...attention import HeadAblation
        from ...measure.effects import prompt_effect

        reference = list(self.reference) if self.reference else [self.prompt]
        edit = HeadAblation(heads, mode=mode, reference=reference if mode == "mean" else None)
        return heads, mode, prompt_effect(self.model, self.prompt, [edit], chat=self.chat, max_new_tokens=self.max_new_tokens,
                                          cancel=self.stop_event)  # fmt: skip

    def _show_effect(self, result) -> None:
        heads, mode, pe = result
        self.last_prompt_effect = pe
        self.last_effect = pe.edit_effect()
        self.effect = {"heads": [list(h) for h in heads], "head_names": [f"L{l}H{h}" for l, h in heads], "mode": mode,
                       **pe.payload()}  # fmt: skip

    def run_ablation(self, heads: Sequence[Sequence[int]] | None = None, mode: str | None = None):
        """Ablate ``heads`` (default: ``ablate``, else the selected head) and report the effect on the prompt's
        own tokens; returns the :class:`~workbench.effects.EditEffect` and shows it in the view (per-token Δloss,
        word diff of the continuations; :attr:`last_prompt_effect` holds the per-token numbers)."""
        heads = self._edit_heads(heads)
        self._show_effect(self._measure(heads, mode or self.mode))
        return self.last_effect
