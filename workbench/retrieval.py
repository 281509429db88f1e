"""Retrieval heads (Wu et al. 2024): NIAH scan with in-kernel top-1 attention, and the causal ablation test.

Definition (shared/DESIGN.md §3). At each greedy decode step the forward pass on the previous token
produces token ``w``; a query head copy-pastes when its top-1 attention position ``i`` lies in the
needle span and ``prompt_ids[i] == w``. Score of a test = |copied needle positions| / |needle tokens|
(variant ``set``, the paper) or the number of copying steps / |needle tokens| (``per_step``, the
released code). As in the released code, the first token (produced by the prompt pass) is not
scored. Tests count only when the answer's ROUGE-1 recall against the needle is > 0.5; scores are
averaged over counted tests; heads scoring > 0.1 are retrieval heads.
"""
from __future__ import annotations

from contextlib import nullcontext
import warnings
from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import niah
from .attention import AttentionStats, HeadAblation
from .capture import capture, intervene
from .display import Figures
from .errors import ProbeError

VARIANTS = ("set", "per_step")
RETRIEVAL_THRESHOLD = 0.1
ROUGE_THRESHOLD = 0.5


def rouge1_recall(needle: str, response: str) -> float:
    """ROUGE-1 recall of ``response`` against ``needle`` (Google's rouge-score, as Wu et al.)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"]).score(needle, response)["rouge1"].recall


@dataclass
class RetrievalResult(Figures):
    """Per-head retrieval scores ``[layer, head]`` plus every test that produced them."""

    scores: torch.Tensor
    tests: pd.DataFrame  # one row per test: length, depth, needle, rouge, counted, response, ...
    per_test_scores: torch.Tensor  # [tests, layer, head]
    variant: str
    provenance: object
    ablation: str | None = None
    extra: dict = field(default_factory=dict)

    def retrieval_heads(self, threshold: float = RETRIEVAL_THRESHOLD) -> list[tuple[int, int]]:
        """(layer, head) pairs whose mean score exceeds ``threshold`` (Wu: 0.1), best first."""
        idx = (self.scores > threshold).nonzero().tolist()
        return sorted(((l, h) for l, h in idx), key=lambda lh: -float(self.scores[lh]))

    def top_heads(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` best-scoring (layer, head, score)."""
        from .report import top_cells

        return top_cells(self.scores, k)

    def accuracy_grid(self) -> pd.DataFrame:
        """NIAH accuracy (fraction of tests with ROUGE-1 recall > 0.5) per context length × depth."""
        return self.tests.pivot_table(index="depth", columns="length", values="counted", aggfunc="mean")

    @property
    def accuracy(self) -> float:
        return float(self.tests["counted"].mean())

    def sparsity(self) -> dict[str, float]:
        """Share of heads above 0.1 and exactly 0 (Wu: 3–6% and 45–73%)."""
        s = self.scores
        return {"above_0.1": float((s > RETRIEVAL_THRESHOLD).double().mean()), "zero": float((s == 0).double().mean())}

    def save(self, store, prefix: str = "retrieval") -> None:
        """Write ``{prefix}_scores`` (layer, head, score) and ``{prefix}_tests`` to a ResultStore."""
        store.save(f"{prefix}_scores", self.to_frame(), self.provenance)
        store.save(f"{prefix}_tests", self.tests, self.provenance)

    def _figures(self) -> dict:
        from . import report

        return {
            "heads": lambda: report.head_grid(self.scores, f"retrieval score per head (Wu et al. 2024, {self.variant})", zmax=1),
            "niah": lambda: report.niah_grid(self.accuracy_grid()),
        }

    def to_frame(self) -> pd.DataFrame:
        L, H = self.scores.shape
        return pd.DataFrame(
            {"layer": [l for l in range(L) for _ in range(H)], "head": list(range(H)) * L, "score": self.scores.flatten().tolist()}
        )


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


def run_case(model, case: niah.NIAHCase, *, variant: str = "set", max_new_tokens: int = 32, edits=()) -> dict:
    """Generate greedily on one NIAH case and score every head."""
    ids = case.input_ids.to(model.device)
    pad = getattr(model.tokenizer, "eos_token_id", None)
    probe = AttentionStats(sink_keys=0, topk=1, rows="decode")
    ctx = intervene(model, *edits) if edits else nullcontext()
    with ctx, capture(model, probe) as cap, torch.no_grad():
        out = model.hf.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
    generated = out[0, ids.shape[1] :].cpu()
    response = model.tokenizer.decode(generated, skip_special_tokens=True)
    top1 = cap.attention.top1[:, 0] if cap.attention.steps else torch.empty(model.spec.n_layers, model.spec.n_heads, 0, dtype=torch.long)
    scores = _score_steps(top1, ids[0].cpu(), generated, case.needle_span, variant)
    rouge = rouge1_recall(case.needle.needle, response)
    return {
        "length": case.length, "depth": case.depth, "needle": case.needle.id, "response": response.strip(),
        "rouge1_recall": rouge, "counted": rouge > ROUGE_THRESHOLD,
        "answer_found": case.needle.answer.lower() in response.lower(),
        "needle_span": case.needle_span, "token_ids": ids[0].tolist(), "scores": scores,
    }  # fmt: skip


def _cases(model, lengths, depths, n_needles: int, max_new_tokens: int):
    if not lengths:
        raise ProbeError("no context lengths given")
    if n_needles < 1 or n_needles > len(niah.needles()):
        raise ProbeError(f"n_needles must lie in 1..{len(niah.needles())}, got {n_needles}")
    grid = niah.depth_grid(depths)
    cases = []
    for length in lengths:
        for j, depth in enumerate(grid):
            for n in range(n_needles):
                needle = niah.needles()[(j + n) % len(niah.needles())]  # vary needles across depths
                cases.append(niah.build_case(model, needle, int(length), depth, max_new_tokens=max_new_tokens))
    return cases


def _whole(x, what: str, low: int) -> int:
    """``x`` as an int ≥ ``low`` (a float with no fraction is fine; bools, strings and 2.5 are not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and not x.is_integer()):
        raise ProbeError(f"{what} must be a whole number, got {x!r}"[:200])
    if int(x) < low:
        raise ProbeError(f"{what} must be ≥ {low}, got {int(x)}")
    return int(x)


def _checked_grid(lengths, depths, n_needles, max_new_tokens):
    """The scan's grid arguments validated up front (a string of digits is not a list of lengths)."""
    if isinstance(lengths, (int, float)) and not isinstance(lengths, bool):
        lengths = [lengths]  # one length
    if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__iter__"):
        raise ProbeError(f"lengths must be a list of context lengths in tokens, e.g. [500, 1000]; got {lengths!r}"[:200])
    lengths = [_whole(n, "a context length", 1) for n in lengths]
    if isinstance(depths, (str, bytes)) or not (isinstance(depths, (int, float)) or hasattr(depths, "__iter__")):
        raise ProbeError(f"depths must be a number of depths or a list of percentages, got {depths!r}"[:200])
    if isinstance(depths, (int, float)) and not isinstance(depths, bool):
        if isinstance(depths, float) and not depths.is_integer():
            raise ProbeError(f"depths must be a whole number of depths (e.g. 5) or a list of percentages (e.g. [2.5]); got {depths}")
        depths = _whole(depths, "the number of depths", 1)
    elif isinstance(depths, bool):
        raise ProbeError(f"depths must be a number of depths or a list of percentages, got {depths!r}")
    else:
        depths = list(depths)
        for d in depths:
            if isinstance(d, bool) or not isinstance(d, (int, float)):
                raise ProbeError(f"depths must be percentages (numbers in [0, 100]), got {d!r}"[:200])
    n_needles = _whole(n_needles, "n_needles", 1)
    max_new_tokens = _whole(max_new_tokens, "max_new_tokens", 2)  # the first token is not scored: at least 2
    return lengths, depths, n_needles, max_new_tokens


def scan(
    model,
    lengths=(500, 1000, 2000),
    depths: int | list[float] = 5,
    *,
    n_needles: int = 1,
    variant: str = "set",
    max_new_tokens: int = 32,
    edits=(),
    progress: bool = True,
) -> RetrievalResult:
    """Wu et al.'s retrieval score for every (layer, query head) over a NIAH grid. All cases are built
    (and every bad input rejected) before the model runs."""
    lengths, depths, n_needles, max_new_tokens = _checked_grid(lengths, depths, n_needles, max_new_tokens)
    if variant not in VARIANTS:
        raise ProbeError(f"variant must be one of {VARIANTS}, got {variant!r}")
    cases = _cases(model, lengths, depths, n_needles, max_new_tokens)
    rows = []
    for case in tqdm(cases, desc="NIAH retrieval scan", unit="test", disable=not progress):
        rows.append(run_case(model, case, variant=variant, max_new_tokens=max_new_tokens, edits=edits))
    return assemble(model, rows, variant=variant, edits=edits)


def assemble(model, rows: list[dict], *, variant: str = "set", edits=()) -> RetrievalResult:
    """A :class:`RetrievalResult` from :func:`run_case` rows (for callers that drive the cases themselves,
    e.g. the dashboard, which reports progress and can stop between tests)."""
    if not rows:
        raise ProbeError("no NIAH test was run")
    rows = [dict(r) for r in rows]
    per_test = torch.stack([r.pop("scores") for r in rows])
    tests = pd.DataFrame(rows)
    counted = torch.tensor(tests["counted"].to_numpy(), dtype=torch.bool)
    if counted.any():
        scores = per_test[counted].mean(0).float()
    else:
        warnings.warn("no NIAH test was answered (ROUGE-1 recall > 0.5): retrieval scores are undefined (NaN)")
        scores = torch.full(per_test.shape[1:], float("nan"))
    labels = ", ".join(getattr(e, "label", type(e).__name__) for e in edits) or None
    prov = model.provenance.with_run(definition=f"Wu2024 retrieval score ({variant}); ROUGE-1>0.5; decode steps after the first",
                                     ablation=labels)  # fmt: skip
    return RetrievalResult(scores=scores, tests=tests, per_test_scores=per_test.float(), variant=variant, provenance=prov, ablation=labels)


def ablation_sets(spec, result: RetrievalResult, k: int, seeds) -> list[tuple[str, int | None, list[tuple[int, int]]]]:
    """The head sets of Wu's causal test: ("top", None, top-``k`` heads), then ("random", seed, ``k`` heads
    drawn outside the top-``k``) per seed."""
    from .study.plan import random_set  # the one seeded draw of K random heads (studies use it too)

    if not 1 <= k < spec.n_layers * spec.n_heads:
        raise ProbeError(f"k must lie in 1..{spec.n_layers * spec.n_heads - 1}, got {k}")
    top = [(l, h) for l, h, _ in result.top_heads(k)]
    everyone = [(l, h) for l in range(spec.n_layers) for h in range(spec.n_heads) if (l, h) not in top]
    return [("top", None, top)] + [("random", s, random_set(everyone, k, s)) for s in seeds]


def ablation_check(
    model,
    result: RetrievalResult,
    k: int = 10,
    *,
    mode: str = "uniform",
    seeds=(0, 1, 2),
    lengths=None,
    depths=None,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> pd.DataFrame:
    """Wu's causal test: NIAH accuracy with the top-``k`` retrieval heads ablated vs ``k`` random heads
    (one run per seed; random heads exclude the top ones). ``mode`` labels the ablation used."""
    from .attention.edits import ABLATION_MODES

    if mode not in ABLATION_MODES:  # checked before the first scan, not after it
        raise ProbeError(f"ablation mode must be one of {ABLATION_MODES}, got {mode!r}")
    _whole(k, "k", 1)
    _whole(max_new_tokens, "max_new_tokens", 2)
    lengths = sorted(result.tests["length"].unique().tolist()) if lengths is None else lengths
    depths = sorted(result.tests["depth"].unique().tolist()) if depths is None else depths
    runs = [("none", None, [])] + ablation_sets(model.spec, result, k, seeds)
    out = []
    for kind, seed, heads in tqdm(runs, desc=f"ablation ({mode})", unit="run", disable=not progress):
        edits = (HeadAblation(heads, mode=mode),) if heads else ()
        r = scan(model, lengths, depths, variant=result.variant, max_new_tokens=max_new_tokens, edits=edits, progress=False)
        out.append({"ablated": kind, "seed": seed, "k": k if heads else 0, "mode": mode, "accuracy": r.accuracy,
                    "mean_rouge1_recall": float(r.tests["rouge1_recall"].mean()), "heads": heads})  # fmt: skip
    return pd.DataFrame(out)
