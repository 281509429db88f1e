"""SCMoE self-contrast decoding (Shi et al. 2024, "Unchosen Experts Can Contribute Too"): the same
model routed two ways — strong (the model's own top-k) and weak (e.g. top-1) — and the next token
chosen by ``(1+β)·log p_strong − β·log p_weak`` among the tokens the strong routing finds plausible
(``p_strong ≥ plausibility · max p_strong``; the paper's α, named here so that α means only
Gu et al.'s sink attention in this library)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..base.errors import ProbeError
from .edits import TopK


def contrastive_logits(strong: torch.Tensor, weak: torch.Tensor, *, beta: float = 0.5, plausibility: float = 0.1) -> torch.Tensor:
    """SCMoE scores ``[..., vocab]`` from strong and weak next-token logits. Log-probabilities are used
    (a per-step constant away from raw logits, so the argmax is the same); tokens outside the
    plausibility set get −inf."""
    if beta < 0:
        raise ProbeError(f"SCMoE: beta must be ≥ 0, got {beta}")
    if not 0 <= plausibility <= 1:
        raise ProbeError(f"SCMoE: plausibility must lie in [0, 1], got {plausibility}")
    ls, lw = torch.log_softmax(strong.float(), -1), torch.log_softmax(weak.float(), -1)
    plausible = ls >= ls.max(-1, keepdim=True).values + torch.log(torch.tensor(plausibility)) if plausibility > 0 else torch.ones_like(ls, dtype=torch.bool)
    return ((1 + beta) * ls - beta * lw).masked_fill(~plausible, -torch.inf)


@torch.no_grad()
def scmoe_generate(
    model,
    text,
    *,
    beta: float = 0.5,
    plausibility: float = 0.1,
    weak: Sequence | None = None,
    max_new_tokens: int = 32,
    chat: bool = True,
) -> str:
    """Greedy SCMoE decoding; ``weak`` are the edits that make the weak routing (default ``[TopK(1)]``).
    Two KV caches (strong and weak) advance in step. Returns only the new text."""
    from ..core.capture import intervene
    from .probe import require_moe

    require_moe(model, "SCMoE")
    weak = [TopK(1)] if weak is None else list(weak)
    if max_new_tokens < 1:
        raise ProbeError(f"SCMoE: max_new_tokens must be ≥ 1, got {max_new_tokens}")
    contrastive_logits(torch.zeros(1, 2), torch.zeros(1, 2), beta=beta, plausibility=plausibility)  # validate before running
    ids = model.encode(text, chat=chat)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    strong_cache = weak_cache = None
    step, new = ids, []
    for _ in range(max_new_tokens):
        s = model.hf(input_ids=step, past_key_values=strong_cache, use_cache=True)
        with intervene(model, *weak):
            w = model.hf(input_ids=step, past_key_values=weak_cache, use_cache=True)
        strong_cache, weak_cache = s.past_key_values, w.past_key_values
        nxt = int(contrastive_logits(s.logits[0, -1], w.logits[0, -1], beta=beta, plausibility=plausibility).argmax())
        new.append(nxt)
        if eos is not None and nxt == eos:
            break
        step = torch.tensor([[nxt]], device=ids.device)
    return model.tokenizer.decode(new, skip_special_tokens=True)
