"""The hook vocabulary: every quantity workbench captures or edits has one stable dotted name.

Names follow TransformerLens where the concept matches (``blocks.3.hook_resid_post``,
``blocks.3.attn.hook_z``, ``blocks.3.mlp.hook_post``); statistics reduced inside the attention
backend live under ``blocks.{l}.attn.*`` and MoE routing under ``blocks.{l}.mlp.router.*``.
:data:`POINTS` is the whole table (shape, meaning, whether a hook may replace the value);
:func:`available` lists the names one model has; :func:`select` turns a ``names_filter``
(a name, a glob, a list or a callable) into names, with close matches for a misspelt one.

Shapes: ``row`` is the token axis of every captured forward call, concatenated in call order (a
prompt's positions, then one row per decode step); ``batch`` is the sequence in the batch.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

from ..base.errors import ProbeError

NamesFilter = Union[str, Sequence[str], Callable[[str], bool], None]


@dataclass(frozen=True)
class Point:
    """One kind of hook point, per layer: ``blocks.{layer}.{suffix}``."""

    suffix: str  # e.g. "attn.entropy"; "{}" stands for a user-chosen span name or tile index
    shape: str
    doc: str
    family: str  # attention (reduced in the backend) | activation (a module's tensor) | routing
    combine: str  # how forward calls combine: "rows:<axis>" (concatenate), "sum", "ratio" (Σ num / Σ den)
    editable: bool = False  # a hook inside ``intervene`` may return a replacement
    configured: bool = False  # exists only when a probe asks for it (AttentionStats(topk=k), spans, tiles)


_ROW = "rows:2"
POINTS: tuple[Point, ...] = (
    # --- attention, reduced inside the backend (never an N×N matrix) ---------------------------------------
    Point("attn.entropy", "[batch, head, row]", "entropy (nats) of each query row's attention distribution", "attention", _ROW),
    Point("attn.lse", "[batch, head, row]", "log-sum-exp of each row's scaled scores (−inf: the row saw no key)", "attention", _ROW),
    Point("attn.top1", "[batch, head, row]", "key index each row attends to most (−1: saw no key); indices count cache positions", "attention", _ROW),
    Point("attn.top1_prob", "[batch, head, row]", "probability of that key", "attention", _ROW),
    Point("attn.topk", "[batch, head, row, k]", "the k most attended keys per row (AttentionStats(topk=k), k > 1)", "attention", _ROW,
          configured=True),
    Point("attn.topk_prob", "[batch, head, row, k]", "their probabilities", "attention", _ROW, configured=True),
    Point("attn.alpha", "[batch, head, key]", "Gu et al.'s α_k for the tracked keys (sink_keys + key_positions, counted from "
          "each sequence's first real token): mean attention key k receives from the captured rows that can see it", "attention", "ratio"),
    Point("attn.key_mass", "[batch, head, key]", "attention every key receives, summed over the captured rows "
          "(AttentionStats(key_mass=True); keys counted from the first real token)", "attention", "sum"),
    Point("attn.key_count", "[batch, key]", "how many captured rows can see each key (α for every key = key_mass / key_count)", "attention", "sum"),
    Point("attn.span.{}", "[batch, head, row]", "attention mass on the named span (AttentionStats(spans={name: ...}))", "attention", _ROW,
          configured=True),
    Point("attn.tile.{}", "[batch, head, row, key]", "exact probabilities of tile i (AttentionStats(tiles=[...])), its rows only", "attention", _ROW,
          configured=True),
    Point("attn.hook_z_norm", "[batch, head, row]", "L2 norm of each head's output (TransformerLens hook_z) per token", "attention", _ROW),
    # head-type statistics (AttentionStats(taxonomy=True)): per row, exactly, at any length — docs/definitions.md
    Point("attn.self_mass", "[batch, head, row]", "p_{i,i}: attention on the row's own token", "attention", _ROW),
    Point("attn.prev_mass", "[batch, head, row]", "p_{i,i−1}: attention on the previous token", "attention", _ROW),
    Point("attn.local_mass", "[batch, head, row]", "attention within the last `local_window` keys (i − j < w)", "attention", _ROW),
    Point("attn.dist_mean", "[batch, head, row]", "Σ_j p_ij (i − j): mean attention distance", "attention", _ROW),
    Point("attn.dist_var", "[batch, head, row]", "Σ_j p_ij (i − j)² − mean²: spread of attention distance", "attention", _ROW),
    Point("attn.induction_mass", "[batch, head, row]", "p_{i, j*+1}, j* the previous occurrence of token i (NaN: none)",
          "attention", _ROW),
    Point("attn.hook_q", "[batch, row, head, d_head]", "queries after rotary embedding, before scaling (AttentionStats(qk=True))", "attention",
          "rows:1", configured=True),
    Point("attn.hook_k", "[batch, row, kv_head, d_head]", "keys after rotary embedding, one row per token (AttentionStats(qk=True))",
          "attention", "rows:1", configured=True),
    # --- module tensors (full for short inputs, or reduced: .norm, .max_abs, .topk, .topk_dims) ----------------
    Point("hook_resid_pre", "[batch, row, d_model]", "residual stream entering the block", "activation", "rows:1", True),
    Point("hook_resid_post", "[batch, row, d_model]", "residual stream leaving the block (the decoder layer's output)", "activation", "rows:1", True),
    Point("hook_attn_out", "[batch, row, d_model]", "the attention module's output (before any post-attention norm, e.g. Gemma's)", "activation", "rows:1", True),
    Point("hook_mlp_out", "[batch, row, d_model]", "the MLP (or MoE block) output", "activation", "rows:1", True),
    Point("attn.hook_z", "[batch, row, head, d_head]", "each head's attention output, before the output projection", "activation", "rows:1", True),
    Point("mlp.hook_post", "[batch, row, d_mlp]", "the MLP's hidden activation, input of its down projection (dense MLPs only)", "activation", "rows:1", True),
    # --- MoE routing ------------------------------------------------------------------------------------------------
    Point("mlp.router.logits", "[batch, row, expert]", "router logits as the router computed them", "routing", "rows:1", True),
    Point("mlp.router.experts", "[batch, row, k]", "experts each token was routed to, best first (−1 pads when k varies)", "routing", "rows:1"),
    Point("mlp.router.weights", "[batch, row, k]", "their mixing weights as the router returned them", "routing", "rows:1"),
    Point("mlp.router.scores", "[batch, row, expert]", "what the routing rule ranks experts by (−inf excluded, +inf forced)", "routing", "rows:1"),
    Point("mlp.router.margin", "[batch, row]", "k-th minus (k+1)-th rule score: small margins flip under noise", "routing", "rows:1"),
    Point("mlp.router.ran", "[batch, row, k]", "experts the experts module actually received, in rank order (−1: not observed)", "routing", "rows:1"),
    Point("mlp.router.agrees", "[batch, row]", "the routing rule recomputed from the logits gives the router's experts and weights", "routing", "rows:1"),
)
#: TransformerLens spellings accepted everywhere a name is
ALIASES = {"mlp.hook_expert_indices": "mlp.router.experts", "mlp.hook_expert_weights": "mlp.router.weights"}
#: reductions of module tensors, asked for as a name suffix: ``blocks.3.hook_resid_post.norm``
REDUCTIONS = {
    "norm": ("[batch, row]", "L2 norm over the last dimension"),
    "max_abs": ("[batch, row]", "largest absolute value over the last dimension"),
    "topk": ("[batch, row, k]", "the k entries of largest absolute value (signed; Activations(k=...))"),
    "topk_dims": ("[batch, row, k]", "their indices in the last dimension"),
}
REDUCIBLE = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_post")
_BY_SUFFIX = {p.suffix: p for p in POINTS}
_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def name(layer: int, suffix: str) -> str:
    """``name(3, "hook_resid_post")`` → ``"blocks.3.hook_resid_post"``."""
    return f"blocks.{int(layer)}.{suffix}"


def split(full: str) -> tuple[int, str]:
    """``"blocks.17.attn.top1"`` → ``(17, "attn.top1")``; aliases resolved."""
    m = _NAME.match(full)
    if not m:
        raise ProbeError(f"{full!r} is not a workbench hook name; names look like blocks.3.attn.entropy (see workbench.names)")
    layer, suffix = int(m.group(1)), m.group(2)
    return layer, ALIASES.get(suffix, suffix)


def canonical(full: str) -> str:
    """The name with TransformerLens aliases replaced by workbench's spelling."""
    layer, suffix = split(full)
    return name(layer, suffix)


def point(suffix: str) -> Point | None:
    """The :class:`Point` a suffix belongs to (span/tile/reduction suffixes included)."""
    suffix = ALIASES.get(suffix, suffix)
    if suffix in _BY_SUFFIX:
        return _BY_SUFFIX[suffix]
    for templ in ("attn.span.{}", "attn.tile.{}"):
        head = templ[: -len(".{}")]
        if suffix.startswith(head + ".") and len(suffix) > len(head) + 1:
            return _BY_SUFFIX[templ]
    base, _, red = suffix.rpartition(".")
    if red in REDUCTIONS and base in REDUCIBLE:
        full = _BY_SUFFIX[base]
        return Point(suffix, REDUCTIONS[red][0], f"{full.doc}: {REDUCTIONS[red][1]}", "activation", "rows:1")
    return None


def available(spec) -> list[str]:
    """Every name this model has (top-k, spans and tiles exist when a probe asks for them)."""
    out = []
    for layer in range(spec.n_layers):
        moe = layer in spec.moe_layers
        for p in POINTS:
            if p.configured:
                continue
            if p.family == "routing" and not moe:
                continue
            if p.suffix == "mlp.hook_post" and spec.mlp_down_paths[layer] is None:
                continue
            out.append(name(layer, p.suffix))
        for base in REDUCIBLE:
            if base == "mlp.hook_post" and spec.mlp_down_paths[layer] is None:
                continue
            out += [name(layer, f"{base}.{r}") for r in REDUCTIONS]
    return out


def sort_key(full: str):
    """Natural order: by layer number, then by the table's order."""
    m = _NAME.match(full)
    if not m:
        return (1 << 30, full)
    return (int(m.group(1)), m.group(2))


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def matcher(names_filter: NamesFilter) -> Callable[[str], bool]:
    """A predicate over full names from a ``names_filter``: a name, a glob (``blocks.*.attn.top1``),
    a list of those, or a callable ``name -> bool``. None keeps everything."""
    if names_filter is None:
        return lambda n: True
    if callable(names_filter):
        fn = names_filter
        return lambda n: bool(fn(n))
    items = _filter_items(names_filter)
    exact = {_canon_or_self(s) for s in items if not _is_glob(s)}
    globs = [_canon_glob(s) for s in items if _is_glob(s)]
    return lambda n: n in exact or any(fnmatch.fnmatchcase(n, g) for g in globs)


def _filter_items(names_filter) -> list[str]:
    """The names and globs of a non-callable ``names_filter``, or a clear error for anything else."""
    if isinstance(names_filter, str):
        return [names_filter]
    try:
        items = list(names_filter)
    except TypeError:
        items = None
    if items is None or not all(isinstance(s, str) for s in items):
        raise ProbeError(f"names_filter must be a name, a glob, a list of those or a callable, got {names_filter!r}")
    return items


def _canon_or_self(s: str) -> str:
    try:
        return canonical(s)
    except ProbeError:
        return s


def _canon_glob(g: str) -> str:
    """A glob with a TransformerLens alias as its last part spelled the workbench way
    (``blocks.*.mlp.hook_expert_indices`` → ``blocks.*.mlp.router.experts``)."""
    for alias, full in ALIASES.items():
        if g.endswith("." + alias):
            return g[: -len(alias)] + full
    return g


def check_filter(names_filter: NamesFilter, known: Iterable[str]) -> None:
    """Every literal name and glob in ``names_filter`` must match something in ``known``; else an error
    listing close matches (a filter that silently selects nothing is a bug in the caller's code)."""
    if names_filter is None or callable(names_filter):
        return
    known = list(known)
    items = _filter_items(names_filter)
    if not items:
        raise ProbeError("names_filter is empty: it selects no name (pass None to keep every name a probe emits)")
    for s in items:
        if _is_glob(s):
            if not any(fnmatch.fnmatchcase(n, _canon_glob(s)) for n in known):
                raise ProbeError(f"names_filter {s!r} matches no name of this model" + _suggest(s, known))
        elif _canon_or_self(s) not in known:
            raise unknown(s, known)


def unknown(full: str, known: Iterable[str], what: str = "name") -> ProbeError:
    """The error for a name that does not exist, listing the closest ones."""
    return ProbeError(f"unknown {what} {full!r}" + _suggest(full, list(known)))


def _suggest(s: str, known: list[str]) -> str:
    close = difflib.get_close_matches(_canon_or_self(s), known, n=5, cutoff=0.6)
    if close:
        return "; did you mean " + ", ".join(close) + "?"
    return "; list them with workbench.names.available(model.spec) or cap.names()"


def describe() -> str:
    """The vocabulary as a Markdown table (the README's table is generated from this)."""
    rows = ["| name | shape | meaning | editable |", "|---|---|---|---|"]
    for p in POINTS:
        rows.append(f"| `blocks.{{l}}.{p.suffix.replace('{}', '<name>' if 'span' in p.suffix else '<i>')}` | {p.shape} | {p.doc} | "
                    f"{'yes' if p.editable else ''} |")
    for r, (shape, doc) in REDUCTIONS.items():
        rows.append(f"| `blocks.{{l}}.<tensor>.{r}` | {shape} | {doc} |  |")
    for a, b in ALIASES.items():
        rows.append(f"| `blocks.{{l}}.{a}` | | alias of `{b}` (TransformerLens) |  |")
    return "\n".join(rows)
