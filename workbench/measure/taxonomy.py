"""Head taxonomy at any length: every head placed on the head-type axes reduced inside the backend
(docs/definitions.md, "Head taxonomy statistics"), next to its first-token sink α₀ and, when given, Wu et al.'s
retrieval score.

Per row i with probabilities p_ij over visible keys j (no N×N matrix: spans, moments and one gathered
probability per row, in both attention paths):

- previous-token mass p_{i,i−1}; self mass p_{i,i}; local mass Σ_{i−j<w} p_ij (``local_window`` w);
- distance mean Σ_j p_ij (i−j) and variance Σ_j p_ij (i−j)² − mean²;
- induction mass p_{i,j*+1}, j* the most recent earlier position holding the same token (undefined — NaN —
  when the token has not occurred; those rows are left out of the head's mean).

Per head: each case's mean over its rows (where the statistic is defined), then the mean over the cases —
every case weighs the same, however many rows define it (natural prose at each length, plus a repeated random
token sequence per length — the classic induction probe — unless ``repeated=False``). TransformerLens' head
detector and Anthropic's HeadVis compute these from full matrices at short lengths; these are exact at any
length. A head's kinds follow :data:`RULES` (thresholds documented there; change them with ``rules=``).
"""
from __future__ import annotations

import json
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ClassVar

import pandas as pd
import torch

from ..base import plots
from ..attention import AttentionStats
from ..attention.stats import TAXONOMY
from ..core.capture import capture, edit_labels, intervene
from ..base.errors import ProbeError
from .result import Result
from .scan import config_of, float_value, int_list, int_value, run_cases

#: kind → (statistic, threshold): a head is of that kind when its mean statistic exceeds the threshold
RULES: dict[str, tuple[str, float]] = {
    "sink": ("attn.alpha[0]", 0.3),  # Gu et al.'s ε
    "previous-token": ("attn.prev_mass", 0.5),
    "self": ("attn.self_mass", 0.5),
    "induction": ("attn.induction_mass", 0.3),
    "local": ("attn.local_mass", 0.9),
    "retrieval": ("retrieval_score", 0.1),  # Wu et al.'s threshold, when a retrieval result is joined
}
_AXES = tuple(f"attn.{s}" for s in TAXONOMY) + ("attn.alpha[0]",)


@dataclass(frozen=True)
class TaxonomyConfig:
    """Cases: ``n_texts`` prose texts of each length in ``lengths`` (``texts`` to give your own) plus, if
    ``repeated``, one sequence of random tokens repeated twice per length; ``local_window`` is w of the
    local mass."""

    lengths: tuple[int, ...] = (256,)
    n_texts: int = 3
    texts: tuple[str, ...] | None = None
    repeated: bool = True
    local_window: int = 8
    seed: int = 0

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("lengths", int_list(self.lengths, "lengths", lo=4))
        set_("n_texts", int_value(self.n_texts, "n_texts", lo=0))
        set_("local_window", int_value(self.local_window, "local_window", lo=1))
        set_("seed", int_value(self.seed, "seed", lo=0, hi=2**63 - 1))
        if self.texts is not None:
            if isinstance(self.texts, str) or not self.texts or not all(isinstance(t, str) and t.strip() for t in self.texts):
                raise ProbeError("texts must be a non-empty list of non-empty strings")
            set_("texts", tuple(self.texts))
        if not self.repeated and self.n_texts == 0 and self.texts is None:
            raise ProbeError("no cases: give n_texts ≥ 1, texts, or repeated=True")

    def cases(self, model) -> list[tuple[str, int, list[int]]]:
        """(kind, length, token ids) per case, built and checked before the model runs."""
        from .sinks import texts_for

        limit = model.spec.max_positions
        out = []
        rng = random.Random(self.seed)
        vocab = model.spec.vocab_size
        for n in self.lengths:
            if limit and n > limit:
                raise ProbeError(f"length {n} exceeds the model's {limit} positions")
            pool = list(self.texts) if self.texts is not None else texts_for(n)[: self.n_texts]
            for t in pool:
                ids = model.tokenizer.encode(t)
                if len(ids) < n:
                    raise ProbeError(f"text {t[:40]!r}… has {len(ids)} tokens; length {n} needs at least that many")
                out.append(("prose", n, ids[:n]))
            if self.repeated:
                half = [rng.randrange(vocab) for _ in range((n - 1) // 2)]
                bos = model.spec.bos.bos_token_id if model.spec.bos and model.spec.bos.adds_bos else None
                out.append(("repeated", n, ([bos] if bos is not None else []) + half + half))
        if not out:
            raise ProbeError("no cases to run")
        return out


@dataclass(repr=False)
class TaxonomyResult(Result):
    """Every head on the head-type axes: per case ``values[case, axis, layer, head]`` and their means."""

    values: torch.Tensor  # [case, axis, layer, head]
    axes: tuple[str, ...]
    cases: pd.DataFrame  # case, kind, length, tokens, token_ids (the exact input)
    provenance: object
    rules: dict = field(default_factory=lambda: dict(RULES))
    local_window: int = 8
    retrieval: torch.Tensor | None = None  # [layer, head] Wu score, when joined
    complete: bool = True

    kind: ClassVar[str] = "taxonomy"
    table_names: ClassVar[tuple[str, ...]] = ("values", "cases")

    def grids(self, length: int | None = None) -> dict[str, torch.Tensor]:
        """Per head, the mean of every axis over the cases (of one ``length``), plus ``retrieval_score``."""
        sel = torch.ones(len(self.cases), dtype=torch.bool) if length is None else torch.tensor((self.cases["length"] == length).to_numpy())
        if not sel.any():
            raise ProbeError(f"no case of length {length}; lengths: {sorted(self.cases['length'].unique())}")
        mean = self.values[sel].nanmean(0)
        out = {a: mean[i] for i, a in enumerate(self.axes)}
        if self.retrieval is not None:
            out["retrieval_score"] = self.retrieval
        return out

    def kinds(self) -> dict[tuple[int, int], list[str]]:
        """(layer, head) → the kinds its means pass (:data:`RULES`), in the rules' order."""
        g = self.grids()
        L, H = next(iter(g.values())).shape
        out: dict[tuple[int, int], list[str]] = {(l, h): [] for l in range(L) for h in range(H)}
        for kind, (stat, thr) in self.rules.items():
            if stat in g:
                for l, h in (g[stat] > thr).nonzero().tolist():
                    out[(l, h)].append(kind)
        return out

    def heads(self, kind: str | None = None) -> pd.DataFrame:
        """One row per head with every axis and its kinds; ``kind="induction"`` keeps that kind only."""
        if kind is not None and kind not in self.rules:
            raise ProbeError(f"unknown kind {kind!r}; kinds: {list(self.rules)}")
        df = super().heads()
        kinds = self.kinds()
        df["kinds"] = [", ".join(kinds[(l, h)]) for l, h in zip(df["layer"], df["head"])]
        df["name"] = [f"L{l}H{h}" for l, h in zip(df["layer"], df["head"])]
        if kind is not None:
            df = df[df["kinds"].str.split(", ").map(lambda ks: kind in ks)]
            stat = self.rules[kind][0]
            df = df.sort_values(stat, ascending=False) if stat in df else df
        return df.reset_index(drop=True)

    def with_retrieval(self, result) -> "TaxonomyResult":
        """This taxonomy with Wu et al.'s retrieval score joined (a RetrievalResult of the same model)."""
        if not isinstance(getattr(result, "scores", None), torch.Tensor):
            raise ProbeError(f"retrieval must be a RetrievalResult, got {type(result).__name__}")
        if tuple(result.scores.shape) != tuple(self.values.shape[2:]):
            raise ProbeError(f"retrieval scores are {tuple(result.scores.shape)}, the heads {tuple(self.values.shape[2:])}")
        mine, theirs = (getattr(getattr(r, "provenance", None), "weights_hash", None) for r in (self, result))
        if mine and theirs and mine != theirs:
            raise ProbeError(f"the retrieval result comes from other weights ({theirs}) than this taxonomy ({mine}): "
                             "scan both on the same model")  # fmt: skip
        return TaxonomyResult(self.values, self.axes, self.cases, self.provenance, dict(self.rules), self.local_window,
                              result.scores.clone(), self.complete)  # fmt: skip

    def summary(self) -> str:
        kinds = self.kinds()
        counts = self.kind_counts()
        state = "" if self.complete else f" — cancelled, {len(self.cases)} case(s) done"
        lines = [f"head taxonomy over {len(self.cases)} cases (lengths {sorted(self.cases['length'].unique().tolist())}){state}: "
                 + ", ".join(f"{k} {n}" for k, n in counts.items() if n or k != "retrieval")]  # fmt: skip
        g = self.grids()
        for kind in ("induction", "previous-token", "sink", "retrieval", "local"):
            if kind not in self.rules or self.rules[kind][0] not in g:  # custom rules may leave a kind out
                continue
            stat = self.rules[kind][0]
            top = self.heads(kind).head(5)
            if len(top):
                layers = sorted({int(l) for l in self.heads(kind)["layer"]})
                lines.append(f"{kind}: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(top["name"], top[stat]))
                             + f" (layers {_span(layers)})")  # fmt: skip
        if "retrieval_score" in g and "retrieval" in counts and "induction" in counts:
            both = [lh for lh, ks in kinds.items() if "retrieval" in ks and "induction" in ks]
            lines.append(f"retrieval heads that are also induction heads: {len(both)} of {counts['retrieval']}")
        return "\n".join(lines)

    def figures(self) -> dict:
        return {"scatter": self._scatter, "kinds": self._kind_grid,
                "induction": lambda: plots.head_grid(self.grids()["attn.induction_mass"], "induction mass per head", colorbar="p", zmax=1),
                "prev": lambda: plots.head_grid(self.grids()["attn.prev_mass"], "previous-token mass per head", colorbar="p", zmax=1)}  # fmt: skip

    def _scatter(self):
        """HeadVis-style: every head by mean attention distance and induction mass, coloured by kind."""
        df = self.heads()
        df["kind"] = df["kinds"].map(lambda k: k.replace(", ", " + ") if k else "none")  # every kind of a head, as the map
        return plots.scatter(df, "attn.dist_mean", "attn.induction_mass", "kind", "name",
                             "heads by mean attention distance and induction mass", log_x=True)

    def _kind_grid(self):
        """Every head's kinds (:meth:`kinds`, the counts :meth:`summary` gives): one colour per kind, a head
        of several kinds split into stripes."""
        L, H = self.values.shape[2:]
        measured = self.grids()  # a kind whose statistic this scan lacks (retrieval, not joined) has no legend entry
        order = [k for k, (stat, _) in self.rules.items() if stat in measured]
        return plots.kinds_grid(self.kinds(), order, (int(L), int(H)), "head kinds (every rule a head passes)")

    def kind_counts(self) -> dict[str, int]:
        """Heads per kind (a head of several kinds counts for each), as the summary and the kind map show them."""
        kinds = self.kinds()
        return {k: sum(k in ks for ks in kinds.values()) for k in self.rules}

    def tables(self) -> dict[str, pd.DataFrame]:
        C, A, L, H = self.values.shape
        idx = torch.cartesian_prod(torch.arange(C), torch.arange(A), torch.arange(L), torch.arange(H))
        values = pd.DataFrame({"case": idx[:, 0], "axis": [self.axes[a] for a in idx[:, 1].tolist()], "layer": idx[:, 2],
                               "head": idx[:, 3], "value": self.values.flatten()})  # fmt: skip
        if self.retrieval is not None:
            extra = pd.DataFrame({"case": -1, "axis": "retrieval_score", "layer": torch.arange(L).repeat_interleave(H),
                                  "head": torch.arange(H).repeat(L), "value": self.retrieval.flatten()})  # fmt: skip
            values = pd.concat([values, extra], ignore_index=True)
        cases = self.cases.assign(local_window=self.local_window, complete=self.complete,
                                  rules=str({k: list(v) for k, v in self.rules.items()}))  # fmt: skip
        return {"values": values, "cases": cases}

    def to_frame(self) -> pd.DataFrame:
        return self.heads()

    @classmethod
    def from_tables(cls, tables, provenance) -> "TaxonomyResult":
        import ast

        v, cases = tables["values"], tables["cases"].copy()
        ret = v[v["axis"] == "retrieval_score"]
        v = v[v["axis"] != "retrieval_score"]
        axes = tuple(dict.fromkeys(v["axis"]))
        C, L, H = int(v["case"].max()) + 1, int(v["layer"].max()) + 1, int(v["head"].max()) + 1
        v = v.assign(a=v["axis"].map(axes.index)).sort_values(["case", "a", "layer", "head"])
        values = torch.tensor(v["value"].to_numpy(), dtype=torch.float32).view(C, len(axes), L, H)
        retrieval = None
        if len(ret):
            retrieval = torch.tensor(ret.sort_values(["layer", "head"])["value"].to_numpy(), dtype=torch.float32).view(L, H)
        meta = cases.iloc[0]
        rules = {k: (s, float(t)) for k, (s, t) in ast.literal_eval(meta["rules"]).items()}
        cases = cases.drop(columns=["local_window", "complete", "rules"])
        if "token_ids" in cases:
            cases["token_ids"] = cases["token_ids"].map(lambda v: json.loads(v) if isinstance(v, str) else list(v))
        return cls(values, axes, cases, provenance, rules, int(meta["local_window"]), retrieval, bool(meta["complete"]))


def _check_rules(rules) -> dict[str, tuple[str, float]]:
    """``rules`` as kind → (statistic, threshold), every statistic one the result has, every threshold a number."""
    stats = (*_AXES, "retrieval_score")
    if not isinstance(rules, dict) or not rules:
        raise ProbeError("rules must be a non-empty dict kind → (statistic, threshold), e.g. {'induction': ('attn.induction_mass', 0.3)}")
    out = {}
    for kind, rule in rules.items():
        try:
            stat, thr = rule
        except (TypeError, ValueError):
            raise ProbeError(f"rules[{kind!r}] must be (statistic, threshold), got {rule!r}") from None
        if not isinstance(kind, str) or stat not in stats:
            raise ProbeError(f"rules[{kind!r}]: statistic must be one of {list(stats)}, got {stat!r}")
        out[kind] = (stat, float_value(thr, f"rules[{kind!r}] threshold", -float("inf"), float("inf")))
    return out


def _span(layers: list[int]) -> str:
    return f"{layers[0]}–{layers[-1]}" if len(layers) > 2 else ", ".join(map(str, layers))


def scan(model, config: TaxonomyConfig | None = None, *, edits=(), on_case=None, cancel=None, progress: bool = True,
         retrieval=None, rules: dict | None = None, **fields) -> TaxonomyResult:  # fmt: skip
    """Every head's head-type statistics over the config's cases (``TaxonomyConfig`` fields as keywords);
    ``retrieval``: a RetrievalResult to place heads on Wu's axis too; ``rules``: other kind thresholds."""
    cfg = config_of(TaxonomyConfig, config, fields)
    rules = _check_rules(RULES if rules is None else rules)
    cases = cfg.cases(model)
    probe = AttentionStats(sink_keys=1, taxonomy=True, local_window=cfg.local_window)

    def run(case):
        _, _, ids = case
        with capture(model, probe, names_filter=[f"blocks.*.attn.{s}" for s in TAXONOMY] + ["blocks.*.attn.alpha"]) as cap:
            with torch.no_grad():
                model.hf(input_ids=torch.tensor([ids], device=model.device), logits_to_keep=1)
        per_axis = [cap.stack(f"attn.{s}")[:, 0].nanmean(-1) for s in TAXONOMY]  # [layer, head], mean over rows
        alpha = cap.stack("attn.alpha")[:, 0, :, 0]
        return torch.stack([*per_axis, alpha])

    with intervene(model, *edits) if edits else nullcontext():
        done, complete = run_cases(cases, run, on_case=on_case, cancel=cancel, progress=progress, desc="head taxonomy", unit="case")
    if not done:
        raise ProbeError("the taxonomy scan was cancelled before its first case: nothing to report")
    table = pd.DataFrame([(i, k, n, len(ids), list(ids)) for i, (k, n, ids) in enumerate(cases[: len(done)])],
                         columns=["case", "kind", "length", "tokens", "token_ids"])  # fmt: skip
    prov = model.provenance.with_run(definition=f"head taxonomy (docs/definitions.md): per-row self/prev/local(w={cfg.local_window})/"
                                                "distance/induction mass, head means over real rows; rules " + str(rules),
                                     edits=", ".join(edit_labels(edits)) or None, seed=cfg.seed, complete=complete)  # fmt: skip
    result = TaxonomyResult(torch.stack(done), _AXES, table, prov, rules, cfg.local_window, complete=complete)
    return result.with_retrieval(retrieval) if retrieval is not None else result
