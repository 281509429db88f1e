"""The routers' top-k rules, implemented once: capture recomputes the model's decisions with them and
edits re-route with them, so a recorded decision and an edited one come from the same code.

Each rule maps router logits ``[N, E]`` to the chosen experts ``[N, k]`` (best first), their mixing
weights, the rule's ranking score of every expert and the routing margin. Constraints are optional:
``allowed`` (False = expert deactivated), ``forced`` (True = expert must be chosen) and ``k``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.errors import ProbeError
from ..models.spec import RouterSpec

INF = float("inf")


@dataclass(frozen=True)
class RuleInputs:
    """What a rule needs besides the logits; read from the router module at run time."""

    bias: torch.Tensor | None = None  # DeepSeek-V3's e_score_correction_bias [E]
    jitter_eps: float = 0.0  # PhiMoE's router_jitter_noise (the SparseMixer threshold in eval mode)


@dataclass(frozen=True)
class Decision:
    """A routing decision for N tokens. ``indices``/``weights`` are ``[N, k]`` in rank order;
    ``scores`` ``[N, E]`` is what the rule ranks experts by (−inf: excluded, +inf: forced);
    ``margin`` ``[N]`` is the k-th minus the (k+1)-th score (inf when nothing could take the k-th place)."""

    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    margin: torch.Tensor


def rule_inputs(router: torch.nn.Module) -> RuleInputs:
    """The extra rule inputs a ``transformers`` router module carries (by their transformers names)."""
    bias = getattr(router, "e_score_correction_bias", None)
    return RuleInputs(
        bias=None if bias is None else bias.detach().float().cpu().clone(),
        jitter_eps=float(getattr(router, "router_jitter_noise", 0.0) or 0.0),
    )


def route(
    logits: torch.Tensor,
    rs: RouterSpec,
    inputs: RuleInputs = RuleInputs(),
    *,
    k: int | None = None,
    allowed: torch.Tensor | None = None,
    forced: torch.Tensor | None = None,
) -> Decision:
    """Route ``logits`` ``[N, E]`` with the rule of ``rs``. Computed in float32 (as the routers do)."""
    k = rs.top_k if k is None else int(k)
    x = logits.detach().float()
    n, e = x.shape
    allowed = torch.ones(e, dtype=torch.bool, device=x.device) if allowed is None else allowed.to(x.device)
    forced = torch.zeros(e, dtype=torch.bool, device=x.device) if forced is None else forced.to(x.device)
    allowed, forced = allowed.expand(n, e), forced.expand(n, e)
    fn = _RULES.get(rs.rule)
    if fn is None:
        raise ProbeError(f"router rule {rs.rule!r} is not implemented; known rules: {sorted(_RULES)}")
    return fn(x, rs, inputs, k, allowed, forced)


def _choose(choice: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``choice`` (sorted, best first) and the margin k-th − (k+1)-th."""
    vals, idx = torch.topk(choice, k, dim=-1)
    if choice.shape[-1] > k:
        nxt = torch.topk(choice, k + 1, dim=-1).values[:, k]
        margin = vals[:, k - 1] - nxt
    else:
        margin = torch.full_like(vals[:, 0], INF)
    return idx, margin.nan_to_num(nan=INF)  # inf − inf: two forced experts, nothing can displace them


def _softmax_topk(x, rs, inputs, k, allowed, forced) -> Decision:
    """Mixtral, Qwen-MoE, OLMoE: softmax over all experts, top-k of the probabilities, optionally
    renormalised over the chosen k. A deactivated expert's logit is −inf (it leaves the softmax)."""
    probs = torch.softmax(x.masked_fill(~allowed, -INF), dim=-1)
    choice = probs.masked_fill(~allowed, -INF).masked_fill(forced, INF)
    idx, margin = _choose(choice, k)
    w = probs.gather(1, idx)
    if rs.norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return Decision(idx, w, choice, margin)


def _topk_softmax(x, rs, inputs, k, allowed, forced) -> Decision:
    """GPT-OSS, Granite-MoE: top-k of the raw logits, softmax over the chosen k."""
    choice = x.masked_fill(~allowed, -INF).masked_fill(forced, INF)
    idx, margin = _choose(choice, k)
    return Decision(idx, torch.softmax(x.gather(1, idx), dim=-1), choice, margin)


def _sigmoid_grouped(x, rs, inputs, k, allowed, forced) -> Decision:
    """DeepSeek-V3: sigmoid scores; choice = score + e_score_correction_bias; keep the ``topk_group``
    groups whose two best choice scores sum highest; top-k inside them; weights are the *unbiased*
    scores of the chosen, renormalised (``norm_topk_prob``) and times ``routed_scaling_factor``.
    Margin: the smaller of the expert margin inside the kept groups and half the group margin
    (a group score sums two expert scores, so half its margin is the per-expert change that flips it)."""
    n, e = x.shape
    scores = torch.sigmoid(x)
    choice = scores + (inputs.bias.to(x.device) if inputs.bias is not None else 0.0)
    choice = choice.masked_fill(~allowed, -INF)
    groups = rs.n_group or 1
    group_scores = choice.view(n, groups, e // groups).topk(min(2, e // groups), dim=-1).values.sum(-1)
    group_scores = group_scores.masked_fill(forced.view(n, groups, -1).any(-1), INF)  # a forced expert keeps its group
    n_keep = rs.topk_group or groups
    group_idx, group_margin = _choose(group_scores, n_keep)
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    keep = keep[:, :, None].expand(n, groups, e // groups).reshape(n, e)
    choice = choice.masked_fill(~keep, -INF).masked_fill(forced, INF)
    idx, margin = _choose(choice, k)
    w = scores.gather(1, idx)
    if rs.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * (rs.routed_scaling_factor if rs.routed_scaling_factor is not None else 1.0)
    return Decision(idx, w, choice, torch.minimum(margin, group_margin / 2))


def _sparsemixer(x, rs, inputs, k, allowed, forced) -> Decision:
    """PhiMoE's SparseMixer in eval mode, for any k: experts are taken best logit first; each chosen
    expert's weight is the softmax, over the not-yet-chosen experts whose logit lies within the
    relative threshold 2·jitter_eps of the chosen one, evaluated at the chosen one. (The model's own
    code does this for k = 2; training mode samples instead and is not reproduced.)"""
    masked = x.masked_fill(~allowed, -INF)
    choice = masked.masked_fill(forced, INF)
    idx, margin = _choose(choice, k)
    weights = []
    remaining = masked
    for j in range(k):
        sel = idx[:, j : j + 1]
        thr = x.gather(1, sel)
        factor = x.abs().clamp(min=thr)
        far = ((thr - x) / factor) > (2 * inputs.jitter_eps)
        gates = torch.softmax(remaining.masked_fill(far, -INF), dim=-1)
        weights.append(gates.gather(1, sel))
        remaining = remaining.scatter(1, sel, -INF)
    return Decision(idx, torch.cat(weights, dim=1), choice, margin)


_RULES = {
    "softmax_topk": _softmax_topk,
    "topk_softmax": _topk_softmax,
    "sigmoid_grouped": _sigmoid_grouped,
    "sparsemixer": _sparsemixer,
}
