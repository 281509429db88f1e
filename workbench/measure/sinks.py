"""Attention sinks: Gu et al.'s Sink_k^ε, ACT hidden sinks, Sun et al.'s massive activations, and
ACT calibration as an experiment (docs/definitions.md).

- α_k = (1/(T−k+1)) Σ_{i≥k} A[i, k]: mean attention key k receives from the queries that see it;
  Sink_k^ε = % of (layer, head) with α_k > ε (ε = 0.3; the paper's T = 64 on natural text).
- Hidden sinks (ACT, Yu et al. 2024): per head, keys with α_k > 0.1 other than the first. ACT's rule ranks
  every key; the last keys of a text are seen by one to three rows, so their α is a self-attention
  artefact: ``min_queries`` (default 8) leaves out keys seen by fewer rows; ``min_queries=1`` is ACT's rule.
- Massive activations (Sun et al. 2024): hidden-state entries with |x| > 100 and
  |x| ≥ 1000 × median(|hidden state|) of that layer and input.
"""
from __future__ import annotations

import json
import re
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from typing import ClassVar

import pandas as pd
import torch

from . import niah
from ..base import plots
from ..attention import AttentionStats, SinkCalibration
from ..core.capture import capture, edit_labels, intervene
from ..base.errors import ProbeError
from ..core.hooks import Hook
from .result import Result, top_cells
from .scan import config_of, float_value, int_value, run_cases

HIDDEN_SINK_THRESHOLD = 0.1
MIN_QUERIES = 8  # hidden sinks: keys seen by fewer rows are not ranked (1 = ACT's rule)
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


@dataclass(frozen=True)
class SinkConfig:
    """A sink scan: the first ``T`` tokens of each text (None: the shipped prose, :func:`texts_for`), ε of Sink_k^ε."""

    T: int = 64
    eps: float = 0.3
    texts: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "T", int_value(self.T, "T", lo=2))
        object.__setattr__(self, "eps", float_value(self.eps, "ε", 0, 1, lo_open=True, hi_open=True))
        if self.texts is not None:
            if isinstance(self.texts, str) or not all(isinstance(t, str) and t.strip() for t in self.texts) or not self.texts:
                raise ProbeError("texts must be a non-empty list of non-empty strings")
            object.__setattr__(self, "texts", tuple(self.texts))

    def token_ids(self, model) -> list[list[int]]:
        """The first T token ids of each text, checked against the model before anything runs."""
        if model.spec.max_positions and self.T > model.spec.max_positions:
            raise ProbeError(f"T = {self.T} exceeds the model's {model.spec.max_positions} positions")
        texts = texts_for(self.T) if self.texts is None else list(self.texts)
        out = []
        for t in texts:
            ids = model.tokenizer.encode(t)
            if len(ids) < self.T:
                raise ProbeError(f"text {t[:40]!r}… has {len(ids)} tokens; every text needs at least T = {self.T}")
            out.append(ids[: self.T])
        if not out:
            raise ProbeError(f"no shipped text has T = {self.T} tokens; pass texts=[...] long enough")
        return out


@dataclass(repr=False)
class SinkResult(Result):
    """α for every key ``[text, layer, head, key]`` (first T tokens of each text), how many rows saw each
    key ``[text, layer, key]``, and the massive activations."""

    alpha: torch.Tensor
    seen_by: torch.Tensor  # [text, layer, key] rows that can see the key (T − k, fewer in sliding-window layers)
    token_ids: list[list[int]]
    tokens: list[list[str]]
    eps: float
    T: int
    massive: pd.DataFrame
    provenance: object
    complete: bool = True

    kind: ClassVar[str] = "sinks"
    table_names: ClassVar[tuple[str, ...]] = ("alpha", "tokens", "massive")

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

    def hidden_sinks(self, threshold: float = HIDDEN_SINK_THRESHOLD, *, min_queries: int = MIN_QUERIES) -> pd.DataFrame:
        """ACT hidden sinks: one row per (text, layer, head, key ≥ 1) with α_k > threshold, with its token.
        Keys seen by fewer than ``min_queries`` rows are left out (``min_queries=1``: ACT's rule, every key)."""
        min_queries = int_value(min_queries, "min_queries", lo=1)
        ok = (self.seen_by[:, :, None, 1:] >= min_queries) & (self.alpha[..., 1:] > threshold)
        rows = [(t, l, h, k + 1, self.tokens[t][k + 1], float(self.alpha[t, l, h, k + 1])) for t, l, h, k in ok.nonzero().tolist()]
        return pd.DataFrame(rows, columns=["text", "layer", "head", "position", "token", "alpha"])

    def hidden_sink_tokens(self, threshold: float = HIDDEN_SINK_THRESHOLD, *, min_queries: int = MIN_QUERIES) -> pd.DataFrame:
        """Which tokens act as hidden sinks and how often (occurrences over texts × heads)."""
        hs = self.hidden_sinks(threshold, min_queries=min_queries)
        if hs.empty:
            return pd.DataFrame(columns=["token", "count", "heads"])
        g = hs.groupby("token").agg(count=("alpha", "size"), heads=("head", lambda s: len(set(zip(hs.loc[s.index, "layer"], s)))))
        return g.sort_values("count", ascending=False).reset_index()

    def massive_vs_sinks(self) -> dict[str, float]:
        """How often massive activations sit on sink tokens (the first token or a hidden sink)."""
        if self.massive.empty:
            return {"massive_entries": 0, "on_sink_token": float("nan")}
        hs = self.hidden_sinks()
        sink_pos = {(t, 0) for t in range(len(self.tokens))} | set(zip(hs["text"], hs["position"]))
        on = [(t, p) in sink_pos for t, p in zip(self.massive["text"], self.massive["position"])]
        return {"massive_entries": len(on), "on_sink_token": sum(on) / len(on)}

    # --- the result protocol -----------------------------------------------------------------------------
    def grids(self) -> dict[str, torch.Tensor]:
        """α of the first keys per head (mean over texts), named like the capture's ``attn.alpha``."""
        a = self.mean_alpha
        return {f"attn.alpha[{k}]": a[..., k] for k in range(min(a.shape[-1], 4))}

    def heads(self) -> pd.DataFrame:
        """One row per head: α of the first keys (best α₀ first) and whether it is a first-token sink (α₀ > ε)."""
        df = super().heads()
        return df.assign(sink=df["attn.alpha[0]"] > self.eps)

    def summary(self) -> str:
        state = "" if self.complete else f" — cancelled, {len(self.token_ids)} text(s) done"
        if not len(self.token_ids):
            return f"attention sinks (T = {self.T}, ε = {self.eps}){state}\nno text finished: nothing to report"
        a0 = self.mean_alpha[..., 0]
        lines = [f"Sink_1^{self.eps} = {self.sink_rate(0):.1f}% of heads (T = {self.T}, {len(self.token_ids)} texts){state}; "
                 "strongest: " + ", ".join(f"L{l}H{h} α₀={v:.2f}" for l, h, v in top_cells(a0, 5))]  # fmt: skip
        tok = self.hidden_sink_tokens().head(5)
        lines.append(f"hidden sink tokens (α > 0.1, seen by ≥ {MIN_QUERIES} rows): "
                     + (", ".join(f"{t!r}×{c}" for t, c in zip(tok["token"], tok["count"])) or "none"))  # fmt: skip
        mv = self.massive_vs_sinks()
        share = "—" if mv["massive_entries"] == 0 else f"{mv['on_sink_token'] * 100:.0f}% on sink tokens"
        lines.append(f"massive activations: {mv['massive_entries']} entries, {share}")
        return "\n".join(lines)

    def figures(self) -> dict:
        return {
            "heads": lambda: plots.head_grid(self.mean_alpha[..., 0], f"first-token sink α₀ per head (Gu et al., T = {self.T})",
                                             colorbar="α₀", zmax=1),
            "layers": lambda: plots.bars(self.per_layer(), "layer", "sink_share", f"share of heads with α₀ > {self.eps} per layer"),
        }  # fmt: skip

    def tables(self) -> dict[str, pd.DataFrame]:
        n, L, H, K = self.alpha.shape
        idx = torch.cartesian_prod(torch.arange(n), torch.arange(L), torch.arange(H), torch.arange(K))
        alpha = pd.DataFrame({"text": idx[:, 0], "layer": idx[:, 1], "head": idx[:, 2], "key": idx[:, 3],
                              "alpha": self.alpha.flatten(), "seen_by": self.seen_by[idx[:, 0], idx[:, 1], idx[:, 3]]})  # fmt: skip
        tokens = pd.DataFrame([(t, p, i, tok) for t, (ids, toks) in enumerate(zip(self.token_ids, self.tokens)) for p, (i, tok) in enumerate(zip(ids, toks))],
                              columns=["text", "position", "token_id", "token"])  # fmt: skip
        tokens = tokens.assign(eps=self.eps, T=self.T, complete=self.complete)
        return {"alpha": alpha, "tokens": tokens, "massive": self.massive}

    def to_frame(self) -> pd.DataFrame:
        """Mean α per (layer, head, key)."""
        a = self.mean_alpha
        L, H, K = a.shape
        idx = torch.cartesian_prod(torch.arange(L), torch.arange(H), torch.arange(K))
        return pd.DataFrame({"layer": idx[:, 0], "head": idx[:, 1], "key": idx[:, 2], "alpha": a.flatten()})

    @classmethod
    def from_tables(cls, tables, provenance) -> "SinkResult":
        al, tok = tables["alpha"], tables["tokens"]
        if tok.empty:  # a scan cancelled before its first text: its settings live in the provenance only
            found = re.search(r"eps=([0-9.e-]+) T=(\d+)", (provenance.definition or "") if provenance else "")
            return cls(alpha=torch.zeros(0, 0, 0, 0), seen_by=torch.zeros(0, 0, 0, dtype=torch.long), token_ids=[], tokens=[],
                       eps=float(found[1]) if found else 0.3, T=int(found[2]) if found else 64, massive=tables["massive"],
                       provenance=provenance, complete=False)  # fmt: skip
        n, L, H, K = (int(al[c].max()) + 1 for c in ("text", "layer", "head", "key"))
        al = al.sort_values(["text", "layer", "head", "key"])
        alpha = torch.tensor(al["alpha"].to_numpy(), dtype=torch.float32).view(n, L, H, K)
        seen = torch.tensor(al["seen_by"].to_numpy()).view(n, L, H, K)[:, :, 0]
        groups = [g.sort_values("position") for _, g in tok.groupby("text")]
        return cls(alpha=alpha, seen_by=seen, token_ids=[g["token_id"].tolist() for g in groups], tokens=[g["token"].tolist() for g in groups],
                   eps=float(tok["eps"].iloc[0]), T=int(tok["T"].iloc[0]), massive=tables["massive"], provenance=provenance,
                   complete=bool(tok["complete"].iloc[0]))  # fmt: skip


def _check_eps(eps: float) -> float:
    return float_value(eps, "ε", 0, 1, lo_open=True, hi_open=True)


@torch.no_grad()
def scan(model, config: SinkConfig | None = None, *, edits=(), on_case=None, cancel=None, progress: bool = True,
         **fields) -> SinkResult:  # fmt: skip
    """α_k for every key of the first ``T`` tokens of each text, Sink_k^ε, hidden sinks and massive
    activations, one forward pass per text (no N×N matrix: column sums come from the kernel, and no
    ``[T, vocab]`` logits are built). ``SinkConfig`` fields as keywords: ``T``, ``eps``, ``texts``."""
    cfg = config_of(SinkConfig, config, fields)
    ids_list = cfg.token_ids(model)
    probes = (AttentionStats(sink_keys=0, key_mass=True), Hook("blocks.*.hook_resid_post", massive_entries, key="massive"))

    def run(item):
        i, ids = item
        with capture(model, *probes) as cap:
            model.hf(input_ids=torch.tensor([ids], device=model.device), logits_to_keep=1)
        count = cap.stack("attn.key_count")[:, 0]  # [layer, key]
        massive = [(i, layer, int(p), int(d), v, model.tokens([ids[int(p)]])[0])
                   for layer in range(model.spec.n_layers) for p, d, v in cap[f"blocks.{layer}.hook_resid_post.massive"].tolist()]  # fmt: skip
        return alpha_all(cap), count, massive

    with intervene(model, *edits) if edits else nullcontext():
        done, complete = run_cases(list(enumerate(ids_list)), run, on_case=on_case, cancel=cancel, progress=progress,
                                   desc="sink scan", unit="text")  # fmt: skip
    ids_done = ids_list[: len(done)]
    L, H = model.spec.n_layers, model.spec.n_heads
    alpha = torch.stack([a for a, _, _ in done]) if done else torch.zeros(0, L, H, cfg.T)
    seen = torch.stack([c for _, c, _ in done]) if done else torch.zeros(0, L, cfg.T, dtype=torch.long)
    labels = ", ".join(edit_labels(edits)) or None
    prov = model.provenance.with_run(definition=f"Gu2025 alpha_k, Sink_k^eps eps={cfg.eps} T={cfg.T}; ACT hidden sinks >0.1 "
                                                f"(min_queries {MIN_QUERIES}); Sun2024 massive",
                                     texts=len(ids_done), edits=labels, complete=complete)  # fmt: skip
    massive = pd.DataFrame([r for _, _, m in done for r in m], columns=["text", "layer", "position", "dim", "value", "token"])
    return SinkResult(alpha=alpha, seen_by=seen, token_ids=ids_done, tokens=[model.tokens(ids) for ids in ids_done], eps=cfg.eps,
                      T=cfg.T, massive=massive, provenance=prov, complete=complete)  # fmt: skip


def massive_entries(x: torch.Tensor, name) -> torch.Tensor:
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
    positions of ``sink_tokens`` in each prompt, the first token excluded (ACT keeps the first-token sink:
    docs/definitions.md; a prompt with no such position runs unedited)."""
    tok = model.tokenizer
    choice = [tok.encode(" positive", add_special_tokens=False)[0], tok.encode(" negative", add_special_tokens=False)[0]]
    correct, loss = 0, 0.0
    for it in items:
        ids = model.encode(_prompt(it["text"]))
        pieces = model.tokens(ids[0])
        sinks = [i for i, p in enumerate(pieces) if i and p in sink_tokens]
        edit = (SinkCalibration(list(heads), sink_keys=sinks, beta=beta),) if heads and sinks else ()
        with intervene(model, *edit) if edit else nullcontext():
            logits = model.hf(input_ids=ids).logits[0, -1, choice].float()
        target = 0 if it["label"] == "positive" else 1
        loss += float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([target])))
        correct += int(int(logits.argmax()) == target)
    return {"accuracy": correct / len(items), "loss": loss / len(items)}


@dataclass(repr=False)
class CalibrationResult(Result):
    """ACT calibration on a task: the baseline, then the calibrated head sets with accuracy and loss."""

    runs: pd.DataFrame  # heads, beta, accuracy, loss, sink_tokens
    provenance: object
    complete: bool = True

    kind: ClassVar[str] = "calibration"
    table_names: ClassVar[tuple[str, ...]] = ("runs",)

    def heads(self) -> pd.DataFrame:
        """The calibrated heads of the last (best) run."""
        last = self.runs["heads"].iloc[-1] if len(self.runs) else []
        return pd.DataFrame([(l, h) for l, h in last], columns=["layer", "head"])

    def summary(self) -> str:
        state = "" if self.complete else " — cancelled"
        table = self.runs.assign(heads=self.runs["heads"].map(lambda hs: ", ".join(f"L{l}H{h}" for l, h in hs) or "none"))
        return (f"ACT calibration (β = {self.runs['beta'].iloc[0] if len(self.runs) else '?'}) on the sentiment task{state}:\n"
                + table[["heads", "accuracy", "loss"]].to_string(index=False, float_format=lambda x: f"{x:.3f}"))  # fmt: skip

    def figures(self) -> dict:
        df = self.runs.assign(run=[f"{i}: {len(h)} heads" for i, h in enumerate(self.runs["heads"])])
        return {"accuracy": lambda: plots.bars(df, "run", "accuracy", "task accuracy: baseline and calibrated head sets")}

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"runs": self.runs.assign(complete=self.complete)}

    @classmethod
    def from_tables(cls, tables, provenance) -> "CalibrationResult":
        runs = tables["runs"].copy()
        runs["heads"] = runs["heads"].map(lambda v: [tuple(h) for h in (json.loads(v) if isinstance(v, str) else v)])
        complete = bool(runs.pop("complete").all()) if "complete" in runs else True
        return cls(runs=runs, provenance=provenance, complete=complete)


def calibration_experiment(model, sinks: SinkResult, *, heads: list[tuple[int, int]] | None = None, beta: float = 0.4,
                           search: bool = False, max_candidates: int = 12, items: list[dict] | None = None,
                           on_case=None, cancel=None, progress: bool = True) -> CalibrationResult:  # fmt: skip
    """ACT calibration on the shipped sentiment task: baseline vs calibrated heads. ``heads`` default to
    the heads with the most hidden-sink mass; ``search=True`` adds heads greedily while accuracy
    (then loss) improves, as ACT's per-head search (one case per candidate head)."""
    beta = float_value(beta, "beta", 0, 1, lo_open=True)
    items_given = items
    items = sentiment_task() if items is None else items
    if isinstance(items, (str, dict)) or not items:
        raise ProbeError("items must be a non-empty list of {'text': str, 'label': 'positive' | 'negative'}")
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("text"), str) or it.get("label") not in ("positive", "negative"):
            raise ProbeError(f"each item needs 'text' (a string) and 'label' ('positive' or 'negative'), got {it!r}"[:300])
    if heads is not None:
        heads = model.spec.heads(heads, what="calibration_experiment")
    hs = sinks.hidden_sinks()
    sink_tokens = set(sinks.hidden_sink_tokens()["token"].head(5)) if not hs.empty else set()
    ranked = hs.groupby(["layer", "head"])["alpha"].sum().sort_values(ascending=False) if not hs.empty else pd.Series(dtype=float)
    candidates = heads if heads is not None else [tuple(map(int, lh)) for lh in ranked.index[:max_candidates]]
    base = task_accuracy(model, items)
    rows = [{"heads": [], "beta": beta, **base}]
    complete = True
    if not search:
        rows.append({"heads": candidates, "beta": beta, **task_accuracy(model, items, sink_tokens=sink_tokens, heads=candidates, beta=beta)})
    else:
        state = {"chosen": [], "best": base}

        def trial(lh):
            t = task_accuracy(model, items, sink_tokens=sink_tokens, heads=state["chosen"] + [lh], beta=beta)
            if (t["accuracy"], -t["loss"]) > (state["best"]["accuracy"], -state["best"]["loss"]):
                state["chosen"], state["best"] = state["chosen"] + [lh], t
                rows.append({"heads": list(state["chosen"]), "beta": beta, **t})
            return t

        _, complete = run_cases(candidates, trial, on_case=on_case, cancel=cancel, progress=progress, desc="ACT head search", unit="head")
    runs = pd.DataFrame(rows).assign(sink_tokens=", ".join(map(repr, sorted(sink_tokens))))
    # the model that ran the task (the sink scan's provenance describes another run: its texts, edits, completeness)
    prov = model.provenance.with_run(definition=f"ACT calibration beta={beta} of the hidden sink tokens (first token kept) "
                                                f"on {'the shipped sentiment task' if items_given is None else 'the given items'} "
                                                f"({len(items)} items)",
                                     sink_tokens=sorted(sink_tokens), sinks_from=sinks.provenance.weights_hash if sinks.provenance else None,
                                     complete=complete)  # fmt: skip
    return CalibrationResult(runs=runs, provenance=prov, complete=complete)
