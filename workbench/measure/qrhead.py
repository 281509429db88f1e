"""Query-focused retrieval heads (QRHead; Zhang et al. 2025, "Query-Focused Retrieval Heads Improve
Long-Context Reasoning and Re-ranking"), measured on the NIAH prompts of :mod:`workbench.niah`
(docs/definitions.md, "Query-focused retrieval score (QRHead)").

Definition, as implemented
- Query rows Q: the tokens of the question inside the prompt (the ids where the prompt with the real
  question and the prompt with the null question differ, between their common prefix and common suffix).
  Gold span D: the needle's tokens (``NIAHCase.needle_span``).
- Mass of a head on the gold span: m = (1/|Q|) Σ_{i∈Q} Σ_{j∈D} p_ij, the mean over query rows of the row's
  attention mass on D, reduced in the backend (``AttentionStats(spans={"gold": D})``, ``attn.span.gold``).
  QRHead sums over the query tokens; the mean (= sum / |Q|) lets the real and the null question, whose
  token counts differ, be compared.
- Calibration (QRHead after ICR, Chen et al. 2024): the same prompt with the question replaced by a null,
  content-free query (``null_query = "N/A"``) gives m_null over its own query rows; the document, needle and
  their positions are identical. Score of a case: m − m_null.
- QR score of a head: the mean over the NIAH cases (lengths × depths × needles, as in
  ``retrieval.RetrievalConfig``). One prompt pass per case and its null twin, no generation. Heads are scored
  per query head (GQA: every query head of a KV group separately).
- Cost: the prompt up to the question is the same in the real and the null pass, so it runs once (plain
  attention, no statistics) and its KV cache serves both questions; only the question rows are reduced.

``QRResult.agreement`` compares the ranking with Wu et al.'s retrieval scores (per query head) and with
DuoAttention's gates (per KV head; a KV head's QR / Wu score is the maximum over its query heads, as
``DuoResult.agreement`` does): Spearman rank correlation (average ranks for ties) and top-k overlap.
"""
from __future__ import annotations

import copy
import inspect
import json
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch

from . import niah
from ..base import plots
from ..attention import AttentionStats
from ..core.capture import capture, edit_labels, intervene
from ..base.errors import ProbeError
from .result import Result, top_cells
from .scan import config_of, int_list, int_value, run_cases

NULL_QUERY = "N/A"
DEFINITION = "QRHead 2025: mean over query rows of attention mass on the needle span, minus the same under the null query {null!r}; " \
             "mean over NIAH cases"  # fmt: skip


@dataclass(frozen=True)
class QRCase:
    """One NIAH prompt and its null twin: ids ``[1, T]`` / ``[1, T']``, the query rows (start, end) of each and
    the needle span (the same in both: the null question comes after the document)."""

    length: int
    depth: float
    needle_id: str
    ids: torch.Tensor
    null_ids: torch.Tensor
    query: tuple[int, int]
    null_query: tuple[int, int]
    needle_span: tuple[int, int]


def _differing(a: list[int], b: list[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The spans where ``a`` and ``b`` differ, between their common prefix and common suffix."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[-1 - s] == b[-1 - s]:
        s += 1
    return (p, len(a) - s), (p, len(b) - s)


def build_case(model, needle: niah.Needle, length: int, depth: float, *, null_query: str = NULL_QUERY) -> QRCase:
    """The NIAH prompt of ``needle`` at ``length`` tokens and ``depth`` % (:func:`workbench.niah.build_case`)
    and the same prompt with the question replaced by ``null_query``; query rows located in both."""
    case = niah.build_case(model, needle, length, depth, max_new_tokens=0)
    adds_bos = bool(model.spec.bos and model.spec.bos.adds_bos)
    _, after = niah._prompt_parts(model.tokenizer, needle.question, adds_bos)
    _, after_null = niah._prompt_parts(model.tokenizer, null_query, adds_bos)
    ids = case.input_ids[0].tolist()
    head = ids[: len(ids) - len(after)]
    if ids[len(head) :] != after:
        raise ProbeError(f"needle {needle.id!r}: the prompt does not end with its question part; cannot locate the query rows")
    (q0, q1), (n0, n1) = _differing(after, after_null)
    if q1 <= q0 or n1 <= n0:
        raise ProbeError(f"needle {needle.id!r}: the question and the null query {null_query!r} give no differing tokens")
    null_ids = head + after_null
    if model.spec.max_positions and len(null_ids) > model.spec.max_positions:
        raise ProbeError(f"the null prompt has {len(null_ids)} tokens; the model supports {model.spec.max_positions}")
    return QRCase(length, float(depth), needle.id, case.input_ids, torch.tensor([null_ids]), (len(head) + q0, len(head) + q1),
                  (len(head) + n0, len(head) + n1), case.needle_span)  # fmt: skip


def _cache_kwargs(model, past) -> dict:
    """The KV cache argument under the name this transformers version uses (``cache`` from 5.2x, else
    ``past_key_values``)."""
    if past is None:
        return {"use_cache": False}
    name = "cache" if "cache" in inspect.signature(model.hf.forward).parameters else "past_key_values"
    return {name: past, "use_cache": True}


@torch.no_grad()
def gold_mass(model, ids: torch.Tensor, rows: tuple[int, int], span: tuple[int, int], *, past=None) -> torch.Tensor:
    """Mean over query ``rows`` (start, end) of each head's attention mass on key ``span`` ``[layer, head]``,
    reduced in the attention backend. Without ``past`` one forward pass over ``ids[:, :end]``; with ``past`` (the
    KV cache of ``ids[:, :start]``, consumed) only the query rows run."""
    q0, q1 = rows
    x = ids[:, q0:q1] if past is not None else ids[:, :q1]
    with capture(model, AttentionStats(sink_keys=0, spans={"gold": tuple(span)}), names_filter="blocks.*.attn.span.gold") as cap:
        model.hf(input_ids=x.to(model.device), **_cache_kwargs(model, past), logits_to_keep=1)
    mass = cap.stack("attn.span.gold")[:, 0].double()  # [L, H, rows run]
    return (mass if past is not None else mass[..., q0:q1]).mean(-1)


@torch.no_grad()
def run_case(model, case: QRCase) -> dict:
    """The gold-span mass under the real and the null question, per head. The prompt before the question is
    the same in both: it runs once (no statistics) and its KV cache serves both questions, whose rows are
    the only ones the backend reduces (causal attention: later tokens cannot change them)."""
    start = case.query[0]
    if case.null_query[0] != start or not torch.equal(case.ids[:, :start], case.null_ids[:, :start]):
        raise ProbeError("the real and the null prompt must share every token before the question")
    out = model.hf(input_ids=case.ids[:, :start].to(model.device), use_cache=True, logits_to_keep=1)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    null_cache = copy.deepcopy(cache)
    return {"real": gold_mass(model, case.ids, case.query, case.needle_span, past=cache),
            "null": gold_mass(model, case.null_ids, case.null_query, case.needle_span, past=null_cache)}  # fmt: skip


@dataclass(frozen=True)
class QRConfig:
    """A QRHead scan: one NIAH prompt (and its null twin) per (length, depth, needle) — ``lengths``,
    ``depths`` (a count spread over 0–100 % or explicit percentages) and ``n_needles`` as in
    ``retrieval.RetrievalConfig``; ``null_query`` replaces the question in the calibration pass."""

    lengths: tuple[int, ...] = (500, 1000, 2000)
    depths: int | tuple[float, ...] = 5
    n_needles: int = 1
    null_query: str = NULL_QUERY

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("lengths", int_list(self.lengths, "lengths", lo=1))
        if isinstance(self.depths, (list, tuple)):
            if any(isinstance(d, bool) or not isinstance(d, (int, float)) for d in self.depths):
                raise ProbeError(f"depths must be numbers (percent of the document), got {self.depths!r}")
            set_("depths", tuple(niah.depth_grid([float(d) for d in self.depths])))
        else:
            set_("depths", int_value(self.depths, "depths (a count; or give a list of percentages)", lo=1))
        set_("n_needles", int_value(self.n_needles, "n_needles", lo=1, hi=len(niah.needles())))
        if not isinstance(self.null_query, str) or not self.null_query.strip():
            raise ProbeError(f"null_query must be a non-empty string (QRHead uses 'N/A'), got {self.null_query!r}")

    def cases(self, model) -> list[QRCase]:
        """Every case, built and checked against the model before anything runs."""
        grid = niah.depth_grid(list(self.depths) if isinstance(self.depths, tuple) else self.depths)
        pool = niah.needles()
        out = []
        for length in self.lengths:
            for j, depth in enumerate(grid):
                for n in range(self.n_needles):
                    needle = pool[(j + n) % len(pool)]
                    if needle.question.strip() == self.null_query.strip():
                        raise ProbeError(f"null_query {self.null_query!r} equals needle {needle.id!r}'s question")
                    out.append(build_case(model, needle, length, depth, null_query=self.null_query))
        return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally shaped tensors (average ranks for ties; NaN pairs dropped;
    NaN when either side is constant)."""
    x, y = a.flatten().double(), b.flatten().double()
    ok = ~(torch.isnan(x) | torch.isnan(y))
    rx, ry = (pd.Series(v[ok].numpy()).rank(method="average").to_numpy() for v in (x, y))
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(pd.Series(rx).corr(pd.Series(ry)))


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """|top-k of a ∩ top-k of b| / k over cells (NaN ranks last)."""
    k = min(k, a.numel())
    top = lambda t: set(torch.nan_to_num(t.flatten().double(), nan=-torch.inf).topk(k).indices.tolist())  # noqa: E731
    return len(top(a) & top(b)) / k


@dataclass(repr=False)
class QRResult(Result):
    """Per-case gold-span masses under the real and the null question ``[case, layer, head]`` and the
    cases; ``qr_score`` = mean over cases of their difference. ``grids()``: ``qr_score``, ``query_mass``,
    ``null_mass``."""

    real: torch.Tensor
    null: torch.Tensor
    cases: pd.DataFrame  # length, depth, needle, needle_span, query/null_query rows, tokens/null_tokens, token_ids/null_token_ids
    null_query: str
    provenance: object
    complete: bool = True

    kind: ClassVar[str] = "qrhead"
    table_names: ClassVar[tuple[str, ...]] = ("scores", "per_case", "cases")

    @property
    def scores(self) -> torch.Tensor:
        """QR score per head ``[layer, head]`` (NaN when no case finished)."""
        return (self.real - self.null).mean(0).float() if len(self.real) else torch.full(self.real.shape[1:], torch.nan)

    def top_heads(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the highest QR score, as (layer, head, score)."""
        return top_cells(self.scores, k)

    def grids(self) -> dict[str, torch.Tensor]:
        mean = lambda t: t.mean(0).float() if len(t) else torch.full(t.shape[1:], torch.nan)  # noqa: E731
        return {"qr_score": self.scores, "query_mass": mean(self.real), "null_mass": mean(self.null)}

    def _kv(self, scores: torch.Tensor, group: int) -> torch.Tensor:
        return scores.view(scores.shape[0], -1, group).nan_to_num(-torch.inf).amax(-1)

    def agreement(self, wu, duo=None, *, k: int = 10, k_kv: int | None = None) -> pd.DataFrame:
        """How the QRHead ranking agrees with Wu et al.'s retrieval scores (``wu``: a ``RetrievalResult`` or
        its ``[layer, head]`` scores) and, given ``duo`` (a ``DuoResult`` or its ``[layer, kv_head]`` gates),
        with DuoAttention per KV head (a KV head's QR / Wu score: the maximum over its query heads). One row per
        pair: Spearman rank correlation over every head and the overlap of the top-k sets (``k`` query heads;
        ``k_kv`` KV heads, default k / group size)."""
        k = int_value(k, "k", lo=1)
        qr = self.scores
        wu_s = getattr(wu, "scores", wu)
        if not isinstance(wu_s, torch.Tensor) or tuple(wu_s.shape) != tuple(qr.shape):
            raise ProbeError(f"wu must be a RetrievalResult or scores [layer, head] = {tuple(qr.shape)}, got "
                             f"{tuple(wu_s.shape) if isinstance(wu_s, torch.Tensor) else type(wu).__name__}")  # fmt: skip
        rows = [("qrhead", "wu", "head", qr, wu_s.float(), k)]
        if duo is not None:
            gates = getattr(duo, "gates", duo)
            if not isinstance(gates, torch.Tensor) or gates.dim() != 2 or gates.shape[0] != qr.shape[0] or qr.shape[1] % gates.shape[1]:
                raise ProbeError(f"duo must be a DuoResult or gates [layer, kv_head] with {qr.shape[0]} layers and a KV head count "
                                 f"dividing {qr.shape[1]} query heads, got {tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(duo).__name__}")  # fmt: skip
            group = qr.shape[1] // gates.shape[1]
            kk = int_value(k_kv, "k_kv", lo=1) if k_kv is not None else max(1, round(k / group))
            rows += [("qrhead", "duo", "kv_head", self._kv(qr, group), gates.float(), kk),
                     ("wu", "duo", "kv_head", self._kv(wu_s.float(), group), gates.float(), kk)]  # fmt: skip
        out = [{"a": a, "b": b, "unit": unit, "n": int(x.numel()), "spearman": spearman(x, y), "k": kk, "top_k_overlap": top_overlap(x, y, kk)}
               for a, b, unit, x, y, kk in rows]  # fmt: skip
        return pd.DataFrame(out)

    def agreement_heads(self, wu, duo=None) -> pd.DataFrame:
        """One row per query head: QR score and rank, Wu score and rank (rank 1 = best, ties averaged) and,
        with ``duo``, its KV head's gate and rank among KV heads."""
        qr, wu_s = self.scores, getattr(wu, "scores", wu).float()
        L, H = qr.shape
        df = pd.DataFrame({"layer": [l for l in range(L) for _ in range(H)], "head": list(range(H)) * L,
                           "qr_score": qr.flatten().tolist(), "wu_score": wu_s.flatten().tolist()})  # fmt: skip
        df["qr_rank"] = df["qr_score"].rank(ascending=False, method="average")
        df["wu_rank"] = df["wu_score"].rank(ascending=False, method="average")
        if duo is not None:
            gates = getattr(duo, "gates", duo).float()
            group = H // gates.shape[1]
            df["kv_head"] = df["head"] // group
            kv_rank = pd.Series(gates.flatten().numpy()).rank(ascending=False, method="average").to_numpy().reshape(gates.shape)
            df["duo_gate"] = [float(gates[l, h]) for l, h in zip(df["layer"], df["kv_head"])]
            df["duo_kv_rank"] = [float(kv_rank[l, h]) for l, h in zip(df["layer"], df["kv_head"])]
        return df.sort_values("qr_rank", kind="stable").reset_index(drop=True)

    # --- the result protocol -----------------------------------------------------------------------------
    def heads(self) -> pd.DataFrame:
        """One row per query head: QR score (best first), mean mass on the needle under the real and the null query."""
        return super().heads()

    def summary(self) -> str:
        """The text a CLI prints: cases, top heads by QR score, score range and the strongest layers."""
        state = "" if self.complete else f" — cancelled, {len(self.cases)} case(s) done"
        lines = [f"QRHead: calibrated query → needle attention over {len(self.cases)} NIAH case(s) "
                 f"(null query {self.null_query!r}){state}"]  # fmt: skip
        if not len(self.real):
            return "\n".join(lines + ["no case finished: nothing to report"])
        s = self.scores
        lines.append("top heads: " + ", ".join(f"L{l}H{h} {v:.3f}" for l, h, v in self.top_heads(8)))
        per_layer = s.amax(1)
        best = sorted(range(len(per_layer)), key=lambda l: -float(per_layer[l]))[:3]
        lines.append(f"score range {float(s.min()):.3f} … {float(s.max()):.3f}; median {float(s.median()):.3f}; "
                     f"strongest layers: " + ", ".join(f"L{l} (max {float(per_layer[l]):.3f})" for l in best))  # fmt: skip
        return "\n".join(lines)

    def figures(self) -> dict:
        """``heads``: QR score per head (negative scores drawn as 0); ``masses``: the uncalibrated query → needle mass."""
        return {
            "heads": lambda: plots.head_grid(self.scores.clamp_min(0), "QRHead score per head: query → needle mass minus null-query mass",
                                             colorbar="calibrated mass"),
            "masses": lambda: plots.head_grid(self.grids()["query_mass"], "mean query → needle attention mass (real question)",
                                              colorbar="mass", zmax=1),
        }  # fmt: skip

    def tables(self) -> dict[str, pd.DataFrame]:
        n, L, H = self.real.shape
        idx = torch.cartesian_prod(torch.arange(n), torch.arange(L), torch.arange(H)) if n else torch.zeros(0, 3, dtype=torch.long)
        per_case = pd.DataFrame({"case": idx[:, 0].numpy(), "layer": idx[:, 1].numpy(), "head": idx[:, 2].numpy(),
                                 "real": self.real.flatten().numpy(), "null": self.null.flatten().numpy()})  # fmt: skip
        scores = pd.DataFrame({"layer": [l for l in range(L) for _ in range(H)], "head": list(range(H)) * L,
                               "qr_score": self.scores.flatten().tolist()})  # fmt: skip
        scores = scores.assign(null_query=self.null_query, complete=self.complete)
        return {"scores": scores, "per_case": per_case, "cases": self.cases}

    @classmethod
    def from_tables(cls, tables, provenance) -> "QRResult":
        sc, pc, cases = tables["scores"], tables["per_case"], tables["cases"].copy()
        L, H = int(sc["layer"].max()) + 1, int(sc["head"].max()) + 1
        pc = pc.sort_values(["case", "layer", "head"])
        grid = lambda col: torch.tensor(pc[col].to_numpy(), dtype=torch.float64).view(-1, L, H)  # noqa: E731
        for col in ("needle_span", "query_rows", "null_query_rows"):
            if col in cases:
                cases[col] = cases[col].map(lambda v: tuple(json.loads(v) if isinstance(v, str) else v))
        for col in ("token_ids", "null_token_ids"):
            if col in cases:
                cases[col] = cases[col].map(lambda v: json.loads(v) if isinstance(v, str) else list(v))
        return cls(real=grid("real"), null=grid("null"), cases=cases, null_query=str(sc["null_query"].iloc[0]), provenance=provenance,
                   complete=bool(sc["complete"].iloc[0]))  # fmt: skip


_CASE_COLUMNS = ["length", "depth", "needle", "needle_span", "query_rows", "null_query_rows", "tokens", "null_tokens", "token_ids",
                 "null_token_ids"]  # fmt: skip


def scan(model, config: QRConfig | None = None, *, edits=(), on_case=None, cancel=None, progress: bool = True,
         **fields) -> QRResult:  # fmt: skip
    """QRHead scores of every (layer, query head) over a NIAH grid (``QRConfig`` fields as keywords:
    ``lengths``, ``depths``, ``n_needles``, ``null_query``): two prompt passes per case, no generation.
    Every case is built and checked before the model runs."""
    cfg = config_of(QRConfig, config, fields)
    cases = cfg.cases(model)
    with intervene(model, *edits) if edits else nullcontext():
        done, complete = run_cases(cases, lambda c: run_case(model, c), on_case=on_case, cancel=cancel, progress=progress,
                                   desc="QRHead scan", unit="case")  # fmt: skip
    L, H = model.spec.n_layers, model.spec.n_heads
    stack = lambda key: torch.stack([d[key] for d in done]) if done else torch.zeros(0, L, H, dtype=torch.float64)  # noqa: E731
    rows = [(c.length, c.depth, c.needle_id, c.needle_span, c.query, c.null_query, c.ids.shape[1], c.null_ids.shape[1],
             c.ids[0].tolist(), c.null_ids[0].tolist()) for c in cases[: len(done)]]  # fmt: skip
    prov = model.provenance.with_run(definition=DEFINITION.format(null=cfg.null_query), cases=len(done),
                                     edits=", ".join(edit_labels(edits)) or None, complete=complete)  # fmt: skip
    return QRResult(real=stack("real"), null=stack("null"), cases=pd.DataFrame(rows, columns=_CASE_COLUMNS), null_query=cfg.null_query,
                    provenance=prov, complete=complete)  # fmt: skip
