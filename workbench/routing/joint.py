"""Attention × routing on MoE models: where do the tokens that attention treats specially — the first
token, hidden sinks, massive-activation tokens — get routed, compared with ordinary tokens?

Definitions, as implemented (per text, per MoE layer l, per token position p counted from the first token)
- α of a token in layer l: Gu et al.'s α_p (the mean attention key p receives from the rows that can see it,
  ``workbench.sinks.alpha_all``), for each head; the table keeps its mean and maximum over the layer's heads.
- first: p = 0 (the first token; the BOS token when the tokenizer adds one).
- hidden_sink (ACT, Yu et al. 2024, with workbench's visibility rule): p ≥ 1 with α_p > ``threshold``
  (0.1) in some head of layer l, and p seen by at least ``min_queries`` rows (``workbench.sinks.MIN_QUERIES``;
  1 = ACT's rule).
- massive (Sun et al. 2024): layer l's residual output ``blocks.{l}.hook_resid_post`` has an entry with
  |x| > 100 and |x| ≥ 1000 × the median |x| of that layer and text at position p (the rule of
  ``workbench.sinks``). ``max_abs``: the largest |x| of the token's residual output in layer l.
- Routing: the experts layer l's router sent the token to (model-exact top-k, best first), their weights, and
  the top-1 expert (``workbench.routing.Routing``). The router reads the post-attention residual of layer l;
  α and the massive flag describe the same layer's attention and output.
- A token carries every flag that applies (a massive first token is both first and massive); ``kind`` is the
  first that applies of first, hidden_sink, massive, other. ``experts()`` counts a token under each of its
  flags; ``other`` = no flag. Shares are of the kind's tokens whose top-k contains the expert (they sum to k
  over experts), next to the same expert's share among ordinary (``other``) tokens and their ratio (lift).
- The first token sees only itself: when every text starts with the same token (a BOS), its route is the same in
  every text by construction, and its row of ``experts()`` says where that token goes, not how often.
- With ``chat=True`` (and a tokenizer with a chat template) each text is a user turn; else plain text.

One forward pass per text captures ``AttentionStats(sink_keys=0, key_mass=True)``, ``Routing()``,
``Activations("blocks.*.hook_resid_post.max_abs")`` and the massive-entry reduction (a hook; no residual
tensor is kept).
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch

from ..base import plots
from ..core.activations import Activations
from ..attention import AttentionStats
from ..core.capture import capture, edit_labels, intervene
from ..base.errors import ProbeError
from ..core.hooks import Hook
from ..measure.result import Result
from ..measure.scan import config_of, float_value, int_value, run_cases
from ..measure.sinks import HIDDEN_SINK_THRESHOLD, MIN_QUERIES, massive_entries, alpha_all
from .probe import Routing, require_moe, rows
from .scan import default_texts, first_tokens

KINDS = ("first", "hidden_sink", "massive", "other")
DEFINITION = "attention x routing: per MoE layer and token, Gu alpha (mean/max over heads), kind first | hidden_sink (alpha > {t} " \
             "in some head, seen by >= {q} rows) | massive (Sun2024 on hook_resid_post) | other; model-exact top-k experts"  # fmt: skip
_COLUMNS = ["text", "layer", "position", "token_id", "token", "kind", "first", "hidden_sink", "massive", "alpha_mean", "alpha_max",
            "seen_by", "max_abs", "top1", "experts", "weights"]  # fmt: skip


@dataclass(frozen=True)
class JointConfig:
    """One forward pass per text (its first ``max_tokens`` tokens; ``chat``: as a chat turn). ``texts``: None =
    the shipped routing texts (English, German, Python, arithmetic). ``threshold`` and ``min_queries``: the
    hidden-sink rule."""

    texts: tuple[str, ...] | None = None
    max_tokens: int = 256
    chat: bool = False
    threshold: float = HIDDEN_SINK_THRESHOLD
    min_queries: int = MIN_QUERIES

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if self.texts is None:
            set_("texts", default_texts()[0])
        elif isinstance(self.texts, str) or not self.texts or not all(isinstance(t, str) and t.strip() for t in self.texts):
            raise ProbeError("texts must be a non-empty list of non-empty strings")
        else:
            set_("texts", tuple(self.texts))
        set_("max_tokens", int_value(self.max_tokens, "max_tokens", lo=2))
        set_("threshold", float_value(self.threshold, "threshold", 0, 1, lo_open=True, hi_open=True))
        set_("min_queries", int_value(self.min_queries, "min_queries", lo=1))
        if not isinstance(self.chat, bool):
            raise ProbeError(f"chat must be True or False, got {self.chat!r}")


def _tokens_of(model, i: int, ids: torch.Tensor, cap, cfg: JointConfig) -> pd.DataFrame:
    """The per-token rows of one captured text (every MoE layer × position)."""
    a = alpha_all(cap)  # [L, H, T]
    seen = cap.stack("attn.key_count")[:, 0]  # [L, T]
    max_abs = cap.stack("hook_resid_post.max_abs")[:, 0]  # [L, T]
    r = rows(cap)
    ids = ids[0].cpu()
    T = ids.numel()
    words = model.tokens(ids)
    parts = []
    pos = torch.arange(T)
    for li, layer in enumerate(r.layers):
        massive = torch.zeros(T, dtype=torch.bool)
        hit = cap[f"blocks.{layer}.hook_resid_post.massive"]
        massive[hit[:, 0].long()] = True
        al = a[layer]  # [H, T]
        first = pos == 0
        hidden = (al > cfg.threshold).any(0) & (seen[layer] >= cfg.min_queries) & ~first
        kind = [KINDS[0] if f else KINDS[1] if h else KINDS[2] if m else KINDS[3]
                for f, h, m in zip(first.tolist(), hidden.tolist(), massive.tolist())]  # fmt: skip
        ex, w = r.experts[li], r.weights[li]  # [T, k]
        keep = ex >= 0
        parts.append(pd.DataFrame({
            "text": i, "layer": layer, "position": pos.numpy(), "token_id": ids.numpy(), "token": words, "kind": kind,
            "first": first.numpy(), "hidden_sink": hidden.numpy(), "massive": massive.numpy(),
            "alpha_mean": al.mean(0).numpy(), "alpha_max": al.amax(0).numpy(), "seen_by": seen[layer].numpy(),
            "max_abs": max_abs[layer].float().numpy(), "top1": ex[:, 0].numpy(),
            "experts": [e[k].tolist() for e, k in zip(ex, keep)], "weights": [x[k].tolist() for x, k in zip(w, keep)],
        }))  # fmt: skip
    return pd.concat(parts, ignore_index=True)[_COLUMNS]


@dataclass(repr=False)
class JointResult(Result):
    """The per-token table (text, MoE layer, position, token, kind and flags, α mean/max over heads, rows that
    saw the token, max |x| of its residual output, top-1 expert, experts, weights) and the scan's settings.
    ``experts()`` (= ``heads()``): shares per (layer, expert, kind); ``grids()``: ``share_<kind>``
    ``[layer, expert]`` (NaN in dense layers)."""

    tokens: pd.DataFrame
    layers: tuple[int, ...]
    n_layers: int
    n_experts: int
    threshold: float
    min_queries: int
    n_texts: int
    provenance: object
    complete: bool = True

    kind: ClassVar[str] = "routing_joint"
    table_names: ClassVar[tuple[str, ...]] = ("tokens", "meta")
    grid_unit: ClassVar[str] = "expert"

    def flags(self, kind: str) -> pd.Series:
        """Which rows of :attr:`tokens` count under ``kind`` (first, hidden_sink, massive: the flag; other: none)."""
        if kind not in KINDS:
            raise ProbeError(f"kind must be one of {KINDS}, got {kind!r}")
        t = self.tokens
        if kind == "other":
            return ~(t["first"] | t["hidden_sink"] | t["massive"]).astype(bool)
        return t[kind].astype(bool)

    def experts(self) -> pd.DataFrame:
        """One row per (MoE layer, expert, kind): the kind's tokens in that layer (``kind_tokens``), how many of
        them had the expert in their top-k (``tokens``) and as top-1, their ``share`` (of the kind's tokens;
        sums to k over experts), ``top1_share``, the expert's share among ordinary tokens (``other_share``) and
        ``lift`` = share / other_share. Sorted by layer, kind, share (largest first)."""
        t = self.tokens
        out = []
        other = self.flags("other")
        for kind in KINDS:
            sel = self.flags(kind)
            for layer in self.layers:
                in_layer = t["layer"] == layer
                g, base = t[sel & in_layer], t[other & in_layer]
                n, nb = len(g), len(base)
                ex_sets = [set(e) for e in g["experts"]]
                base_sets = [set(e) for e in base["experts"]]
                for e in range(self.n_experts):
                    hits = sum(e in s for s in ex_sets)
                    share = hits / n if n else float("nan")
                    other_share = sum(e in s for s in base_sets) / nb if nb else float("nan")
                    out.append({"layer": layer, "expert": e, "kind": kind, "kind_tokens": n, "tokens": hits,
                                "top1": int((g["top1"] == e).sum()), "share": share,
                                "top1_share": float((g["top1"] == e).mean()) if n else float("nan"), "other_share": other_share,
                                "lift": share / other_share if other_share else float("nan")})  # fmt: skip
        df = pd.DataFrame(out)
        df["kind"] = pd.Categorical(df["kind"], KINDS)
        return df.sort_values(["layer", "kind", "share", "top1_share"], ascending=[True, True, False, False], kind="stable").reset_index(drop=True).astype({"kind": str})

    heads = experts  # the table a view sorts (the result protocol's heads())

    def grids(self) -> dict[str, torch.Tensor]:
        """``share_<kind>``: share of the kind's tokens routed to each expert, ``[layer, expert]`` by real layer number."""
        df = self.experts()
        out = {}
        for kind in KINDS:
            g = torch.full((self.n_layers, self.n_experts), torch.nan)
            sub = df[df["kind"] == kind]
            g[torch.tensor(sub["layer"].to_numpy()), torch.tensor(sub["expert"].to_numpy())] = torch.tensor(sub["share"].to_numpy(), dtype=torch.float32)
            out[f"share_{kind}"] = g
        return out

    def summary(self) -> str:
        """The text a CLI prints: per MoE layer, each kind's count, α, magnitude and its most frequent expert vs ordinary tokens."""
        t = self.tokens
        state = "" if self.complete else f" — cancelled, {self.n_texts} text(s) done"
        n_tok = int((t["layer"] == self.layers[0]).sum()) if len(t) else 0
        lines = [f"attention × routing: {n_tok} tokens of {self.n_texts} text(s), MoE layers {list(self.layers)}, {self.n_experts} experts"
                 f"{state}; hidden sinks: α > {self.threshold:g} in some head, seen by ≥ {self.min_queries} rows"]  # fmt: skip
        if t.empty:
            return "\n".join(lines + ["no text finished: nothing to report"])
        df = self.experts()
        for layer in self.layers:
            tl = t[t["layer"] == layer]
            parts = []
            for kind in KINDS[:3]:
                sel = self.flags(kind)[tl.index]
                n = int(sel.sum())
                if not n:
                    parts.append(f"{kind} —")
                    continue
                best = df[(df["layer"] == layer) & (df["kind"] == kind)].iloc[0]
                parts.append(f"{kind} ×{n} (α max {tl[sel]['alpha_max'].mean():.2f}, |x| {tl[sel]['max_abs'].median():.3g}) → "
                             f"E{int(best['expert'])} {best['share'] * 100:.0f}% vs {best['other_share'] * 100:.0f}% of others")  # fmt: skip
            other = tl[self.flags("other")[tl.index]]
            lines.append(f"  L{layer}: " + "; ".join(parts) + f"; other ×{len(other)} (α max {other['alpha_max'].mean():.2f}, "
                         f"|x| {other['max_abs'].median():.3g})")  # fmt: skip
        return "\n".join(lines)

    def figures(self) -> dict:
        """``kinds``: per MoE layer, kind × expert share heatmaps; ``alpha``: mean α (max over heads) per layer and kind."""
        def kinds():
            df = self.experts()
            grids = []
            for layer in self.layers:
                g = df[df["layer"] == layer].pivot(index="kind", columns="expert", values="share").reindex(list(KINDS))
                g.columns = [f"E{e}" for e in g.columns]
                grids.append((f"L{layer}", g))
            return plots.facet_heatmaps(grids, "where special tokens are routed: share of each kind's tokens per expert (top-k)",
                                        colorbar="share of the kind's tokens", x_title="expert", zmax=1)  # fmt: skip

        def alpha():
            t = self.tokens.assign(kind=self.tokens["kind"])
            df = t.groupby(["layer", "kind"], as_index=False)["alpha_max"].mean()
            df["layer"] = df["layer"].map(lambda l: f"L{l}")
            return plots.bars(df, "layer", "alpha_max", "attention received (α, max over heads) by token kind", color="kind")

        return {"kinds": kinds, "alpha": alpha}

    def tables(self) -> dict[str, pd.DataFrame]:
        meta = pd.DataFrame([{"layers": ",".join(map(str, self.layers)), "n_layers": self.n_layers, "n_experts": self.n_experts,
                              "threshold": self.threshold, "min_queries": self.min_queries, "n_texts": self.n_texts,
                              "complete": self.complete}])  # fmt: skip
        return {"tokens": self.tokens, "meta": meta}

    @classmethod
    def from_tables(cls, tables, provenance) -> "JointResult":
        m = tables["meta"].iloc[0]
        t = tables["tokens"].copy()
        for col in ("experts", "weights"):
            t[col] = t[col].map(lambda v: json.loads(v) if isinstance(v, str) else list(v))
        return cls(tokens=t.reset_index(drop=True), layers=tuple(int(x) for x in str(m["layers"]).split(",")), n_layers=int(m["n_layers"]),
                   n_experts=int(m["n_experts"]), threshold=float(m["threshold"]), min_queries=int(m["min_queries"]),
                   n_texts=int(m["n_texts"]), provenance=provenance, complete=bool(m["complete"]))  # fmt: skip


@torch.no_grad()
def scan(model, config: JointConfig | None = None, *, edits=(), on_case=None, cancel=None, progress: bool = True,
         **fields) -> JointResult:  # fmt: skip
    """Per MoE layer and token: attention received (α), sink / massive flags, activation magnitude and the
    experts chosen, one forward pass per text (``JointConfig`` fields as keywords: ``texts``, ``max_tokens``,
    ``chat``, ``threshold``, ``min_queries``)."""
    routers = require_moe(model, "routing.joint.scan")
    cfg = config_of(JointConfig, config, fields)
    ids = [first_tokens(model, t, cfg.max_tokens, cfg.chat) for t in cfg.texts]
    probes = (AttentionStats(sink_keys=0, key_mass=True), Routing(), Activations("blocks.*.hook_resid_post.max_abs"),
              Hook("blocks.*.hook_resid_post", massive_entries, key="massive"))  # fmt: skip

    def run(item):
        i, x = item
        # the full residual only passes through the massive-entry hook: nothing of that size is kept
        with capture(model, *probes, max_elements=1 << 62) as cap:
            model.hf(input_ids=x, logits_to_keep=1)
        return _tokens_of(model, i, x, cap, cfg)

    with intervene(model, *edits) if edits else nullcontext():
        done, complete = run_cases(list(enumerate(ids)), run, on_case=on_case, cancel=cancel, progress=progress,
                                   desc="attention × routing", unit="text")  # fmt: skip
    prov = model.provenance.with_run(definition=DEFINITION.format(t=cfg.threshold, q=cfg.min_queries), texts=len(done),
                                     edits=", ".join(edit_labels(edits)) or None, complete=complete)  # fmt: skip
    tokens = pd.concat(done, ignore_index=True) if done else pd.DataFrame(columns=_COLUMNS)
    return JointResult(tokens=tokens, layers=tuple(rs.layer for rs in routers), n_layers=model.spec.n_layers,
                       n_experts=max(rs.n_experts for rs in routers), threshold=cfg.threshold, min_queries=cfg.min_queries,
                       n_texts=len(done), provenance=prov, complete=complete)  # fmt: skip
