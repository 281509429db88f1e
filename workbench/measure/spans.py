"""Span profile of every head (MoA, Fu et al. 2024, "MoA: Mixture of Sparse Attention for Automatic Large
Language Model Compression"): how far back each head must look to hold most of its attention, and how that
reach grows with the input length (docs/definitions.md, "Span profile (MoA)").

Definition, as implemented
- Row span. For a query row i with probabilities p_ij over its visible keys j, the span at mass q
  (``q = 0.9`` default) is the smallest distance d such that Σ_{i−j<d} p_ij ≥ q (d = 1: the row's own key only).
  With ``sink = k`` > 0 the first k keys count as always kept, like MoA's masks (StreamingLLM's initial tokens
  plus a sliding window): the smallest d with Σ_{i−j<d or j<k} p_ij ≥ q. ``sink = 0`` is the published definition (docs/definitions.md).
- Without the matrix. The backend reduces, per row, the cumulative mass of windows of the last w keys
  (``AttentionStats(spans={"w8": Window(8), ...})``); the reported span of a row is the smallest window of a
  geometric grid whose mass reaches q (a window whose float32 mass lies within ``TOL`` = 1e-5 below q counts:
  float32 accumulation). Because window mass grows with w, this equals the exact span rounded *up* to the grid:
  exact when the exact span is a grid point, an upper bound between grid points. The grid has
  ``steps_per_octave`` points per doubling (``round(2^(j/s))``; s = 2: 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, …) plus
  every scanned length, so a reported span overstates the exact one by at most ≈ 2^(1/s) − 1 (41% for s = 2;
  :func:`resolution` gives the exact bound of a grid). With ``sink = k`` the k first keys' per-row masses are
  reduced as well (spans ``(j, j+1)``): the result stays exact at grid points. At most 64 reductions per layer
  (the Triton kernel's register budget), checked before the model runs.
- Per head and length. The span of a head at input length N is the median (lower median: a grid value) over
  the rows 0..N−1 of every text. For a causal model the first N rows of a longer input are the rows of its
  length-N prefix, so one forward pass per text at the largest N serves every length: ``span(N)`` compares
  prefixes of the same texts (default: the shipped prose, ``workbench.sinks.texts_for``).
- Elastic rule. Per head, least squares over the scanned lengths: span(N) = a + b·N. MoA's static heads have
  b ≈ 0 (a fixed local window); elastic heads widen with the input (b > 0). Here a head is *elastic* when
  b > ``ELASTIC_SLOPE`` = 0.05 (its span grows by more than 5 tokens per 100 input tokens), else *static*.
- Learned attention sinks (GPT-OSS) take part of each row's probability: the keys' mass then sums to less than
  1, and a row that never reaches q reports the whole row.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch

from ..base import plots
from ..attention import AttentionStats, Window
from ..core.capture import capture, edit_labels, intervene
from ..base.errors import ProbeError
from ..kernels.capabilities import MAX_SPANS  # span accumulators per layer the Triton kernel keeps in registers
from .result import Result, top_cells
from .scan import config_of, float_value, int_list, int_value, run_cases
from .sinks import SinkConfig, texts_for

DEFAULT_Q = 0.9
ELASTIC_SLOPE = 0.05
TOL = 1e-5
DEFINITION = "MoA span profile: smallest grid window holding >= q of each row's mass (q={q}, sink={sink}, {s} windows/octave); " \
             "per head the lower median over rows < N; span(N) = a + b*N least squares"  # fmt: skip


# --- the grid and the per-row computation --------------------------------------------------------------


def window_grid(n: int, steps_per_octave: int = 2, *, extra=()) -> tuple[int, ...]:
    """The geometric grid of window widths ``round(2^(j/s))`` up to ``n``, plus ``n`` and the ``extra`` widths."""
    n = int_value(n, "n", lo=1)
    s = int_value(steps_per_octave, "steps_per_octave", lo=1, hi=8)
    grid = {min(n, round(2 ** (j / s))) for j in range(int(math.log2(n) * s) + 2)}
    return tuple(sorted(grid | {n} | {int(e) for e in extra if 1 <= int(e) <= n}))


def resolution(grid) -> float:
    """How far a grid-rounded span can overstate the exact one: max over consecutive points of
    g_{k+1} / (g_k + 1) − 1 (an exact span of g_k + 1 is reported as g_{k+1}); 0 for a grid of every width."""
    g = sorted(grid)
    return max([b / (a + 1) - 1 for a, b in zip(g, g[1:])] + [0.0])


def _reductions(windows, sink: int) -> dict:
    spans = {f"w{w}": Window(int(w)) for w in windows}
    spans.update({f"k{j}": (j, j + 1) for j in range(sink)})
    return spans


@torch.no_grad()
def window_masses(model, ids, windows, *, sink: int = 0) -> torch.Tensor:
    """Cumulative window masses of one sequence ``[layer, head, row, window]``: Σ_{i−j<w} p_ij for each width
    ``w`` in ``windows`` (plus, with ``sink = k``, the mass of the first k keys outside the window), reduced
    in the attention backend (no N×N matrix). ``ids``: token ids ``[T]`` or ``[1, T]`` (one sequence)."""
    ids = torch.as_tensor(ids).reshape(1, -1).to(model.device)
    windows = [int(w) for w in windows]
    spans = _reductions(windows, sink)
    if len(spans) > MAX_SPANS:
        raise ProbeError(f"{len(windows)} windows + {sink} sink keys = {len(spans)} span reductions; at most {MAX_SPANS} "
                         "(lower steps_per_octave or sink)")  # fmt: skip
    with capture(model, AttentionStats(sink_keys=0, spans=spans), names_filter="blocks.*.attn.span.*") as cap:
        model.hf(input_ids=ids, logits_to_keep=1)
    m = torch.stack([cap.stack(f"attn.span.w{w}")[:, 0] for w in windows], dim=-1).double()  # [L, H, M, W]
    if sink:
        per_key = torch.stack([cap.stack(f"attn.span.k{j}")[:, 0] for j in range(sink)], dim=-1).double()  # [L, H, M, k]
        i = torch.arange(m.shape[2])
        # key j < sink lies outside window w for row i when i − j ≥ w: its mass is added
        outside = (i[None, :, None] - torch.arange(sink)[None, None, :]) >= torch.tensor(windows)[:, None, None]  # [W, M, k]
        m = m + torch.einsum("lhmk,wmk->lhmw", per_key, outside.double())
    return m


def row_spans(masses: torch.Tensor, windows, q: float = DEFAULT_Q) -> torch.Tensor:
    """Per row, the smallest window in ``windows`` (ascending) whose mass reaches ``q`` (within ``TOL``):
    ``masses [..., window]`` → spans ``[...]`` as window widths (the last window when none reaches q)."""
    w = torch.as_tensor(list(windows))
    ok = masses >= q - TOL
    idx = torch.where(ok.any(-1), ok.to(torch.int8).argmax(-1), len(w) - 1)
    return w[idx]


def lower_median(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Lower median of a histogram: ``values [W]`` ascending, ``counts [..., W]`` → ``[...]`` (NaN when empty)."""
    n = counts.sum(-1, keepdim=True)
    reach = counts.cumsum(-1) >= (n - 1) // 2 + 1
    out = values.double()[reach.to(torch.int8).argmax(-1)]
    return torch.where(n[..., 0] > 0, out, torch.nan)


# --- the scan ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpanConfig:
    """A span-profile scan: input ``lengths`` N (prefixes of each text; at least two, for the rule
    span(N) = a + b·N), the mass ``q`` a span must hold, ``steps_per_octave`` of the window grid, ``sink``
    first keys always kept (0: the published definition (docs/definitions.md)), ``texts`` (None: the shipped prose)."""

    lengths: tuple[int, ...] = (64, 128, 256, 512)
    q: float = DEFAULT_Q
    steps_per_octave: int = 2
    sink: int = 0
    texts: tuple[str, ...] | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        lengths = tuple(sorted(set(int_list(self.lengths, "lengths", lo=2))))
        if len(lengths) < 2:
            raise ProbeError(f"lengths must hold at least two different input lengths for the rule span(N) = a + b·N, got {list(lengths)}")
        set_("lengths", lengths)
        set_("q", float_value(self.q, "q", 0, 1, lo_open=True))
        set_("steps_per_octave", int_value(self.steps_per_octave, "steps_per_octave", lo=1, hi=8))
        set_("sink", int_value(self.sink, "sink", lo=0, hi=min(lengths) - 1))
        if self.texts is not None:
            if isinstance(self.texts, str) or not self.texts or not all(isinstance(t, str) and t.strip() for t in self.texts):
                raise ProbeError("texts must be a non-empty list of non-empty strings")
            set_("texts", tuple(self.texts))
        n = len(self.windows()) + self.sink
        if n > MAX_SPANS:
            raise ProbeError(f"the window grid up to {lengths[-1]} ({len(self.windows())} windows at steps_per_octave = "
                             f"{self.steps_per_octave}) + sink {self.sink} needs {n} span reductions; at most {MAX_SPANS}")  # fmt: skip

    def windows(self) -> tuple[int, ...]:
        """Every window width the scan reduces: the grid up to the largest length, plus each length."""
        return window_grid(self.lengths[-1], self.steps_per_octave, extra=self.lengths)

    def grid(self, n: int) -> tuple[int, ...]:
        """The windows that define spans at length ``n``: grid points below ``n``, and ``n`` (the whole row)."""
        return tuple(w for w in self.windows() if w < n) + (n,)

    def token_ids(self, model) -> list[list[int]]:
        """The first max(lengths) token ids of each text, checked against the model before anything runs."""
        n = self.lengths[-1]
        if model.spec.max_positions and n > model.spec.max_positions:
            raise ProbeError(f"length {n} exceeds the model's {model.spec.max_positions} positions")
        texts = texts_for(n) if self.texts is None else self.texts
        if not texts:
            raise ProbeError(f"no shipped text has {n} tokens; pass texts=[...] long enough")
        return SinkConfig(T=n, texts=tuple(texts)).token_ids(model)


def _histogram(masses: torch.Tensor, cfg: SpanConfig, text: int) -> pd.DataFrame:
    """Rows per (length, layer, head, span window) of one text, at each length's grid."""
    windows = cfg.windows()
    parts = []
    for n in cfg.lengths:
        grid = cfg.grid(n)
        cols = [windows.index(w) for w in grid]
        spans = row_spans(masses[:, :, :n][..., cols], grid, cfg.q)  # [L, H, n]
        counts = (spans[..., None] == torch.tensor(grid)).sum(2)  # [L, H, W]
        l, h, w = counts.nonzero(as_tuple=True)
        parts.append(pd.DataFrame({"text": text, "length": n, "layer": l.numpy(), "head": h.numpy(),
                                   "window": torch.tensor(grid)[w].numpy(), "rows": counts[l, h, w].numpy()}))  # fmt: skip
    return pd.concat(parts, ignore_index=True)


_HIST_COLUMNS = ["text", "length", "layer", "head", "window", "rows"]


@dataclass(repr=False)
class SpanResult(Result):
    """The span profile: how many rows of each (text, length, layer, head) have each grid span
    (``histogram``; lossless, the spans are grid values), the per-length medians derived from it, and the
    fitted rule span(N) = a + b·N per head. ``grids()``: ``span_slope`` (b), ``span_intercept`` (a) and
    ``span_at_<N>`` for every length; ``heads()`` adds ``elastic`` (b > 0.05)."""

    histogram: pd.DataFrame
    lengths: tuple[int, ...]
    q: float
    sink: int
    steps_per_octave: int
    n_layers: int
    n_heads: int
    n_texts: int
    provenance: object
    complete: bool = True

    kind: ClassVar[str] = "spans"
    table_names: ClassVar[tuple[str, ...]] = ("profile", "histogram", "meta")

    # --- derived ---------------------------------------------------------------------------------------
    def span(self) -> torch.Tensor:
        """Median span per head at each length ``[length, layer, head]`` (pooled over texts; NaN: no rows)."""
        out = torch.full((len(self.lengths), self.n_layers, self.n_heads), torch.nan, dtype=torch.float64)
        if self.histogram.empty:
            return out
        h = self.histogram.groupby(["length", "layer", "head", "window"], as_index=False)["rows"].sum()
        for i, n in enumerate(self.lengths):
            g = h[h["length"] == n]
            if g.empty:
                continue
            values = torch.tensor(sorted(g["window"].unique()))
            counts = torch.zeros(self.n_layers, self.n_heads, len(values), dtype=torch.long)
            counts[torch.tensor(g["layer"].to_numpy()), torch.tensor(g["head"].to_numpy()),
                   torch.searchsorted(values, torch.tensor(g["window"].to_numpy()))] = torch.tensor(g["rows"].to_numpy())  # fmt: skip
            out[i] = lower_median(values, counts)
        return out

    def fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Least-squares rule span(N) = a + b·N per head over the lengths with data: ``(a, b)``, each
        ``[layer, head]`` (NaN with fewer than two lengths)."""
        s = self.span()
        have = ~torch.isnan(s).all(-1).all(-1)
        n = torch.tensor(self.lengths, dtype=torch.float64)[have]
        s = s[have]
        if n.numel() < 2:
            nan = torch.full((self.n_layers, self.n_heads), torch.nan, dtype=torch.float64)
            return nan, nan.clone()
        dn = n - n.mean()
        b = (dn[:, None, None] * (s - s.mean(0))).sum(0) / (dn**2).sum()
        return s.mean(0) - b * n.mean(), b

    @property
    def windows(self) -> tuple[int, ...]:
        """Every window width the scan reduced (the grid up to the largest length, plus each length)."""
        return window_grid(self.lengths[-1], self.steps_per_octave, extra=self.lengths)

    def profile(self) -> pd.DataFrame:
        """One row per (length, layer, head): the median span and the rows it is taken over."""
        s = self.span()
        rows = self.histogram.groupby(["length", "layer", "head"])["rows"].sum() if len(self.histogram) else pd.Series(dtype=int)
        out = [(n, l, h, float(s[i, l, h]), int(rows.get((n, l, h), 0)))
               for i, n in enumerate(self.lengths) for l in range(self.n_layers) for h in range(self.n_heads)]  # fmt: skip
        return pd.DataFrame(out, columns=["length", "layer", "head", "span", "rows"])

    # --- the result protocol ---------------------------------------------------------------------------
    def grids(self) -> dict[str, torch.Tensor]:
        a, b = self.fit()
        s = self.span()
        return {"span_slope": b.float(), "span_intercept": a.float(), **{f"span_at_{n}": s[i].float() for i, n in enumerate(self.lengths)}}

    def heads(self) -> pd.DataFrame:
        """One row per head: slope b (most elastic first), intercept a, median span at every length, and
        whether it is elastic (b > 0.05)."""
        df = super().heads()
        return df.assign(elastic=df["span_slope"] > ELASTIC_SLOPE)

    def summary(self) -> str:
        """The text a CLI prints: settings and grid resolution, share of elastic heads, the most elastic and the most local heads."""
        state = "" if self.complete else f" — cancelled, {self.n_texts} text(s) done"
        res = resolution(self.windows)
        lines = [f"span profile (MoA; smallest window holding q = {self.q:g} of each row's mass"
                 + (f", first {self.sink} key(s) always kept" if self.sink else "")
                 + f") at N = {', '.join(map(str, self.lengths))} over {self.n_texts} text(s){state}; "
                 f"{self.steps_per_octave} windows per octave: exact at grid points, at most {res * 100:.0f}% above between them"]  # fmt: skip
        if self.histogram.empty:
            return "\n".join(lines + ["no text finished: nothing to report"])
        a, b = self.fit()
        s = self.span()
        top = self.lengths[-1]
        elastic = int((b > ELASTIC_SLOPE).sum())
        lines.append(f"elastic heads (span(N) = a + b·N with b > {ELASTIC_SLOPE}): {elastic} of {b.numel()} "
                     f"({elastic / b.numel() * 100:.0f}%); median head span "
                     + ", ".join(f"{float(s[i].nanmedian()):g} at {n}" for i, n in enumerate(self.lengths)))  # fmt: skip
        lines.append("most elastic: " + ", ".join(f"L{l}H{h} b={v:.2f} ({s[0, l, h]:g}→{s[-1, l, h]:g})" for l, h, v in top_cells(b, 5)))
        order = sorted(((float(s[-1, l, h]), float(b[l, h]), l, h) for l in range(self.n_layers) for h in range(self.n_heads)
                        if not math.isnan(float(s[-1, l, h]))))[:5]  # fmt: skip
        lines.append(f"most local at N = {top}: " + ", ".join(f"L{l}H{h} span {v:g} (b={bb:.3f})" for v, bb, l, h in order))
        return "\n".join(lines)

    def figures(self) -> dict:
        """``slope``: b per head (layer × head); ``elastic``: span vs N for the most and least elastic heads; ``spans``: median span at the largest N."""
        return {
            "slope": lambda: plots.head_grid(self.fit()[1], "span growth per head: b of span(N) = a + b·N (MoA elastic rule)",
                                             colorbar="b (span tokens per input token)"),
            "elastic": self._elastic_figure,
            "spans": lambda: plots.head_grid(self.span()[-1], f"median span per head at N = {self.lengths[-1]} (q = {self.q:g})",
                                             colorbar="span (tokens)"),
        }  # fmt: skip

    def _elastic_figure(self, k: int = 4):
        a, b = self.fit()
        s = self.span()
        most = [(l, h) for l, h, _ in top_cells(b, k)]
        least = [(l, h) for l, h, _ in top_cells(-b.nan_to_num(torch.inf), k)]
        rows = [(f"L{l}H{h}" + (" (elastic)" if (l, h) in most else " (static)"), n, float(s[i, l, h]))
                for l, h in most + [x for x in least if x not in most] for i, n in enumerate(self.lengths)]  # fmt: skip
        df = pd.DataFrame(rows, columns=["head", "length", "span"])
        dash = {name: ("solid" if "elastic" in name else "dot") for name in df["head"].unique()}
        return plots.lines(df, "length", "span", "head", f"median span vs input length: most and least elastic heads (q = {self.q:g})",
                           x_title="input length N (tokens)", y_title="span (tokens)", dash=dash)  # fmt: skip

    def tables(self) -> dict[str, pd.DataFrame]:
        meta = pd.DataFrame([{"lengths": ",".join(map(str, self.lengths)), "q": self.q, "sink": self.sink,
                              "steps_per_octave": self.steps_per_octave, "n_layers": self.n_layers, "n_heads": self.n_heads,
                              "n_texts": self.n_texts, "complete": self.complete}])  # fmt: skip
        return {"profile": self.profile(), "histogram": self.histogram, "meta": meta}

    @classmethod
    def from_tables(cls, tables, provenance) -> "SpanResult":
        m = tables["meta"].iloc[0]
        hist = tables["histogram"]
        hist = hist.astype({c: "int64" for c in _HIST_COLUMNS}) if len(hist) else pd.DataFrame(columns=_HIST_COLUMNS)
        return cls(histogram=hist.reset_index(drop=True), lengths=tuple(int(x) for x in str(m["lengths"]).split(",")), q=float(m["q"]),
                   sink=int(m["sink"]), steps_per_octave=int(m["steps_per_octave"]), n_layers=int(m["n_layers"]),
                   n_heads=int(m["n_heads"]), n_texts=int(m["n_texts"]), provenance=provenance, complete=bool(m["complete"]))  # fmt: skip


@torch.no_grad()
def scan(model, config: SpanConfig | None = None, *, edits=(), on_case=None, cancel=None, progress: bool = True,
         **fields) -> SpanResult:  # fmt: skip
    """The span profile of every (layer, query head): one forward pass per text at the largest length, window
    masses reduced in the backend, spans at every length from the rows of its prefix (``SpanConfig`` fields
    as keywords: ``lengths``, ``q``, ``steps_per_octave``, ``sink``, ``texts``). Cases are texts."""
    cfg = config_of(SpanConfig, config, fields)
    ids_list = cfg.token_ids(model)
    windows = cfg.windows()

    def run(item):
        i, ids = item
        return _histogram(window_masses(model, ids, windows, sink=cfg.sink), cfg, i)

    with intervene(model, *edits) if edits else nullcontext():
        done, complete = run_cases(list(enumerate(ids_list)), run, on_case=on_case, cancel=cancel, progress=progress,
                                   desc="span profile", unit="text")  # fmt: skip
    hist = pd.concat(done, ignore_index=True) if done else pd.DataFrame(columns=_HIST_COLUMNS)
    prov = model.provenance.with_run(definition=DEFINITION.format(q=cfg.q, sink=cfg.sink, s=cfg.steps_per_octave),
                                     lengths=list(cfg.lengths), texts=len(done), input_ids=ids_list[: len(done)],
                                     edits=", ".join(edit_labels(edits)) or None,
                                     complete=complete)  # fmt: skip
    return SpanResult(histogram=hist, lengths=cfg.lengths, q=cfg.q, sink=cfg.sink, steps_per_octave=cfg.steps_per_octave,
                      n_layers=model.spec.n_layers, n_heads=model.spec.n_heads, n_texts=len(done), provenance=prov, complete=complete)  # fmt: skip
