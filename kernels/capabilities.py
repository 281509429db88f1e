"""What each attention path computes: one table, in code, that the backend's routing consults.

``CAPABILITIES`` maps a feature (a statistic, an edit, an input property or a limit) to whether the
chunked torch path and the Triton kernel support it. :func:`requested` lists the features a layer's
request and inputs need; the backend takes the Triton path only when :func:`triton_covers` says every
one of them is supported (input checks the table cannot express — dtype, head size, device — are the
kernel's ``ValueError``, after which the backend falls back to the chunked path). :func:`markdown`
renders the table for the README.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from . import semantics

MAX_TOPK = 8  # the kernel's running top-k list lives in registers
MAX_SPANS = 64  # span accumulators live in registers
MAX_MASK_EDITS = 8  # mask_keys edits per head: one flag bit each


@dataclass(frozen=True)
class Capability:
    kind: str  # statistic | edit | input | limit
    chunked: bool
    triton: bool
    notes: str


# fmt: off
CAPABILITIES: dict[str, Capability] = {
    # statistics (read off the probabilities actually used, i.e. after edits)
    "output": Capability("statistic", True, True, "attention output; fp16/bf16 inputs give input-dtype `out`, every statistic is fp32"),
    "lse": Capability("statistic", True, True, "log-sum-exp incl. the learned-sink slot; unchanged by uniform/calibrate"),
    "entropy": Capability("statistic", True, True, "nats, incl. the sink slot (single pass in the kernel)"),
    "topk": Capability("statistic", True, True, f"k ≤ {MAX_TOPK}; ties to the lower key position, -1/0 past a row's keys"),
    "topk>8": Capability("limit", True, False, f"k > {MAX_TOPK}: chunked path"),
    "col_prob": Capability("statistic", True, True, "probabilities of chosen key columns (+ `col_visible`); kernel: a second pass from saved row normalisers"),
    "span_mass": Capability("statistic", True, True, f"mass on key spans and query-relative windows, ≤ {MAX_SPANS} spans in the kernel"),
    "spans>64": Capability("limit", True, False, f"more than {MAX_SPANS} spans: chunked path"),
    "key_mass": Capability("statistic", True, True, "Σ over rows of p for every key (α_k for all keys) + `key_count`; kernel: a pass over key blocks, no N×N"),
    "tiles": Capability("statistic", True, True, "exact (q0, q1, k0, k1) windows of the matrix; kernel: second pass"),
    "distance_moments": Capability("statistic", True, True, "`dist_sum`, `dist_sq_sum`: Σ p·(i−j), Σ p·(i−j)² over real keys; kernel: main pass, centred per-block merges"),
    "row_key_prob": Capability("statistic", True, True, "p at one key per row (`row_keys`, e.g. induction keys j*+1; NaN where -1); kernel: second pass"),
    "record_outputs": Capability("statistic", True, True, "Σ of per-head outputs over rows (mean-ablation references), from `out`"),
    # edits
    "zero": Capability("edit", True, True, "head output rows set to 0 (after attention, both paths)"),
    "mean": Capability("edit", True, True, "head output rows set to a reference mean (after attention, both paths)"),
    "uniform": Capability("edit", True, True, "uniform over visible keys (Wu's masking); the sink slot gets 0"),
    "calibrate": Capability("edit", True, True, "ACT: sink keys × β, freed mass to the rest pro rata; kernel: row-normaliser pre-pass"),
    "mask_keys": Capability("edit", True, True, f"keys removed from view, the rest renormalise; ≤ {MAX_MASK_EDITS} per head in the kernel"),
    "streaming": Capability("edit", True, True, "only the first `sink` and last `recent` keys visible (DuoAttention emulation)"),
    "edit positions": Capability("edit", True, True, "any edit limited to given query positions"),
    "mask_keys>8 per head": Capability("limit", True, False, f"more than {MAX_MASK_EDITS} mask_keys edits on one head: chunked path"),
    "repeated edit per head": Capability("limit", True, False, "two streaming / uniform / calibrate edits on one head: chunked path"),
    "uniform+calibrate per head": Capability("limit", True, False, "uniform and calibrate on the same head: chunked path"),
    "gated": Capability("edit", False, False, "DuoAttention gate training: the backend runs its own differentiable torch function instead of either path"),
    # inputs
    "causal": Capability("input", True, True, "transformers' causal mask (block skipping in the kernel)"),
    "sliding window": Capability("input", True, True, "key > q − window (Gemma-3, GPT-OSS); kernel skips blocks outside the band"),
    "key padding": Capability("input", True, True, "padded keys invisible; padded query rows are computed and ignored"),
    "key_mass padding rows": Capability("limit", True, False, "right padding: padding query rows see real keys and are left out of key_mass / key_count (chunked path)"),
    "GQA/MQA": Capability("input", True, True, "query head h reads KV head h // (Hq / Hkv)"),
    "learned sinks": Capability("input", True, True, "GPT-OSS `s_aux`: an extra softmax slot without value"),
    "KV cache offsets": Capability("input", True, True, "prefill continuation and decode rows (absolute positions)"),
    "decode split": Capability("input", False, True, "few rows over a long cache: keys split over programs, lse-weighted combine (flash-decoding); torch needs none"),
    "other masks": Capability("input", True, False, "custom mask functions, dense 4-D masks, vmap-built masks: chunked path"),
    "dtypes": Capability("input", True, True, "kernel: fp32 / fp16 / bf16 (bf16 only compiled, not under the interpreter); chunked also fp64"),
    "head dims": Capability("input", True, True, "kernel: any D, Dv ≤ 256 (padded to a power of two)"),
}
# fmt: on


def requested(request, *, structured_mask: bool) -> list[str]:
    """The features a layer's ``LayerRequest`` needs (``structured_mask``: causal + window + padding only)."""
    need = ["output", "causal" if structured_mask else "other masks"]
    if request.gated is not None:
        need.append("gated")
    if request.record:
        need += ["lse", "entropy", "topk" if request.topk <= MAX_TOPK else "topk>8"]
        if request.key_columns is not None:
            need.append("col_prob")
        if request.spans is not None:
            need.append("span_mass" if request.spans.shape[0] <= MAX_SPANS else "spans>64")
        if request.key_mass:
            need.append("key_mass")
            if getattr(request, "query_valid", None) is not None:
                need.append("key_mass padding rows")
        if request.tiles:
            need.append("tiles")
        if getattr(request, "distance_moments", False):
            need.append("distance_moments")
        if getattr(request, "row_keys", None) is not None:
            need.append("row_key_prob")
    if request.record_outputs:
        need.append("record_outputs")
    per_head: dict[int, list[str]] = {}
    for e in request.edits:
        need.append(e.kind)
        if e.positions is not None:
            need.append("edit positions")
        per_head.setdefault(e.head, []).append(e.kind)
    for kinds in per_head.values():
        if kinds.count("mask_keys") > MAX_MASK_EDITS:
            need.append("mask_keys>8 per head")
        if any(kinds.count(k) > 1 for k in ("streaming",) + semantics.PROBABILITY_EDITS):
            need.append("repeated edit per head")
        if "uniform" in kinds and "calibrate" in kinds:
            need.append("uniform+calibrate per head")
    return need


def triton_covers(features: Iterable[str]) -> bool:
    """True when the Triton kernel supports every feature (unknown names: no)."""
    return all(f in CAPABILITIES and CAPABILITIES[f].triton for f in features)


def markdown() -> str:
    """The table as Markdown (README)."""
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    rows = ["| feature | kind | chunked (torch) | Triton | notes |", "|---|---|:-:|:-:|---|"]
    rows += [f"| {name} | {c.kind} | {yes(c.chunked)} | {yes(c.triton)} | {c.notes} |" for name, c in CAPABILITIES.items()]
    return "\n".join(rows)
