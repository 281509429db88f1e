"""Per-head scores ``{name: [layer, head] tensor}`` pulled out of workbench results, for :class:`HeadGrid`."""
from __future__ import annotations

from typing import Mapping

import torch

from ...base.errors import ProbeError


def head_scores(source, model=None) -> dict[str, torch.Tensor]:
    """Named ``[layer, head]`` score grids from a mapping or a result object.

    - any result with per-head grids (``result.grids()``): ``retrieval_score`` (Wu et al.), ``attn.alpha[k]``
      (Gu et al.'s α_k, mean over texts), ``duo_gate`` per KV head (repeated over each KV head's query heads
      when ``model`` is given);
    - a :class:`~workbench.Capture` with ``AttentionStats``: :func:`workbench.measure.heads.summary` (α of the first
      tracked keys, mean entropy, top-1 probability and head-output norm per head; NaN in layers not captured);
    - a mapping name → ``[layer, head]`` tensor or array."""
    from ...core.capture import Capture
    from ...measure.result import Result

    if isinstance(source, Result):
        out = source.grids()
        if source.grid_unit == "kv_head" and model is not None:
            out = {k: v.repeat_interleave(model.spec.group_size, dim=1) for k, v in out.items()}
    elif isinstance(source, Capture):
        from ...measure.heads import summary

        out = summary(source)
    elif isinstance(source, Mapping):
        out = dict(source)
    else:
        raise ProbeError(
            f"HeadGrid: cannot read per-head scores from {type(source).__name__}; pass a mapping name -> [layer, head] "
            "tensor, a result with per-head grids (RetrievalResult, SinkResult, DuoResult) or a Capture with AttentionStats"
        )
    return _checked(out, model)


def _checked(scores: dict, model) -> dict[str, torch.Tensor]:
    if not scores:
        raise ProbeError("HeadGrid: no scores given")
    out, shape = {}, None
    for name, v in scores.items():
        t = torch.as_tensor(v).detach().float().cpu() if not isinstance(v, torch.Tensor) else v.detach().float().cpu()
        if t.dim() != 2 or 0 in t.shape:
            raise ProbeError(f"HeadGrid: scores {name!r} must be a non-empty [layer, head] grid, got shape {tuple(t.shape)}")
        if shape is not None and t.shape != shape:
            raise ProbeError(f"HeadGrid: scores {name!r} has shape {tuple(t.shape)}, the others {tuple(shape)}")
        shape = t.shape
        out[str(name)] = t
    if model is not None and tuple(shape) != (model.spec.n_layers, model.spec.n_heads):
        raise ProbeError(
            f"HeadGrid: scores are {tuple(shape)} but the model has {model.spec.n_layers} layers × "
            f"{model.spec.n_heads} query heads; were they computed on another model?"
        )
    return out
