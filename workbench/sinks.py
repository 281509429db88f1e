"""Attention sinks: Gu et al.'s Sink_k^ε, ACT hidden sinks, Sun et al.'s massive activations, and
ACT calibration as an experiment (shared/DESIGN.md §3).

- α_k = (1/(T−k+1)) Σ_{i≥k} A[i, k]: mean attention key k receives from the queries that see it;
  Sink_k^ε = % of (layer, head) with α_k > ε (ε = 0.3; the paper's T = 64 on natural text).
- Hidden sinks (ACT, Yu et al. 2024): per head, keys with α_k > 0.1 other than the first.
- Massive activations (Sun et al. 2024): hidden-state entries with |x| > 100 and
  |x| ≥ 1000 × median(|hidden state|) of that layer and input.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import resources

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import niah
from .attention import AttentionStats, SinkCalibration
from .capture import capture, intervene
from .hooks import Hook
from .display import Figures
from .errors import ProbeError

HIDDEN_SINK_THRESHOLD = 0.1
MASSIVE_ABS, MASSIVE_RATIO = 100.0, 1000.0


def alpha(cap) -> torch.Tensor:
    """Gu et al.'s α_k of the tracked keys ``[layer, head, key]`` (``attn.alpha``, mean over the batch's
    sequences; NaN in layers the capture did not record)."""
    return cap.stack("attn.alpha").nanmean(1)


def alpha_all(cap) -> torch.Tensor:
    """α_k for every key ``[layer, head, key]`` from ``AttentionStats(key_mass=True)``: the mean attention key k
    receives from the rows that can see it (``attn.key_mass / attn.key_count``), mean over the batch."""
    mass, count = cap.stack("attn.key_mass"), cap.stack("attn.key_count")
    return (mass / count[:, :, None, :].to(mass.dtype)).nanmean(1).float()


def sink_rate(alpha: torch.Tensor, k: int = 0, eps: float = 0.3) -> float:
    """Gu et al.'s Sink_{k+1}^ε: percentage of (layer, head) whose α of key ``k`` (0-based; 0 = the first
    token) exceeds ε. ``alpha`` is ``[layer, head, key]`` (:func:`alpha`, :func:`alpha_all`, a SinkResult's
    ``mean_alpha``); layers without values (NaN) are left out."""
    _check_eps(eps)
    if not 0 <= k < alpha.shape[-1]:
        raise ProbeError(f"key {k} was not tracked; α covers keys 0..{alpha.shape[-1] - 1}")
    a = alpha[..., k]
    a = a[~torch.isnan(a)]
    if a.numel() == 0:
        raise ProbeError("no α values: capture with AttentionStats(sink_keys=k + 1) and run the model")
    return float((a > eps).double().mean() * 100)


def default_texts(n: int = 12) -> list[str]:
    """Natural text: the paragraphs of the shipped haystack essays (original prose, CC0)."""
    paragraphs = [p.strip() for p in niah.haystack().split("\n\n") if len(p.split()) > 60]
    return paragraphs[:n]


def texts_for(T: int) -> list[str]:
    """Natural texts of at least ``T`` tokens: the essay paragraphs for the paper's T ≤ 64, else up to four
    equal slices of the haystack, 6,000 characters each or 6 per token when T needs more (English prose
    runs ≈ 4–5 characters per token; :func:`scan` says so if a text is still too short)."""
    if T <= 64:
        return default_texts()
    hay = niah.haystack()
    chunk = max(6000, 6 * T)
    return [p for p in (hay[i * chunk : (i + 1) * chunk] for i in range(4)) if len(p) == chunk]


@dataclass
class SinkResult(Figures):
    """α for every key ``[text, layer, head, key]`` (first T tokens of each text) and what it implies."""

    alpha: torch.Tensor
    token_ids: list[list[int]]
    tokens: list[list[str]]
    eps: float
    T: int
    massive: pd.DataFrame
    provenance: object
    extra: dict = field(default_factory=dict)

    @property
    def mean_alpha(self) -> torch.Tensor:
        """α_k averaged over texts ``[layer, head, key]``."""
        return self.alpha.mean(0)

    def sink_rate(self, k: int = 0, eps: float | None = None) -> float:
        """Sink_{k+1}^ε in percent (key index ``k`` is 0-based: ``k=0`` is the first token)."""
        return sink_rate(self.mean_alpha, k, self.eps if eps is None else eps)

    def sink_heads(self, k: int = 0, eps: float | None = None) -> list[tuple[int, int]]:
        eps = self.eps if eps is None else eps
        return [tuple(x) for x in (self.mean_alpha[..., k] > eps).nonzero().tolist()]

    def per_layer(self, k: int = 0) -> pd.DataFrame:
        """Share of heads per layer with α_k > ε and the layer's mean α_k."""
        a = self.mean_alpha[..., k]
        return pd.DataFrame({"layer": range(a.shape[0]), "sink_share": (a > self.eps).double().mean(1).tolist(),
                             "mean_alpha": a.mean(1).tolist()})  # fmt: skip

    def hidden_sinks(self, threshold: float = HIDDEN_SINK_THRESHOLD) -> pd.DataFrame:
        """ACT hidden sinks: one row per (text, layer, head, key ≥ 1) with α_k > threshold, with its token."""
        idx = (self.alpha[..., 1:] > threshold).nonzero()
        rows = [(t, l, h, k + 1, self.tokens[t][k + 1], float(self.alpha[t, l, h, k + 1])) for t, l, h, k in idx.tolist()]
        return pd.DataFrame(rows, columns=["text", "layer", "head", "position", "token", "alpha"])

    def hidden_sink_tokens(self, threshold: float = HIDDEN_SINK_THRESHOLD) -> pd.DataFrame:
        """Which tokens act as hidden sinks and how often (occurrences over texts × heads)."""
        hs = self.hidden_sinks(threshold)
        if hs.empty:
            return pd.DataFrame(columns=["token", "count", "heads"])
        g = hs.groupby("token").agg(count=("alpha", "size"), heads=("head", lambda s: len(set(zip(hs.loc[s.index, "layer"], s)))))
        return g.sort_values("count", ascending=False).reset_index()

    def _figures(self) -> dict:
        from . import report

        return {
            "heads": lambda: report.head_grid(self.mean_alpha[..., 0], f"first-token sink α₀ per head (Gu et al., T = {self.T})",
                                              colorbar="α₀", zmax=1),
            "layers": lambda: report.layer_bars(self.per_layer(), "sink_share", f"share of heads with α₀ > {self.eps} per layer"),
        }  # fmt: skip

    def to_frame(self) -> pd.DataFrame:
        """Mean α per (layer, head, key)."""
        a = self.mean_alpha
        L, H, K = a.shape
        idx = torch.cartesian_prod(torch.arange(L), torch.arange(H), torch.arange(K))
        return pd.DataFrame({"layer": idx[:, 0], "head": idx[:, 1], "key": idx[:, 2], "alpha": a.flatten()})

    def save(self, store, prefix: str = "sinks") -> None:
        """Write ``{prefix}_alpha``, ``{prefix}_hidden`` and ``{prefix}_massive`` to a ResultStore."""
        store.save(f"{prefix}_alpha", self.to_frame(), self.provenance)
        store.save(f"{prefix}_hidden", self.hidden_sinks(), self.provenance)
        store.save(f"{prefix}_massive", self.massive, self.provenance)

    def massive_vs_sinks(self) -> dict[str, float]:
        """How often massive activations sit on sink tokens (the first token or a hidden sink)."""
        if self.massive.empty:
            return {"massive_entries": 0, "on_sink_token": float("nan")}
        hs = self.hidden_sinks()
        sink_pos = {(t, 0) for t in range(len(self.tokens))} | set(zip(hs["text"], hs["position"]))
        on = [(t, p) in sink_pos for t, p in zip(self.massive["text"], self.massive["position"])]
        return {"massive_entries": len(on), "on_sink_token": sum(on) / len(on)}


def _check_eps(eps: float) -> float:
    if not 0 < eps < 1:
        raise ProbeError(f"ε must lie in (0, 1), got {eps}")
    return eps


@torch.no_grad()
def scan(model, texts: list[str] | None = None, *, T: int = 64, eps: float = 0.3, progress: bool = True) -> SinkResult:
    """α_k for every key of the first ``T`` tokens of each text, Sink_k^ε, hidden sinks and massive
    activations, in one forward pass per text (no N×N matrix: column sums come from the kernel)."""
    _check_eps(eps)
    texts = default_texts() if texts is None else list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ProbeError("sinks.scan needs a non-empty list of non-empty texts")
    if T < 2:
        raise ProbeError(f"T must be ≥ 2, got {T}")
    ids_list = []
    for t in texts:
        ids = model.tokenizer.encode(t)
        if len(ids) < T:
            raise ProbeError(f"text {t[:40]!r}… has {len(ids)} tokens; every text needs at least T = {T}")
        ids_list.append(ids[:T])
    if model.spec.max_positions and T > model.spec.max_positions:
        raise ProbeError(f"T = {T} exceeds the model's {model.spec.max_positions} positions")
    alphas, massive = [], []
    probes = (AttentionStats(sink_keys=0, key_mass=True), Hook("blocks.*.hook_resid_post", _massive_entries, key="massive"))
    for i, ids in enumerate(tqdm(ids_list, desc="sink scan", unit="text", disable=not progress)):
        x = torch.tensor([ids], device=model.device)
        with capture(model, *probes) as cap:
            model.hf(input_ids=x, logits_to_keep=1)  # only attention is needed: no [T, vocab] logits
        alphas.append(alpha_all(cap))
        for layer in range(model.spec.n_layers):
            for pos, dim, value in cap[f"blocks.{layer}.hook_resid_post.massive"].tolist():
                massive.append((i, layer, int(pos), int(dim), value, model.tokens([ids[int(pos)]])[0]))
    tokens = [model.tokens(ids) for ids in ids_list]
    prov = model.provenance.with_run(definition=f"Gu2025 alpha_k, Sink_k^eps eps={eps} T={T}; ACT hidden sinks >0.1; Sun2024 massive",
                                     texts=len(texts))  # fmt: skip
    return SinkResult(alpha=torch.stack(alphas), token_ids=ids_list, tokens=tokens, eps=eps, T=T,
                      massive=pd.DataFrame(massive, columns=["text", "layer", "position", "dim", "value", "token"]),
                      provenance=prov)  # fmt: skip


def _massive_entries(x: torch.Tensor, name) -> torch.Tensor:
    """Sun et al.: entries of one layer's output with |x| > 100 and ≥ 1000 × its median |x| → ``[n, 3]``
    rows of (position, dim, value) for the first sequence."""
    a = x[0].abs().float()
    hit = ((a > MASSIVE_ABS) & (a >= MASSIVE_RATIO * a.median())).nonzero()
    return torch.cat([hit.double(), x[0][hit[:, 0], hit[:, 1]].double()[:, None]], dim=1).cpu()


# --- ACT calibration experiment ---------------------------------------------------------------------


def sentiment_task() -> list[dict]:
    """The shipped 60-item sentiment task (original reviews, CC0)."""
    lines = resources.files("workbench").joinpath("data/tasks/sentiment.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def _prompt(text: str) -> str:
    return f"Review: {text}\nIs this review positive or negative? Answer:"


@torch.no_grad()
def task_accuracy(model, items: list[dict], *, sink_tokens: set[str] = frozenset(), heads=(), beta: float = 0.4) -> dict:
    """Zero-shot accuracy and 2-way loss on ``items``; with ``heads``, ACT calibration (β) on the
    positions of ``sink_tokens`` plus the first token in each prompt."""
    tok = model.tokenizer
    choice = [tok.encode(" positive", add_special_tokens=False)[0], tok.encode(" negative", add_special_tokens=False)[0]]
    correct, loss = 0, 0.0
    for it in items:
        ids = model.encode(_prompt(it["text"]))
        pieces = model.tokens(ids[0])
        sinks = [0] + [i for i, p in enumerate(pieces) if i and p in sink_tokens]
        edit = (SinkCalibration(list(heads), sink_keys=sinks, beta=beta),) if heads else ()
        with intervene(model, *edit) if edit else nullcontext():
            logits = model.hf(input_ids=ids).logits[0, -1, choice].float()
        target = 0 if it["label"] == "positive" else 1
        loss += float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([target])))
        correct += int(int(logits.argmax()) == target)
    return {"accuracy": correct / len(items), "loss": loss / len(items)}


def calibration_experiment(
    model,
    sinks: SinkResult,
    *,
    heads: list[tuple[int, int]] | None = None,
    beta: float = 0.4,
    search: bool = False,
    max_candidates: int = 12,
    items: list[dict] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """ACT calibration on the shipped sentiment task: baseline vs calibrated heads. ``heads`` default to
    the heads with the most hidden-sink mass; ``search=True`` adds heads greedily while accuracy
    (then loss) improves, as ACT's per-head search."""
    if not 0 < beta <= 1:
        raise ProbeError(f"beta must lie in (0, 1], got {beta}")
    items = sentiment_task() if items is None else items
    if not items:
        raise ProbeError("empty task")
    hs = sinks.hidden_sinks()
    sink_tokens = set(sinks.hidden_sink_tokens()["token"].head(5)) if not hs.empty else set()
    ranked = hs.groupby(["layer", "head"])["alpha"].sum().sort_values(ascending=False) if not hs.empty else pd.Series(dtype=float)
    candidates = heads if heads is not None else [tuple(map(int, lh)) for lh in ranked.index[:max_candidates]]
    base = task_accuracy(model, items)
    rows = [{"heads": [], "beta": beta, **base}]
    if not search:
        rows.append({"heads": candidates, "beta": beta, **task_accuracy(model, items, sink_tokens=sink_tokens, heads=candidates, beta=beta)})
        return pd.DataFrame(rows).assign(sink_tokens=", ".join(map(repr, sorted(sink_tokens))))
    chosen, best = [], base
    for lh in tqdm(candidates, desc="ACT head search", unit="head", disable=not progress):
        trial = task_accuracy(model, items, sink_tokens=sink_tokens, heads=chosen + [lh], beta=beta)
        if (trial["accuracy"], -trial["loss"]) > (best["accuracy"], -best["loss"]):
            chosen, best = chosen + [lh], trial
            rows.append({"heads": list(chosen), "beta": beta, **trial})
    return pd.DataFrame(rows).assign(sink_tokens=", ".join(map(repr, sorted(sink_tokens))))
