"""Retrieval heads (Wu et al. 2024): NIAH scan with in-kernel top-1 attention, and the causal ablation test.

Definition (docs/definitions.md). At each greedy decode step the forward pass on the previous token
produces token ``w``; a query head copy-pastes when its top-1 attention position ``i`` lies in the
needle span and ``prompt_ids[i] == w``. Score of a test = |copied needle positions| / |needle tokens|
(variant ``set``, the paper) or the number of copying steps / |needle tokens| (``per_step``, the
released code). As in the released code, the first token (produced by the prompt pass) is not
scored. Tests count only when the answer's ROUGE-1 recall against the needle is > 0.5; scores are
averaged over counted tests; heads scoring > 0.1 are retrieval heads.
"""
from __future__ import annotations

import json
import random
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch

from . import niah
from ..base import plots
from ..attention import AttentionStats, HeadAblation
from ..core.capture import capture, edit_labels, intervene
from ..base.errors import ProbeError
from .result import Result, head_table, top_cells
from .scan import config_of, int_list, int_value, run_cases

VARIANTS = ("set", "per_step")
RETRIEVAL_THRESHOLD = 0.1
ROUGE_THRESHOLD = 0.5
DEFINITION = "Wu2024 retrieval score ({variant}); ROUGE-1>0.5; decode steps after the first"


def rouge1_recall(needle: str, response: str) -> float:
    """ROUGE-1 recall of ``response`` against ``needle`` (Google's rouge-score, as Wu et al.)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"]).score(needle, response)["rouge1"].recall


@dataclass(frozen=True)
class RetrievalConfig:
    """A retrieval scan: one NIAH test per (length, depth, needle). ``depths``: a count spread over 0–100 %
    or explicit percentages; ``max_new_tokens`` ≥ 2 (the first token, from the prompt pass, is not scored)."""

    lengths: tuple[int, ...] = (500, 1000, 2000)
    depths: int | tuple[float, ...] = 5
    n_needles: int = 1
    variant: str = "set"
    max_new_tokens: int = 32

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("lengths", int_list(self.lengths, "lengths", lo=1))
        if isinstance(self.depths, (list, tuple)):
            set_("depths", tuple(niah.depth_grid([_number(d, "depths") for d in self.depths])))
        else:
            set_("depths", int_value(self.depths, "depths (a count; or give a list of percentages)", lo=1))
        set_("n_needles", int_value(self.n_needles, "n_needles", lo=1, hi=len(niah.needles())))
        if self.variant not in VARIANTS:
            raise ProbeError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        set_("max_new_tokens", int_value(self.max_new_tokens, "max_new_tokens", lo=2))

    def check(self, spec=None, *, what: str = "context length") -> None:
        """Refuse, before a model loads, lengths that could never run on the model of ``spec`` (a
        :class:`~workbench.ModelSpec`; ``None``: positions unknown until it loads, a .gguf file): shorter than a
        NIAH test needs, or past its positions. ``what``: the field the caller's messages name."""
        niah.check_lengths(self.lengths, self.max_new_tokens, spec.max_positions if spec is not None else None, what=what)

    def cases(self, model) -> list[niah.NIAHCase]:
        """Every test, built (and checked against the model: lengths, positions) before anything runs."""
        grid = niah.depth_grid(list(self.depths) if isinstance(self.depths, tuple) else self.depths)
        pool = niah.needles()
        return [niah.build_case(model, pool[(j + n) % len(pool)], length, depth, max_new_tokens=self.max_new_tokens)
                for length in self.lengths for j, depth in enumerate(grid) for n in range(self.n_needles)]  # fmt: skip


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProbeError(f"{what} must be numbers (percent of the document), got {v!r}")
    return float(v)


@dataclass(repr=False)
class RetrievalResult(Result):
    """Per-head retrieval scores ``[layer, head]`` plus every test that produced them."""

    scores: torch.Tensor
    tests: pd.DataFrame  # one row per test: length, depth, needle, rouge, counted, response, token ids, ...
    per_test_scores: torch.Tensor  # [tests, layer, head]
    variant: str
    provenance: object
    ablation: str | None = None
    complete: bool = True  # False: cancelled; the tests done so far

    kind: ClassVar[str] = "retrieval"
    table_names: ClassVar[tuple[str, ...]] = ("scores", "tests", "per_test")

    @classmethod
    def from_rows(cls, model, rows: list[dict], *, variant: str = "set", edits=(), complete: bool = True) -> "RetrievalResult":
        """A result from :func:`run_case` rows (empty when a scan was cancelled before its first test)."""
        L, H = model.spec.n_layers, model.spec.n_heads
        rows = [dict(r) for r in rows]
        per_test = torch.stack([r.pop("scores") for r in rows]).float() if rows else torch.zeros(0, L, H)
        tests = pd.DataFrame(rows, columns=None if rows else _TEST_COLUMNS)
        counted = torch.tensor(tests["counted"].to_numpy(dtype=bool), dtype=torch.bool)
        if counted.any():
            scores = per_test[counted].mean(0)
        else:
            if rows:
                warnings.warn("no NIAH test was answered (ROUGE-1 recall > 0.5): retrieval scores are undefined (NaN)")
            scores = torch.full((L, H), float("nan"))
        label = ", ".join(edit_labels(edits)) or None
        prov = model.provenance.with_run(definition=DEFINITION.format(variant=variant), ablation=label, complete=complete)
        return cls(scores=scores, tests=tests, per_test_scores=per_test, variant=variant, provenance=prov, ablation=label,
                   complete=complete)  # fmt: skip

    # --- measurements ------------------------------------------------------------------------------------
    def retrieval_heads(self, threshold: float = RETRIEVAL_THRESHOLD) -> list[tuple[int, int]]:
        """(layer, head) pairs whose mean score exceeds ``threshold`` (Wu: 0.1), best first."""
        idx = (self.scores > threshold).nonzero().tolist()
        return sorted(((l, h) for l, h in idx), key=lambda lh: -float(self.scores[lh]))

    def top_heads(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` best-scoring (layer, head, score)."""
        return top_cells(self.scores, k)

    def grids(self) -> dict[str, torch.Tensor]:
        return {"retrieval_score": self.scores}

    def heads(self) -> pd.DataFrame:
        """One row per head: layer, head, retrieval score (best first), whether it is a retrieval head (> 0.1)."""
        df = super().heads()
        return df.assign(retrieval_head=df["retrieval_score"] > RETRIEVAL_THRESHOLD)

    def accuracy_grid(self) -> pd.DataFrame:
        """NIAH accuracy (fraction of tests with ROUGE-1 recall > 0.5) per depth × context length."""
        return self.tests.pivot_table(index="depth", columns="length", values="counted", aggfunc="mean")

    @property
    def accuracy(self) -> float:
        return float(self.tests["counted"].mean()) if len(self.tests) else float("nan")

    def sparsity(self) -> dict[str, float]:
        """Share of heads above 0.1 and exactly 0 (Wu: 3–6% and 45–73%)."""
        s = self.scores
        return {"above_0.1": float((s > RETRIEVAL_THRESHOLD).double().mean()), "zero": float((s == 0).double().mean())}

    # --- the result protocol -----------------------------------------------------------------------------
    def summary(self) -> str:
        state = "" if self.complete else f" — cancelled, {len(self.tests)} test(s) done"
        lines = [f"NIAH accuracy {self.accuracy:.2f} over {len(self.tests)} tests ({self.variant}"
                 f"{', ' + self.ablation if self.ablation else ''}){state}"]  # fmt: skip
        if len(self.tests):
            lines.append("accuracy (depth × length):\n" + self.accuracy_grid().round(2).to_string())
        sp = self.sparsity()
        lines.append(f"retrieval heads (score > 0.1): {len(self.retrieval_heads())} = {sp['above_0.1'] * 100:.1f}% of heads; "
                     f"{sp['zero'] * 100:.0f}% score exactly 0")  # fmt: skip
        lines.append("top heads: " + ", ".join(f"L{l}H{h} {s:.2f}" for l, h, s in self.top_heads(8)))
        return "\n".join(lines)

    def figures(self) -> dict:
        return {
            "heads": lambda: plots.head_grid(self.scores, f"retrieval score per head (Wu et al. 2024, {self.variant})", zmax=1),
            "niah": lambda: plots.niah_grid(self.accuracy_grid()),
        }

    def tables(self) -> dict[str, pd.DataFrame]:
        T, L, H = self.per_test_scores.shape
        idx = torch.cartesian_prod(torch.arange(T), torch.arange(L), torch.arange(H)) if T else torch.zeros(0, 3, dtype=torch.long)
        per_test = pd.DataFrame({"test": idx[:, 0].numpy(), "layer": idx[:, 1].numpy(), "head": idx[:, 2].numpy(),
                                 "score": self.per_test_scores.flatten().numpy()})  # fmt: skip
        scores = head_table(self.scores, "score").sort_values(["layer", "head"]).reset_index(drop=True)
        tests = self.tests.assign(variant=self.variant, ablation=self.ablation, complete=self.complete)
        return {"scores": scores, "tests": tests, "per_test": per_test}

    @classmethod
    def from_tables(cls, tables, provenance) -> "RetrievalResult":
        scores_df, tests = tables["scores"], tables["tests"].copy()
        L, H = int(scores_df["layer"].max()) + 1, int(scores_df["head"].max()) + 1
        scores = torch.tensor(scores_df.sort_values(["layer", "head"])["score"].to_numpy(), dtype=torch.float32).view(L, H)
        pt = tables["per_test"]
        per_test = torch.tensor(pt.sort_values(["test", "layer", "head"])["score"].to_numpy(), dtype=torch.float32).view(-1, L, H)
        for col in ("token_ids", "needle_span"):
            tests[col] = tests[col].map(lambda v: json.loads(v) if isinstance(v, str) else v)
        tests["needle_span"] = tests["needle_span"].map(tuple)
        meta = tests.iloc[0] if len(tests) else None
        variant = str(meta["variant"]) if meta is not None else (provenance.definition.split("(")[1].split(")")[0] if provenance else "set")
        ablation = meta["ablation"] if meta is not None and isinstance(meta["ablation"], str) else None
        complete = bool(meta["complete"]) if meta is not None else True
        tests = tests.drop(columns=[c for c in ("variant", "ablation", "complete") if c in tests])
        return cls(scores=scores, tests=tests, per_test_scores=per_test, variant=variant, provenance=provenance,
                   ablation=ablation, complete=complete)  # fmt: skip


_TEST_COLUMNS = ["length", "depth", "needle", "response", "rouge1_recall", "counted", "answer_found", "needle_span", "token_ids",
                 "max_new_tokens"]


def _score_steps(top1: torch.Tensor, prompt_ids: torch.Tensor, generated: torch.Tensor, span: tuple[int, int], variant: str):
    """Per-head score of one test. ``top1``: [layer, head, steps] top-1 key of decode step r, whose
    forward produced ``generated[r + 1]``."""
    start, end = span
    n_steps = min(top1.shape[-1], generated.numel() - 1)
    L, H = top1.shape[:2]
    if n_steps <= 0:
        return torch.zeros(L, H)
    t = top1[..., :n_steps]
    produced = generated[1 : n_steps + 1].view(1, 1, -1)
    inside = (t >= start) & (t < end)
    at = prompt_ids[t.clamp(0, prompt_ids.numel() - 1)]
    copied = inside & (at == produced)
    n_needle = end - start
    if variant == "per_step":
        return copied.sum(-1).double() / n_needle
    scores = torch.zeros(L, H, dtype=torch.float64)
    for l, h in copied.any(-1).nonzero().tolist():
        scores[l, h] = len(set(t[l, h][copied[l, h]].tolist())) / n_needle
    return scores


def run_case(model, case: niah.NIAHCase, *, variant: str = "set", max_new_tokens: int = 32) -> dict:
    """Generate greedily on one NIAH case and score every head (under whatever edits are active)."""
    ids = case.input_ids.to(model.device)
    pad = getattr(model.tokenizer, "eos_token_id", None)
    with capture(model, AttentionStats(sink_keys=0, topk=1), names_filter="blocks.*.attn.top1", rows="decode") as cap, torch.no_grad():
        out = model.hf.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
    generated = out[0, ids.shape[1] :].cpu()
    response = model.tokenizer.decode(generated, skip_special_tokens=True)
    top1 = cap.stack("attn.top1")[:, 0] if cap.n_calls else torch.empty(model.spec.n_layers, model.spec.n_heads, 0, dtype=torch.long)
    scores = _score_steps(top1, ids[0].cpu(), generated, case.needle_span, variant)
    rouge = rouge1_recall(case.needle.needle, response)
    return {
        "length": case.length, "depth": case.depth, "needle": case.needle.id, "response": response.strip(),
        "rouge1_recall": rouge, "counted": rouge > ROUGE_THRESHOLD,
        "answer_found": case.needle.answer.lower() in response.lower(),
        "needle_span": case.needle_span, "token_ids": ids[0].tolist(), "max_new_tokens": max_new_tokens, "scores": scores,
    }  # fmt: skip


def scan(model, config: RetrievalConfig | None = None, *, edits=(), on_case=None, cancel=None, progress: bool = True,
         **fields) -> RetrievalResult:  # fmt: skip
    """Wu et al.'s retrieval score for every (layer, query head) over a NIAH grid
    (``RetrievalConfig`` fields as keywords: ``lengths``, ``depths``, ``n_needles``, ``variant``,
    ``max_new_tokens``). Every test is built and every input checked before the model runs; the scan
    shape (``edits``, ``on_case``, ``cancel``, ``progress``) is :mod:`workbench.measure.scan`'s."""
    cfg = config_of(RetrievalConfig, config, fields)
    cases = cfg.cases(model)
    with intervene(model, *edits) if edits else nullcontext():
        rows, complete = run_cases(
            cases, lambda c: run_case(model, c, variant=cfg.variant, max_new_tokens=cfg.max_new_tokens),
            on_case=on_case, cancel=cancel, progress=progress, desc="NIAH retrieval scan", unit="test",
        )  # fmt: skip
    return RetrievalResult.from_rows(model, rows, variant=cfg.variant, edits=edits, complete=complete)


# --- the causal test ---------------------------------------------------------------------------------------


def random_set(pool: list, k: int, seed: int) -> list:
    """``k`` items drawn from ``pool`` with ``random.Random(seed)`` (reproducible across runs and machines)."""
    return sorted(random.Random(seed).sample(pool, k))


def ablation_sets(spec, result: RetrievalResult, k: int, seeds) -> list[tuple[str, int | None, list[tuple[int, int]]]]:
    """The head sets of Wu's causal test: ("top", None, top-``k`` heads), then ("random", seed, ``k`` heads
    drawn outside the top-``k``) per seed."""
    k = int_value(k, "k", lo=1, hi=spec.n_layers * spec.n_heads - 1)
    seeds = [int_value(s, "seeds: each seed", lo=0, hi=2**63 - 1) for s in seeds]
    top = [(l, h) for l, h, _ in result.top_heads(k)]
    everyone = [(l, h) for l in range(spec.n_layers) for h in range(spec.n_heads) if (l, h) not in top]
    return [("top", None, top)] + [("random", s, random_set(everyone, k, s)) for s in seeds]


@dataclass(repr=False)
class AblationResult(Result):
    """Wu's causal test: NIAH accuracy with no heads, the top-k retrieval heads and k random heads ablated."""

    runs: pd.DataFrame  # ablated, seed, k, mode, accuracy, mean_rouge1_recall, tests, heads
    provenance: object
    tests: pd.DataFrame | None = None  # every NIAH test: run (index into runs) + run_case's columns
    complete: bool = True

    kind: ClassVar[str] = "ablation"
    table_names: ClassVar[tuple[str, ...]] = ("runs", "tests")

    def accuracy_grid(self, run: int = 1) -> pd.DataFrame:
        """NIAH accuracy per depth × length of one run (0: no ablation, 1: the top-k heads, then random sets)."""
        t = self.tests[self.tests["run"] == run]
        return t.pivot_table(index="depth", columns="length", values="counted", aggfunc="mean")

    def heads(self) -> pd.DataFrame:
        """The ablated head sets, one row per (run, head)."""
        return self.runs[["ablated", "seed", "heads"]].explode("heads").dropna().reset_index(drop=True)

    def summary(self) -> str:
        mode = self.runs["mode"].iloc[0] if len(self.runs) else "?"
        k = int(self.runs["k"].max()) if len(self.runs) else 0
        state = "" if self.complete else " — cancelled: runs done so far"
        table = self.runs[["ablated", "seed", "tests", "accuracy", "mean_rouge1_recall"]].to_string(index=False, float_format=lambda x: f"{x:.3f}")
        return f"causal test ({mode} ablation, k={k}){state}:\n{table}"

    def figures(self) -> dict:
        df = self.runs.assign(run=[f"{a}" + (f" (seed {int(s)})" if s == s and s is not None else "") for a, s in zip(self.runs["ablated"], self.runs["seed"])])
        return {"accuracy": lambda: plots.bars(df, "run", "accuracy", "NIAH accuracy with heads ablated (Wu et al.'s causal test)")}

    def tables(self) -> dict[str, pd.DataFrame]:
        tests = self.tests if self.tests is not None else pd.DataFrame(columns=["run", *_TEST_COLUMNS])
        return {"runs": self.runs.assign(complete=self.complete), "tests": tests}

    @classmethod
    def from_tables(cls, tables, provenance) -> "AblationResult":
        runs = tables["runs"].copy()
        runs["heads"] = runs["heads"].map(lambda v: [tuple(h) for h in (json.loads(v) if isinstance(v, str) else v)])
        complete = bool(runs.pop("complete").all()) if "complete" in runs else True
        tests = tables["tests"].copy()
        for col in ("token_ids", "needle_span"):
            tests[col] = tests[col].map(lambda v: json.loads(v) if isinstance(v, str) else v)
        return cls(runs=runs, provenance=provenance, tests=tests, complete=complete)


CAUSAL_MODES = ("uniform", "zero")  # Wu's masking, and the output ablation for contrast


def ablation_check(model, result: RetrievalResult, k: int = 10, *, mode: str = "uniform", seeds=(0, 1, 2), lengths=None,
                   depths=None, max_new_tokens: int | None = None, on_case=None, cancel=None, progress: bool = True) -> AblationResult:  # fmt: skip
    """Wu's causal test: NIAH accuracy with the top-``k`` retrieval heads ablated vs ``k`` random heads
    (one run per seed; random heads exclude the top ones). ``mode``: ``uniform`` (Wu's masking) or ``zero``
    (output ablation), named in the result. Lengths, depths and new tokens default to the scan's own. Cases
    are single NIAH tests (``on_case``/``cancel`` act between them); a cancelled check keeps its finished tests."""
    if mode not in CAUSAL_MODES:
        raise ProbeError(f"mode must be one of {CAUSAL_MODES} for the causal test (mean needs reference texts), got {mode!r}")
    cfg = RetrievalConfig(
        lengths=sorted(result.tests["length"].unique().tolist()) if lengths is None else lengths,
        depths=tuple(sorted(result.tests["depth"].unique().tolist())) if depths is None else depths,
        variant=result.variant,
        max_new_tokens=max_new_tokens or int(result.tests["max_new_tokens"].iloc[0] if "max_new_tokens" in result.tests and len(result.tests) else 32),
    )  # fmt: skip
    sets = [("none", None, [])] + ablation_sets(model.spec, result, k, seeds)
    for _, _, heads in sets:  # every edit is validated before the first test
        if heads:
            HeadAblation(heads, mode=mode).bind(model)
    base = cfg.cases(model)
    cases = [(i, case) for i in range(len(sets)) for case in base]

    def run(item):
        i, case = item
        heads = sets[i][2]
        with intervene(model, HeadAblation(heads, mode=mode)) if heads else nullcontext():
            return i, run_case(model, case, variant=cfg.variant, max_new_tokens=cfg.max_new_tokens)

    done, complete = run_cases(cases, run, on_case=on_case, cancel=cancel, progress=progress, desc=f"ablation ({mode})", unit="test")
    out = []
    for i, (kind, seed, heads) in enumerate(sets):
        rows = [r for j, r in done if j == i]
        if not rows:
            continue
        out.append({"ablated": kind, "seed": seed, "k": k if heads else 0, "mode": mode, "tests": len(rows),
                    "accuracy": sum(r["counted"] for r in rows) / len(rows),
                    "mean_rouge1_recall": sum(r["rouge1_recall"] for r in rows) / len(rows), "heads": heads})  # fmt: skip
    # the model that ran the ablations (not the scan's provenance: its extras, e.g. the scan's own edits, do not apply)
    prov = model.provenance.with_run(definition=f"Wu2024 causal test: NIAH accuracy, top-{k} vs random-{k} heads ablated ({mode})",
                                     ranked_on=result.provenance.weights_hash if result.provenance is not None else None,
                                     ranked_by=result.provenance.definition if result.provenance is not None else None,
                                     complete=complete)  # fmt: skip
    runs = pd.DataFrame(out, columns=["ablated", "seed", "k", "mode", "tests", "accuracy", "mean_rouge1_recall", "heads"])
    tests = pd.DataFrame([{"run": j, **{c: v for c, v in r.items() if c != "scores"}} for j, r in done],
                         columns=["run", *_TEST_COLUMNS])  # fmt: skip
    return AblationResult(runs=runs, provenance=prov, tests=tests, complete=complete)
