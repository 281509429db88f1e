"""Exact attention rows of chosen query tokens, fetched through the backend's tiles (never an N×N matrix)."""
from __future__ import annotations

from typing import Sequence

import torch

from ...base.errors import ProbeError


class _Stop(Exception):
    """Raised after the last wanted layer ran: later layers cannot change its attention."""


@torch.no_grad()
def attention_rows(model, ids: torch.Tensor, layers: Sequence[int], queries: Sequence[int]) -> dict[tuple[int, int], torch.Tensor]:
    """``{(layer, query): probabilities [head, query + 1]}`` for each layer and query position of ``ids [1, T]``.

    One exact tile per query row, from one forward pass that is as short as causality allows: only
    tokens up to the last query, and only layers up to the last wanted one."""
    from ...attention import AttentionStats
    from ...core.capture import capture
    from ...core.hooks import Hook

    layers = sorted({int(l) for l in layers})
    if not layers:
        raise ProbeError("attention_rows: no layers to fetch")
    for layer in layers:
        model.spec.check_head(layer, 0, what="attention_rows")
    queries = sorted({int(q) for q in queries})
    T = ids.shape[-1]
    if not queries or queries[0] < 0 or queries[-1] >= T:
        raise ProbeError(f"attention_rows: query positions must lie in 0..{T - 1}, got {queries[:8]}")
    probe = AttentionStats(sink_keys=0, topk=1, layers=layers, tiles=[(q, q + 1, 0, q + 1) for q in queries])
    stop = Hook(f"blocks.{layers[-1]}.hook_attn_out", _stop)  # later layers cannot change these rows
    with capture(model, probe, stop, names_filter="blocks.*.attn.tile.*") as cap:
        try:
            model.hf(input_ids=ids[:, : queries[-1] + 1].to(model.device), use_cache=False)
        except _Stop:
            pass
    out = {}
    for i, q in enumerate(queries):
        for l in layers:
            out[(l, q)] = cap[f"blocks.{l}.attn.tile.{i}"][0, :, 0].clone()  # [head, q + 1]
    return out


def _stop(value, name):
    raise _Stop
