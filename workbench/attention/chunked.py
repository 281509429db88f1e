"""The chunked torch path: exact attention + per-head reductions, O(N·chunk) memory, never N×N.

Queries are processed in row blocks; for each block only the keys some row can see are scored
(causal rows skip the future, sliding-window rows the distant past). Every statistic is read off the
probabilities actually used, i.e. after edits, so a probe under an intervention reports what the
model did.

Two paths, same contract (:func:`chunked_attention` picks):
- :func:`flash_attention` (every request without probability edits): an online softmax over key tiles
  small enough to stay in cache, with a compiled C tile step (torch operations without a compiler);
  statistics of normalised probabilities take a second pass over the row block's tiles.
- :func:`general_attention` (probability edits: uniform, calibrate, mask_keys, streaming; and any
  differentiated forward): whole key rows per block, probabilities materialised and edited.
"""
from __future__ import annotations

from typing import Callable

import torch

from .flash import flash_attention, flash_covers
from .general import general_attention
from .request import LayerRequest


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    rows_visible: Callable[[int, int], torch.Tensor],
    q_pos: torch.Tensor,
    kv_offset: int = 0,
    sinks: torch.Tensor | None = None,
    request: LayerRequest | None = None,
    block_rows: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Attention output ``[B, Hq, M, Dv]`` and the statistics ``request`` asks for.

    ``rows_visible(i0, i1)`` gives bool visibility ``[B|1, 1, i1-i0, N]`` of query rows ``i0:i1``;
    ``q_pos`` is each query's absolute position, keys are at ``kv_offset + arange(N)``. Runs
    :func:`flash_attention` where it covers the request, else :func:`general_attention`.
    """
    request = request or LayerRequest()
    if flash_covers(request) and not _needs_grad(q, k, v, sinks):
        return flash_attention(
            q, k, v, scale=scale, rows_visible=rows_visible, q_pos=q_pos, kv_offset=kv_offset, sinks=sinks, request=request,
            block_rows=block_rows,
        )  # fmt: skip
    return general_attention(
        q, k, v, scale=scale, rows_visible=rows_visible, q_pos=q_pos, kv_offset=kv_offset, sinks=sinks, request=request,
        block_rows=block_rows,
    )  # fmt: skip


def _needs_grad(*ts) -> bool:
    """The flash path writes into reused buffers (no autograd): a differentiated forward takes the general path."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)
