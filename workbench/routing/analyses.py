"""Measurements over the routing a capture recorded.

All take a capture with ``Routing()`` (or its :class:`~workbench.routing.probe.RoutingRows`, e.g. a
``select``-ed subset) and return tensors indexed ``[layer, ...]`` over the recorded MoE layers or
pandas tables with a ``layer`` column.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..base.errors import ProbeError
from .probe import rows as _rows


def _routed(rec) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts ``[L, R, K]`` and the valid-slot mask (k may vary when TopK changed it)."""
    ex = rec.experts
    return ex, ex >= 0


# --- load and entropy ------------------------------------------------------------------------------


def activation_rate(rec) -> torch.Tensor:
    """Fraction of tokens whose top-k includes each expert ``[layer, expert]`` (sums to k per layer)."""
    rec = _rows(rec)
    ex, ok = _routed(rec)
    L, R, _ = ex.shape
    counts = torch.zeros(L, rec.n_experts)
    counts.scatter_add_(1, ex.clamp(min=0).reshape(L, -1), ok.reshape(L, -1).float())
    return counts / R


def expert_load(rec, *, weighted: bool = False) -> torch.Tensor:
    """Share of routed work per expert ``[layer, expert]``, each layer summing to 1: the fraction of
    (token, slot) assignments (``weighted=True``: of the routing weight mass)."""
    rec = _rows(rec)
    ex, ok = _routed(rec)
    L = ex.shape[0]
    w = rec.weights.nan_to_num(0.0) if weighted else ok.float()
    load = torch.zeros(L, rec.n_experts).scatter_add_(1, ex.clamp(min=0).reshape(L, -1), (w * ok).reshape(L, -1).float())
    return load / load.sum(1, keepdim=True)


def load_entropy(rec, *, weighted: bool = False) -> torch.Tensor:
    """Entropy (bits) of :func:`expert_load` per layer ``[layer]``: log2(E) = perfectly balanced, 0 = one expert."""
    p = expert_load(rec, weighted=weighted)
    return -(p * torch.log2(p.clamp_min(1e-300))).nan_to_num(0.0).sum(1)


def router_entropy(rec) -> torch.Tensor:
    """Mean per-token entropy (bits) of the softmax of the router logits ``[layer]``: how undecided the
    router is before top-k (for sigmoid routers this is still the softmax of the logits)."""
    rec = _rows(rec)
    p = torch.softmax(rec.logits.nan_to_num(-torch.inf), dim=-1)
    return -(p * torch.log2(p.clamp_min(1e-300))).sum(-1).mean(1)


# --- what routing depends on: token id, context, position ------------------------------------------------


def _entropy_bits(labels: torch.Tensor) -> float:
    _, counts = torch.unique(labels, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * torch.log2(p)).sum())


def _mutual_information(x: torch.Tensor, y: torch.Tensor) -> float:
    """Plug-in I(X; Y) in bits for integer labels."""
    joint = x.long() * (int(y.max()) + 1) + y.long()
    return _entropy_bits(x) + _entropy_bits(y) - _entropy_bits(joint)


def _choice(rec, choice: str) -> torch.Tensor:
    """Per layer and row, one integer label of the routing decision: top-1 expert or the top-k set."""
    ex = rec.experts
    if choice == "top1":
        return ex[..., 0]
    if choice == "set":
        s = ex.sort(-1).values.clamp(min=-1) + 1  # −1 pads → 0
        base = rec.n_experts + 1
        return (s * (base ** torch.arange(s.shape[-1]))).sum(-1)
    raise ProbeError(f"choice must be 'top1' or 'set', got {choice!r}")


def specialisation(
    rec,
    by: str | torch.Tensor = "token",
    *,
    choice: str = "top1",
    rows: torch.Tensor | None = None,
    min_count: int = 2,
    shuffles: int = 20,
    seed: int = 0,
):
    """How much of the routing decision a variable explains, per layer (OpenMoE's token-id analysis).

    ``by``: ``"token"`` (token id), ``"position"`` or any integer label per row ``[R]``. Rows whose
    label occurs fewer than ``min_count`` times are dropped (a label seen once explains its row
    trivially); ``rows`` (bool ``[R]``) restricts the rows, e.g. ``rec.positions > 0`` to leave out
    BOS, whose token id and position coincide. Columns: ``h_choice`` = H(choice) in bits; ``mi`` = I(choice; by); ``mi_null`` = mean
    I over ``shuffles`` random permutations of the labels (the plug-in estimator's chance level);
    ``context`` = H(choice | by) — routing is a deterministic function of token and context, so this
    is what the context adds beyond the label; ``score`` = (mi − mi_null) / (h_choice − mi_null)
    clipped to [0, 1]: 1 = the label determines the routing, ~0 = independent of it."""
    rec = _rows(rec)
    import pandas as pd

    if isinstance(by, str):
        labels = {"token": rec.token_ids, "position": rec.positions}.get(by)
        if labels is None:
            raise ProbeError(f"by must be 'token', 'position' or a label tensor, got {by!r}")
        if (labels < 0).any():
            raise ProbeError(f"some rows have no {by} (forward calls without input_ids); capture with token ids")
        name = by
    else:
        labels, name = torch.as_tensor(by).long().flatten(), "label"
        if labels.numel() != rec.token_ids.numel():
            raise ProbeError(f"by has {labels.numel()} labels but the record has {rec.token_ids.numel()} rows")
    selected = torch.ones_like(labels, dtype=torch.bool) if rows is None else torch.as_tensor(rows, dtype=torch.bool)
    if selected.shape != labels.shape:
        raise ProbeError(f"rows must be a bool mask of the record's {labels.numel()} rows")
    _, inverse, counts = torch.unique(labels[selected], return_inverse=True, return_counts=True)
    keep = selected.clone()
    keep[selected] = counts[inverse] >= min_count
    if int(keep.sum()) < 2:
        raise ProbeError(
            f"specialisation by {name}: no {name} occurs {min_count}+ times; capture more text "
            "(several sequences for positions)"
        )
    x = torch.unique(labels[keep], return_inverse=True)[1]
    y_all = _choice(rec, choice)[:, keep]
    g = torch.Generator().manual_seed(seed)
    table = []
    for li, layer in enumerate(rec.layers):
        y = torch.unique(y_all[li], return_inverse=True)[1]
        h = _entropy_bits(y)
        mi = _mutual_information(x, y)
        null = sum(_mutual_information(x[torch.randperm(len(x), generator=g)], y) for _ in range(shuffles)) / max(shuffles, 1)
        score = float("nan") if h - null <= 1e-12 else min(1.0, max(0.0, (mi - null) / (h - null)))
        table.append(dict(layer=layer, by=name, rows=len(x), h_choice=h, mi=mi, mi_null=null, context=h - mi, score=score))
    return pd.DataFrame(table)


def token_specialisation(rec, **kw):
    """OpenMoE token-id specialisation: :func:`specialisation` by token id (``context`` column: what the
    same token's different contexts add)."""
    return specialisation(rec, "token", **kw)


def position_dependence(rec, **kw):
    """:func:`specialisation` by absolute position: 1 = routing is a function of position alone."""
    return specialisation(rec, "position", **kw)


# --- structure between experts and layers ------------------------------------------------------------------


def coactivation(rec, *, normalize: str | None = None) -> torch.Tensor:
    """How often experts are chosen together ``[layer, expert, expert]``: counts of tokens with both in
    their top-k (diagonal: tokens choosing the expert). ``normalize="conditional"``: row i is
    P(j chosen | i chosen); ``"joint"``: divided by the number of tokens."""
    rec = _rows(rec)
    ex, ok = _routed(rec)
    L, R, _ = ex.shape
    onehot = torch.zeros(L, R, rec.n_experts).scatter_(2, ex.clamp(min=0), ok.float())
    co = torch.einsum("lri,lrj->lij", onehot, onehot)
    if normalize is None:
        return co
    if normalize == "conditional":
        return co / torch.diagonal(co, dim1=1, dim2=2)[..., None]
    if normalize == "joint":
        return co / R
    raise ProbeError(f"normalize must be None, 'conditional' or 'joint', got {normalize!r}")


def transitions(rec, *, choice: str = "top1", normalize: bool = True) -> torch.Tensor:
    """Routing from each recorded MoE layer to the next ``[layer_pair, expert, expert]``: counts of
    tokens going from expert i (layer a) to expert j (the next MoE layer). ``choice="top1"`` uses the
    top-1 experts; ``"all"`` counts every (slot, slot) pair. ``normalize``: rows become
    P(j at the next layer | i) (NaN where i was never chosen)."""
    rec = _rows(rec)
    ex, ok = _routed(rec)
    L = ex.shape[0]
    if L < 2:
        raise ProbeError("transitions need at least two recorded MoE layers")
    E = rec.n_experts
    if choice == "top1":
        ex, ok = ex[..., :1], ok[..., :1]
    elif choice != "all":
        raise ProbeError(f"choice must be 'top1' or 'all', got {choice!r}")
    out = torch.zeros(L - 1, E, E)
    for a in range(L - 1):
        src, dst = ex[a], ex[a + 1]
        w = (ok[a][:, :, None] & ok[a + 1][:, None, :]).float()
        flat = (src.clamp(min=0)[:, :, None] * E + dst.clamp(min=0)[:, None, :]).flatten()
        out[a] = torch.zeros(E * E).scatter_add_(0, flat, w.flatten()).view(E, E)
    return out / out.sum(-1, keepdim=True) if normalize else out


# --- margins: how close decisions are to flipping ----------------------------------------------------------


def margin_histogram(rec, bins: int | Sequence[float] = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of finite routing margins per layer: ``(counts [layer, bin], edges [bins+1])``;
    ``bins``: a count (edges span the finite margins) or explicit edges."""
    rec = _rows(rec)
    m = rec.margin
    finite = m[torch.isfinite(m)]
    if finite.numel() == 0:
        raise ProbeError("no finite margins recorded (every layer uses all its experts?)")
    if isinstance(bins, int):
        edges = torch.linspace(float(finite.min()), float(finite.max()) + 1e-12, bins + 1)
    else:
        edges = torch.as_tensor(list(bins), dtype=torch.float32)
    counts = torch.stack([torch.histogram(row[torch.isfinite(row)].float(), bins=edges).hist for row in m])
    return counts, edges


def flip_risk(rec, threshold: float) -> torch.Tensor:
    """Fraction of tokens per layer ``[layer]`` whose margin is below ``threshold`` (in the rule's score
    units): decisions a perturbation of that size could flip."""
    rec = _rows(rec)
    if threshold <= 0:
        raise ProbeError(f"threshold must be > 0, got {threshold}")
    m = rec.margin
    return (m < threshold).float().mean(1)


# --- behaviour: which experts light up for one prompt set and not another --------------------------------


def risk_difference(rec_a, rec_b) -> torch.Tensor:
    """SteerMoE risk difference ``[layer, expert]``: activation rate on set A minus on set B (tokens whose
    top-k includes the expert). Positive = the expert lights up for A's behaviour."""
    rec_a, rec_b = _rows(rec_a), _rows(rec_b)
    if tuple(rec_a.layers) != tuple(rec_b.layers) or rec_a.n_experts != rec_b.n_experts:
        raise ProbeError("risk_difference: the two records must come from the same model and layers")
    return activation_rate(rec_a) - activation_rate(rec_b)


def behaviour_experts(rec_a, rec_b, n: int = 10, *, sign: int = 1) -> list[tuple[int, int]]:
    """MoTE-style: the ``n`` (layer, expert) pairs whose activation rises most from B to A (``sign=-1``:
    falls most). Pass the result to :class:`~workbench.routing.edits.ExpertMask` to deactivate them."""
    rec_a, rec_b = _rows(rec_a), _rows(rec_b)
    if n < 1:
        raise ProbeError(f"n must be ≥ 1, got {n}")
    rd = risk_difference(rec_a, rec_b) * (1 if sign >= 0 else -1)
    flat = rd.flatten()
    top = torch.topk(flat, min(n, flat.numel())).indices
    E = rd.shape[1]
    return [(rec_a.layers[int(i) // E], int(i) % E) for i in top]


def risk_table(rec_a, rec_b):
    """:func:`risk_difference` as a pandas table (layer, expert, rate_a, rate_b, risk_difference), largest |rd| first."""
    rec_a, rec_b = _rows(rec_a), _rows(rec_b)
    import pandas as pd

    ra, rb = activation_rate(rec_a), activation_rate(rec_b)
    L, E = ra.shape
    li, ei = torch.meshgrid(torch.arange(L), torch.arange(E), indexing="ij")
    df = pd.DataFrame(
        {
            "layer": torch.tensor(rec_a.layers)[li.flatten()].numpy(),
            "expert": ei.flatten().numpy(),
            "rate_a": ra.flatten().numpy(),
            "rate_b": rb.flatten().numpy(),
            "risk_difference": (ra - rb).flatten().numpy(),
        }
    )
    return df.sort_values("risk_difference", ascending=False, key=abs).reset_index(drop=True)


__all__ = [
    "activation_rate", "behaviour_experts", "coactivation", "expert_load", "flip_risk", "load_entropy",
    "margin_histogram", "position_dependence", "risk_difference", "risk_table", "router_entropy",
    "specialisation", "token_specialisation", "transitions",
]  # fmt: skip
