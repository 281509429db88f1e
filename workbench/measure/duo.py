"""Retrieval vs streaming heads (DuoAttention, Xiao et al. 2024).

One gate g ∈ [0, 1] per KV head mixes full attention with streaming attention (the first ``sink``
keys + the last ``recent`` keys): ``out = g·full + (1−g)·streaming``. Gates are trained by MSE
distillation of the final hidden states on the answer tokens of synthetic passkey data, plus
``0.05 · Σ|g|``; KV heads with g ≥ 0.5 are retrieval heads. The paper's sink 64 + recent 256 at
long contexts is scaled to the lengths used here (CPU: a few hundred tokens). (The paper calls the
gate α; here α is Gu et al.'s sink measure only, so the gate is ``gates``.)
"""
from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ClassVar

import pandas as pd
import torch
import torch.nn.functional as F

from . import niah
from ..base import plots
from ..attention import StreamingHeads
from ..attention.request import LayerRequest
from ..core.capture import edit_labels, intervene
from ..base.errors import ProbeError
from ..core.hooks import Bound, Edit
from ..kernels import semantics
from .result import Result, head_table
from .scan import config_of, float_value, int_value, run_cases

L1_WEIGHT = 0.05
RETRIEVAL_GATE = 0.5


@dataclass(frozen=True, eq=False)
class GatedMix(Edit):
    """Every layer's attention becomes ``g·full + (1−g)·streaming`` with a differentiable gate ``gates``
    ``[layer, kv_head]`` (DuoAttention's training-time mix; gradients flow into ``gates``)."""

    gates: torch.Tensor
    sink: int
    recent: int
    label = "duo-gated-mix"

    def bind(self, model) -> "_BoundGates":
        if tuple(self.gates.shape) != (model.spec.n_layers, model.spec.n_kv_heads):
            raise ProbeError(f"GatedMix: gates must be [layer, kv_head] = {(model.spec.n_layers, model.spec.n_kv_heads)}")
        return _BoundGates(self.gates, model.spec, self.sink, self.recent)


class _BoundGates(Bound):
    is_edit = True
    label = GatedMix.label

    def __init__(self, gates: torch.Tensor, spec, sink: int, recent: int):
        self.gates, self.group, self.sink, self.recent = gates, spec.group_size, sink, recent
        self.sites = frozenset(("attn", l) for l in range(spec.n_layers))

    def attention(self, layer: int, call) -> LayerRequest:
        a = self.gates[layer].clamp(0, 1).repeat_interleave(self.group)  # per query head

        def gated(q, k, v, scale, dense, q_pos, key_pos):
            rep = q.shape[1] // k.shape[1]
            k2, v2 = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            if dense is None:  # pure causal: build it (small lengths only on this training path)
                dense = (key_pos[None, :] <= q_pos[:, None])[None, None]
            dense = dense.bool() if dense.dtype == torch.bool else dense > torch.finfo(dense.dtype).min / 2
            full = F.scaled_dot_product_attention(q, k2, v2, attn_mask=dense, scale=scale)
            stream_mask = dense & semantics.streaming_visibility(q_pos, key_pos, self.sink, self.recent)[None, None]
            stream = F.scaled_dot_product_attention(q, k2, v2, attn_mask=stream_mask, scale=scale)
            g = a.to(q.dtype).view(1, -1, 1, 1)
            return g * full + (1 - g) * stream

        return LayerRequest(gated=gated)


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


@dataclass(frozen=True)
class DuoConfig:
    """Gate training: ``steps`` passkey samples of ``length`` tokens (each one case), streaming heads keep
    ``sink`` + ``recent`` keys; ``sweep``: streaming fractions to evaluate afterwards (passkey accuracy
    over ``sweep_samples`` samples each, lowest gates first)."""

    length: int = 384
    steps: int = 24
    sink: int = 16
    recent: int = 64
    lr: float = 0.05
    l1: float = L1_WEIGHT
    seed: int = 0
    sweep: tuple[float, ...] = ()
    sweep_samples: int = 8

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("length", int_value(self.length, "length", lo=64))
        set_("steps", int_value(self.steps, "steps", lo=1))
        set_("sink", int_value(self.sink, "sink", lo=0))
        set_("recent", int_value(self.recent, "recent", lo=1))
        set_("lr", float_value(self.lr, "lr", 0, 10, lo_open=True))
        set_("l1", float_value(self.l1, "l1", 0, 10))
        set_("seed", int_value(self.seed, "seed", lo=0, hi=2**63 - 1))
        set_("sweep", tuple(float_value(f, "sweep fractions", 0, 1) for f in self.sweep))
        set_("sweep_samples", int_value(self.sweep_samples, "sweep_samples", lo=1))

    def check(self, model) -> None:
        if model.spec.learned_sinks:
            raise ProbeError("DuoAttention gates are not supported with learned attention sinks (GPT-OSS)")
        if model.spec.max_positions and self.length > model.spec.max_positions:
            raise ProbeError(f"length {self.length} exceeds the model's {model.spec.max_positions} positions")


@dataclass(repr=False)
class DuoResult(Result):
    """Trained gates ``[layer, kv_head]``, the training curve and (optionally) the streaming sweep."""

    gates: torch.Tensor
    losses: list[float]
    sink: int
    recent: int
    provenance: object
    sweep: pd.DataFrame | None = None
    complete: bool = True

    kind: ClassVar[str] = "duo"
    table_names: ClassVar[tuple[str, ...]] = ("gates", "losses", "sweep")

    def retrieval_kv_heads(self, threshold: float = RETRIEVAL_GATE) -> list[tuple[int, int]]:
        return [tuple(x) for x in (self.gates >= threshold).nonzero().tolist()]

    grid_unit: ClassVar[str] = "kv_head"

    def grids(self) -> dict[str, torch.Tensor]:
        return {"duo_gate": self.gates}

    def heads(self) -> pd.DataFrame:
        """One row per KV head: its gate, best first, and whether it is a retrieval head (gate ≥ 0.5)."""
        df = super().heads()
        return df.assign(retrieval_head=df["duo_gate"] >= RETRIEVAL_GATE)

    def agreement(self, wu, group: int, *, wu_threshold: float = 0.1) -> pd.DataFrame:
        """Per KV head: DuoAttention says retrieval (gate ≥ 0.5) vs Wu says retrieval (a query head of the
        group scores > ``wu_threshold``); ``wu`` is a RetrievalResult or its ``[layer, head]`` scores."""
        scores = getattr(wu, "scores", wu)
        L, Hkv = self.gates.shape
        group = int_value(group, "group", lo=1)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (L, Hkv * group):
            raise ProbeError(f"wu must be a RetrievalResult or scores [layer, head] = {(L, Hkv * group)} ({Hkv} KV heads × group {group}), "
                             f"got {tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(wu).__name__}")  # fmt: skip
        wu_kv = scores.reshape(L, Hkv, group).nan_to_num(0).amax(-1)  # [L, Hkv]
        rows = []
        for l in range(self.gates.shape[0]):
            for h in range(self.gates.shape[1]):
                d, w = bool(self.gates[l, h] >= RETRIEVAL_GATE), bool(wu_kv[l, h] > wu_threshold)
                rows.append({"layer": l, "kv_head": h, "gate": float(self.gates[l, h]), "wu_max_score": float(wu_kv[l, h]),
                             "duo_retrieval": d, "wu_retrieval": w, "agree": d == w})  # fmt: skip
        return pd.DataFrame(rows)

    def summary(self) -> str:
        state = "" if self.complete else f" — cancelled after {len(self.losses)} step(s)"
        first, last = (f"{self.losses[0]:.3f}", f"{self.losses[-1]:.3f}") if self.losses else ("—", "—")
        lines = [f"DuoAttention gates: loss {first} → {last} over {len(self.losses)} steps{state}; "
                 f"retrieval KV heads (gate ≥ 0.5): " + (", ".join(f"L{l}KV{h}" for l, h in self.retrieval_kv_heads()) or "none")]  # fmt: skip
        if self.sweep is not None and len(self.sweep):
            lines.append("passkey accuracy vs streaming fraction:\n" + self.sweep.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        return "\n".join(lines)

    def figures(self) -> dict:
        figs = {
            "gates": lambda: plots.head_grid(self.gates, "DuoAttention gate per KV head (≥ 0.5: retrieval)", colorbar="gate",
                                             zmax=1, heads="KV head"),
            "losses": lambda: plots.curve(self.losses, "DuoAttention gate training loss"),
        }  # fmt: skip
        if self.sweep is not None and len(self.sweep):
            figs["sweep"] = lambda: plots.bars(self.sweep, "streaming_fraction", "accuracy", "passkey accuracy vs streaming fraction")
        return figs

    def tables(self) -> dict[str, pd.DataFrame]:
        gates = head_table(self.gates, "gate", unit="kv_head").sort_values(["layer", "kv_head"]).reset_index(drop=True)
        losses = pd.DataFrame({"step": range(len(self.losses)), "loss": self.losses}).assign(sink=self.sink, recent=self.recent,
                                                                                            complete=self.complete)  # fmt: skip
        sweep = self.sweep if self.sweep is not None else pd.DataFrame(columns=["streaming_fraction", "streaming_kv_heads", "accuracy"])
        return {"gates": gates, "losses": losses, "sweep": sweep}

    def to_frame(self) -> pd.DataFrame:
        return self.tables()["gates"]

    @classmethod
    def from_tables(cls, tables, provenance) -> "DuoResult":
        g = tables["gates"].sort_values(["layer", "kv_head"])
        L, H = int(g["layer"].max()) + 1, int(g["kv_head"].max()) + 1
        losses = tables["losses"]
        meta = losses.iloc[0] if len(losses) else None  # no step finished: a scan cancelled at once
        sweep = tables["sweep"]
        return cls(gates=torch.tensor(g["gate"].to_numpy(), dtype=torch.float32).view(L, H), losses=losses["loss"].tolist(),
                   sink=int(meta["sink"]) if meta is not None else 0, recent=int(meta["recent"]) if meta is not None else 0,
                   provenance=provenance, sweep=sweep if len(sweep) else None,
                   complete=bool(meta["complete"]) if meta is not None else False)  # fmt: skip


def scan(model, config: DuoConfig | None = None, *, edits=(), on_case=None, cancel=None, progress: bool = True,
         samples: Callable | None = None, **fields) -> DuoResult:  # fmt: skip
    """Train one gate per KV head by distillation on synthetic passkey samples (CPU: minutes), one case
    per training step (``DuoConfig`` fields as keywords); then the streaming sweep if ``sweep`` is set.
    ``samples`` may replace the passkey data: a callable ``rng -> (ids [1, T], answer_start)``.
    ``edits`` stay active while gates train (e.g. to train with some heads ablated)."""
    cfg = config_of(DuoConfig, config, fields)
    cfg.check(model)
    spec = model.spec
    rng = random.Random(cfg.seed)
    gates = torch.ones(spec.n_layers, spec.n_kv_heads, requires_grad=True)
    opt = torch.optim.Adam([gates], lr=cfg.lr)
    frozen = [p for p in model.hf.parameters() if p.requires_grad]  # only the gates train; given back afterwards
    mix = GatedMix(gates, cfg.sink, cfg.recent)

    def step(_):
        ids, start = samples(rng) if samples is not None else passkey_sample(model, cfg.length, rng)
        ids = ids.to(model.device)
        with torch.no_grad():
            target = model.hf.model(input_ids=ids).last_hidden_state[:, start:]
        with intervene(model, mix):
            hidden = model.hf.model(input_ids=ids).last_hidden_state[:, start:]
        loss = F.mse_loss(hidden.float(), target.float()) + cfg.l1 * gates.clamp(0, 1).abs().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            gates.clamp_(0, 1)
        return float(loss.detach())

    for p in frozen:
        p.requires_grad_(False)
    try:
        with intervene(model, *edits) if edits else nullcontext():
            losses, complete = run_cases(range(cfg.steps), step, on_case=on_case, cancel=cancel, progress=progress,
                                         desc="DuoAttention gates", unit="step")  # fmt: skip
    finally:  # no permanent edit of the user's model
        for p in frozen:
            p.requires_grad_(True)
    prov = model.provenance.with_run(definition=f"DuoAttention gates: MSE(final hidden, answer tokens) + {cfg.l1}·L1; "
                                                f"sink {cfg.sink} recent {cfg.recent}",
                                     length=cfg.length, steps=len(losses), seed=cfg.seed, edits=", ".join(edit_labels(edits)) or None,
                                     complete=complete)  # fmt: skip
    # no training step finished (cancelled at once): the initial gates say nothing, so none is reported
    trained = gates.detach().clone() if losses else torch.full_like(gates.detach(), float("nan"))
    result = DuoResult(gates=trained, losses=losses, sink=cfg.sink, recent=cfg.recent, provenance=prov, complete=complete)
    if cfg.sweep and complete:
        rows, done = run_cases(list(cfg.sweep), lambda f: _sweep_point(model, result, f, cfg), on_case=on_case, cancel=cancel,
                               progress=progress, desc="streaming sweep", unit="fraction")  # fmt: skip
        result.sweep, result.complete = pd.DataFrame(rows), done
    return result


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


def _sweep_point(model, duo: DuoResult, fraction: float, cfg: DuoConfig) -> dict:
    """Passkey accuracy with the lowest-gate ``fraction`` of KV heads made streaming (emulated)."""
    order = sorted(((float(duo.gates[l, h]), l, h) for l in range(duo.gates.shape[0]) for h in range(duo.gates.shape[1])))
    heads = [(l, h) for _, l, h in order[: round(fraction * len(order))]]
    edits = (StreamingHeads(heads, sink=duo.sink, recent=duo.recent, unit="kv"),) if heads else ()
    acc = passkey_accuracy(model, length=cfg.length, n=cfg.sweep_samples, edits=edits)
    return {"streaming_fraction": fraction, "streaming_kv_heads": len(heads), "accuracy": acc}
