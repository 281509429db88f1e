"""``capture`` and ``intervene``: context managers that attach probes and edits to a model."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import ProbeError


@dataclass(eq=False)
class Capture:
    """Results of one ``with workbench.capture(...)`` block, one record per probe kind."""

    model: object
    records: list = field(default_factory=list)

    def _one(self, kind: str):
        found = [r for r in self.records if type(r).__name__ == kind]
        if not found:
            raise ProbeError(f"this capture has no {kind}; pass the matching probe to workbench.capture")
        return found[0]

    @property
    def attention(self):
        """The :class:`AttentionRecord` of the ``AttentionStats`` probe."""
        return self._one("AttentionRecord")

    @property
    def routing(self):
        """The :class:`RoutingRecord` of the ``Routing`` probe."""
        return self._one("RoutingRecord")

    @property
    def provenance(self):
        return self.model.provenance


def _state(model):
    state = getattr(model.hf, "_workbench_state", None)
    if state is None:
        raise ProbeError("this model does not run through the workbench backend; load it with workbench.load()")
    return state


@contextmanager
def _attached(model, items: list) -> Iterator[None]:
    """Attach bound probes/edits. Attention ones are planners the backend consults per layer
    (``plan``/``receive``); others (router hooks) manage their own hooks via ``attach``/``detach``."""
    planners = [p for p in items if hasattr(p, "plan")]
    hookers = [p for p in items if hasattr(p, "attach")]
    state = _state(model) if planners else None
    check = _length_check(planners)
    hook = model.hf.register_forward_pre_hook(check, with_kwargs=True) if check else None
    if state is not None:
        state.planners.extend(planners)
    attached = []
    try:
        for p in hookers:
            p.attach(model)
            attached.append(p)
        yield
    finally:
        for p in reversed(attached):
            p.detach()
        if hook is not None:
            hook.remove()
        if state is not None:
            for p in planners:
                state.planners.remove(p)


def _length_check(planners):
    """Reject key positions beyond the sequence before the model runs a single layer."""
    wanted = [int(p.explicit_keys.max()) for p in planners if getattr(p, "explicit_keys", None) is not None and p.explicit_keys.numel()]
    needed = max(wanted, default=-1)
    if needed < 0:
        return None

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        length = ids.shape[-1] if ids is not None else (emb.shape[1] if emb is not None else None)
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if length is not None and needed >= past + length:
            raise ProbeError(f"key position {needed} requested but the sequence has only {past + length} tokens")

    return hook


@contextmanager
def capture(model, *probes) -> Iterator[Capture]:
    """Record what ``probes`` ask for while the block runs the model (forward or generate).

    >>> with wb.capture(m, wb.AttentionStats(sink_keys=4)) as cap:
    ...     m.forward_text("The quick brown fox")
    >>> cap.attention.alpha()   # [layer, head, key]
    """
    if not probes:
        raise ProbeError("capture needs at least one probe, e.g. workbench.AttentionStats()")
    records = [p.bind(model) for p in probes]  # validation happens here, before any forward pass
    cap = Capture(model=model, records=records)
    with _attached(model, records):
        yield cap


@contextmanager
def intervene(model, *edits) -> Iterator[list]:
    """Apply ``edits`` inside the block: attention edits (HeadAblation, SinkCalibration, SpanMask,
    StreamingHeads) and routing edits compose freely."""
    if not edits:
        raise ProbeError("intervene needs at least one edit, e.g. workbench.HeadAblation([(12, 3)])")
    bound = [e.bind(model) for e in edits]
    with _attached(model, bound):
        yield bound


class _OutputMeans:
    """Planner that sums each head's attention output over reference tokens."""

    def __init__(self, layers):
        self.layers = set(layers)
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def plan(self, layer, n_queries):
        from .attention.plan import LayerPlan

        return LayerPlan(record_outputs=True) if layer in self.layers else None

    def receive(self, layer, stats, q_pos):
        self.sums[layer] = self.sums.get(layer, 0) + stats["output_sum"].cpu()
        self.counts[layer] = self.counts.get(layer, 0) + int(stats["output_count"])


@torch.no_grad()
def head_output_means(model, texts, layers=None) -> dict[tuple[int, int], torch.Tensor]:
    """Mean attention output of every head over the tokens of ``texts`` (for ``mode="mean"`` ablation)."""
    if isinstance(texts, str) or not texts:
        raise ProbeError("reference must be a non-empty list of texts")
    rec = _OutputMeans(range(model.spec.n_layers) if layers is None else layers)
    with _attached(model, [rec]):
        for t in texts:
            model.forward_text(t)
    return {(l, h): (rec.sums[l][h] / rec.counts[l]).float() for l in rec.sums for h in range(model.spec.n_heads)}
