"""Retrieval vs streaming heads (DuoAttention, Xiao et al. 2024).

One gate α ∈ [0, 1] per KV head mixes full attention with streaming attention (the first ``sink``
keys + the last ``recent`` keys): ``out = α·full + (1−α)·streaming``. Gates are trained by MSE
distillation of the final hidden states on the answer tokens of synthetic passkey data, plus
``0.05 · Σ|α|``; KV heads with α ≥ 0.5 are retrieval heads. The paper's sink 64 + recent 256 at
long contexts is scaled to the lengths used here (CPU: a few hundred tokens).
"""
from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import niah
from .attention import StreamingHeads
from .attention.plan import LayerPlan
from .capture import intervene
from .hooks import Bound, Edit
from .display import Figures
from .errors import ProbeError

L1_WEIGHT = 0.05
RETRIEVAL_GATE = 0.5


def streaming_visibility(q_pos: torch.Tensor, key_pos: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """``[M, N]`` True where a streaming head may look: the first ``sink`` keys or the last ``recent``."""
    return (key_pos[None, :] < sink) | (key_pos[None, :] > q_pos[:, None] - recent)


@dataclass(frozen=True, eq=False)
class GatedMix(Edit):
    """Every layer's attention becomes ``α·full + (1−α)·streaming`` with a differentiable gate ``alpha``
    ``[layer, kv_head]`` (DuoAttention's training-time mix; gradients flow into ``alpha``)."""

    alpha: torch.Tensor
    sink: int
    recent: int
    label = "duo-gated-mix"

    def bind(self, model) -> "_BoundGates":
        if tuple(self.alpha.shape) != (model.spec.n_layers, model.spec.n_kv_heads):
            raise ProbeError(f"GatedMix: alpha must be [layer, kv_head] = {(model.spec.n_layers, model.spec.n_kv_heads)}")
        return _BoundGates(self.alpha, model.spec, self.sink, self.recent)


class _BoundGates(Bound):
    is_edit = True
    label = GatedMix.label

    def __init__(self, alpha: torch.Tensor, spec, sink: int, recent: int):
        self.alpha, self.group, self.sink, self.recent = alpha, spec.group_size, sink, recent
        self.sites = frozenset(("attn", l) for l in range(spec.n_layers))

    def attention(self, layer: int, call) -> LayerPlan:
        a = self.alpha[layer].clamp(0, 1).repeat_interleave(self.group)  # per query head

        def gated(q, k, v, scale, dense, q_pos, key_pos):
            rep = q.shape[1] // k.shape[1]
            k2, v2 = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            if dense is None:  # pure causal: build it (small lengths only on this training path)
                dense = (key_pos[None, :] <= q_pos[:, None])[None, None]
            dense = dense.bool() if dense.dtype == torch.bool else dense > torch.finfo(dense.dtype).min / 2
            full = F.scaled_dot_product_attention(q, k2, v2, attn_mask=dense, scale=scale)
            stream_mask = dense & streaming_visibility(q_pos, key_pos, self.sink, self.recent)[None, None]
            stream = F.scaled_dot_product_attention(q, k2, v2, attn_mask=stream_mask, scale=scale)
            g = a.to(q.dtype).view(1, -1, 1, 1)
            return g * full + (1 - g) * stream

        return LayerPlan(gated=gated)


_COLOURS = ("amber", "crimson", "silver", "violet", "olive", "golden", "scarlet", "indigo", "ivory", "copper")
_ANIMALS = ("otter", "falcon", "badger", "walrus", "heron", "lynx", "beetle", "salmon", "gecko", "bison")


def passkey_sample(model, length: int, rng: random.Random) -> tuple[torch.Tensor, int]:
    """Synthetic passkey data: haystack prose with a two-word key stated in it; the prompt ends with
    the question and the answer (the key), teacher-forced. Returns ids and where the answer starts."""
    # words, not digits: a 135M model copies word keys reliably and five-digit keys not at all
    key = f"{rng.choice(_COLOURS)} {rng.choice(_ANIMALS)}"
    needle = niah.Needle("passkey", f"The secret password of the expedition is {key}.", "What is the secret password of the expedition?", key)
    case = niah.build_case(model, needle, length - 12, rng.uniform(5, 60), max_new_tokens=12)
    answer = model.tokenizer.encode(f"The secret password of the expedition is {key}.", add_special_tokens=False)
    ids = torch.cat([case.input_ids, torch.tensor([answer])], dim=1)
    return ids, case.input_ids.shape[1]


@dataclass
class DuoResult(Figures):
    """Trained gates ``[layer, kv_head]`` and the training curve."""

    alpha: torch.Tensor
    losses: list[float]
    sink: int
    recent: int
    provenance: object

    def retrieval_kv_heads(self, threshold: float = RETRIEVAL_GATE) -> list[tuple[int, int]]:
        return [tuple(x) for x in (self.alpha >= threshold).nonzero().tolist()]

    def _figures(self) -> dict:
        from . import report

        return {
            "gates": lambda: report.head_grid(self.alpha, "DuoAttention gate α per KV head (≥ 0.5: retrieval)", colorbar="α",
                                              zmax=1, heads="KV head"),
            "losses": lambda: report.curve(self.losses, "DuoAttention gate training loss"),
        }  # fmt: skip

    def to_frame(self) -> pd.DataFrame:
        L, H = self.alpha.shape
        return pd.DataFrame({"layer": [l for l in range(L) for _ in range(H)], "kv_head": list(range(H)) * L,
                             "alpha": self.alpha.flatten().tolist()})  # fmt: skip


def train_gates(
    model,
    *,
    length: int = 384,
    steps: int = 24,
    sink: int = 16,
    recent: int = 64,
    lr: float = 0.05,
    l1: float = L1_WEIGHT,
    seed: int = 0,
    samples=None,
    progress: bool = True,
) -> DuoResult:
    """Train one gate per KV head by distillation on synthetic passkey samples (CPU: minutes).
    ``samples`` may replace the passkey data: a callable ``rng -> (ids [1, T], answer_start)``."""
    spec = model.spec
    if spec.learned_sinks:
        raise ProbeError("DuoAttention gates are not supported with learned attention sinks (GPT-OSS)")
    if steps < 1 or sink < 0 or recent < 1:
        raise ProbeError(f"need steps ≥ 1, sink ≥ 0, recent ≥ 1 (got {steps}, {sink}, {recent})")
    if spec.max_positions and length > spec.max_positions:
        raise ProbeError(f"length {length} exceeds the model's {spec.max_positions} positions")
    rng = random.Random(seed)
    alpha = torch.ones(spec.n_layers, spec.n_kv_heads, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    for p in model.hf.parameters():
        p.requires_grad_(False)
    gates = GatedMix(alpha, sink, recent)
    losses = []
    for _ in tqdm(range(steps), desc="DuoAttention gates", unit="step", disable=not progress):
        ids, start = samples(rng) if samples is not None else passkey_sample(model, length, rng)
        ids = ids.to(model.device)
        with torch.no_grad():
            target = model.hf.model(input_ids=ids).last_hidden_state[:, start:]
        with intervene(model, gates):
            hidden = model.hf.model(input_ids=ids).last_hidden_state[:, start:]
        loss = F.mse_loss(hidden.float(), target.float()) + l1 * alpha.clamp(0, 1).abs().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            alpha.clamp_(0, 1)
        losses.append(float(loss.detach()))
    prov = model.provenance.with_run(definition=f"DuoAttention gates: MSE(final hidden, answer tokens) + {l1}·L1; sink {sink} recent {recent}",
                                     length=length, steps=steps, seed=seed)  # fmt: skip
    return DuoResult(alpha=alpha.detach().clone(), losses=losses, sink=sink, recent=recent, provenance=prov)


@torch.no_grad()
def passkey_accuracy(model, *, length: int = 384, n: int = 8, seed: int = 1, edits=()) -> float:
    """Greedy passkey retrieval accuracy (the key appears in the answer)."""
    rng = random.Random(seed)
    hits = 0
    for _ in range(n):
        ids, start = passkey_sample(model, length, rng)
        prompt = ids[:, :start].to(model.device)
        key = model.tokenizer.decode(ids[0, start:]).split(" is ")[-1].strip(" .")
        with intervene(model, *edits) if edits else nullcontext():
            out = model.hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=14, do_sample=False,
                                    pad_token_id=getattr(model.tokenizer, "eos_token_id", None))  # fmt: skip
        hits += key.lower() in model.tokenizer.decode(out[0, start:]).lower()
    return hits / n


def streaming_sweep(model, duo: DuoResult, fractions=(0.0, 0.25, 0.5, 0.75, 1.0), **kw) -> pd.DataFrame:
    """Passkey accuracy as the lowest-gate KV heads are made streaming (emulated), fraction by fraction."""
    order = sorted(((float(duo.alpha[l, h]), l, h) for l in range(duo.alpha.shape[0]) for h in range(duo.alpha.shape[1])))
    rows = []
    for f in fractions:
        if not 0 <= f <= 1:
            raise ProbeError(f"fractions must lie in [0, 1], got {f}")
        heads = [(l, h) for _, l, h in order[: round(f * len(order))]]
        edits = (StreamingHeads(heads, sink=duo.sink, recent=duo.recent, unit="kv"),) if heads else ()
        rows.append({"streaming_fraction": f, "streaming_kv_heads": len(heads), "accuracy": passkey_accuracy(model, edits=edits, **kw)})
    return pd.DataFrame(rows)


def agreement(duo: DuoResult, wu_scores: torch.Tensor, group: int, *, gate: float = RETRIEVAL_GATE, wu_threshold: float = 0.1) -> pd.DataFrame:
    """Per KV head: DuoAttention says retrieval (α ≥ 0.5) vs Wu says retrieval (a query head of the
    group scores > 0.1). One row per KV head, with a ``agree`` column; disagreements are the story."""
    wu_kv = wu_scores.view(wu_scores.shape[0], -1, group).nan_to_num(0).amax(-1)  # [L, Hkv]
    rows = []
    for l in range(duo.alpha.shape[0]):
        for h in range(duo.alpha.shape[1]):
            d, w = bool(duo.alpha[l, h] >= gate), bool(wu_kv[l, h] > wu_threshold)
            rows.append({"layer": l, "kv_head": h, "alpha": float(duo.alpha[l, h]), "wu_max_score": float(wu_kv[l, h]),
                         "duo_retrieval": d, "wu_retrieval": w, "agree": d == w})  # fmt: skip
    return pd.DataFrame(rows)
