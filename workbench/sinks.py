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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from importlib import resources

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import niah
from .attention import AttentionStats, SinkCalibration
from .capture import capture, intervene
from .display import Figures
from .errors import ProbeError

HIDDEN_SINK_THRESHOLD = 0.1
MASSIVE_ABS, MASSIVE_RATIO = 100.0, 1000.0


def default_texts(n: int = 12) -> list[str]:
    """Natural text: the paragraphs of the shipped haystack essays (original prose, CC0)."""
    paragraphs = [p.strip() for p in niah.haystack().split("\n\n") if len(p.split()) > 60]
    return paragraphs[:n]


def texts_for(T: int) -> list[str]:
    """Natural texts of at least ``T`` tokens: the essay paragraphs for the paper's T ≤ 64, else up to four
    equal slices of the haystack, 6,000 characters each or 6 per token when T needs more (English prose
    runs ≈ 4–5 characters per token; :func:`scan` says so if a text is still too short)."""
    if isinstance(T, bool) or not isinstance(T, int):
        raise ProbeError(f"T must be a whole number of tokens, got {T!r}")
    if T < 2:
        raise ProbeError(f"T must be ≥ 2, got {T}")
    if 6 * T > len(niah.haystack()):
        raise ProbeError(f"T = {T} needs texts of about {6 * T:,} characters; the shipped prose has {len(niah.haystack()):,} "
                         f"(enough for T ≤ {len(niah.haystack()) // 6:,}). Pass your own texts to sinks.scan")  # fmt: skip
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
        eps = self.eps if eps is None else _check_eps(eps)
        return float((self.mean_alpha[..., k] > eps).double().mean() * 100)

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
    if isinstance(T, bool) or not isinstance(T, int):
        raise ProbeError(f"T must be a whole number of tokens, got {T!r}")
    if T < 2:
        raise ProbeError(f"T must be ≥ 2, got {T}")
    if model.spec.max_positions and T > model.spec.max_positions:
        raise ProbeError(f"T = {T} exceeds the model's {model.spec.max_positions} positions")
    if isinstance(texts, (str, bytes)):
        raise ProbeError("texts must be a list of strings (one text per item), not a single string")
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
    for i, ids in enumerate(tqdm(ids_list, desc="sink scan", unit="text", disable=not progress)):
        x = torch.tensor([ids], device=model.device)
        with capture(model, AttentionStats(sink_keys=0, key_mass=True)) as cap, _layer_outputs(model) as residual:
            model.hf(input_ids=x)
        alphas.append(cap.attention.alpha_all())
        massive += _massive(residual, ids, model, text=i)
    tokens = [model.tokens(ids) for ids in ids_list]
    prov = model.provenance.with_run(definition=f"Gu2025 alpha_k, Sink_k^eps eps={eps} T={T}; ACT hidden sinks >0.1; Sun2024 massive",
                                     texts=len(texts))  # fmt: skip
    return SinkResult(alpha=torch.stack(alphas), token_ids=ids_list, tokens=tokens, eps=eps, T=T,
                      massive=pd.DataFrame(massive, columns=["text", "layer", "position", "dim", "value", "token"]),
                      provenance=prov)  # fmt: skip


@contextmanager
def _layer_outputs(model):
    """Each decoder layer's output (the residual stream). Not ``output_hidden_states``: its last entry
    is after the final norm, which hides the massive activations of the last layer."""
    outs: list[torch.Tensor] = []
    layers = [model.hf.get_submodule(p.rsplit(".", 1)[0]) for p in model.spec.attention_paths]
    hooks = [layer.register_forward_hook(lambda mod, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach())) for layer in layers]
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()


def _massive(layer_outputs, ids, model, text: int) -> list[tuple]:
    """Sun et al.: entries with |x| > 100 and ≥ 1000 × the median |x| of that layer's output."""
    rows = []
    for l, h in enumerate(layer_outputs):
        a = h[0].abs().float()
        med = a.median()
        hit = ((a > MASSIVE_ABS) & (a >= MASSIVE_RATIO * med)).nonzero().tolist()
        for pos, dim in hit:
            rows.append((text, l, pos, dim, float(h[0, pos, dim]), model.tokens([ids[pos]])[0]))
    return rows


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
