"""Compression valley and the first token's norm, per layer (Queipo-de-Llano et al. 2025, "Attention Sinks
and Compression Valleys in LLMs are Two Sides of the Same Coin"; docs/definitions.md, "Compression valley").

Definition, as implemented
- Per layer l and text, X = the layer's residual output ``blocks.{l}.hook_resid_post`` ``[T, d]`` (the
  decoder layer's output, before any final norm), uncentred, in float64.
- Matrix-based entropy of the normalised Gram matrix K = XXᵀ / tr(XXᵀ), eigenvalues λ (λ ≥ 0, Σλ = 1; the
  non-zero eigenvalues of XXᵀ and XᵀX are the same, so the smaller of the two Gram matrices is decomposed):
  von Neumann H1 = −Σ λ log λ and Rényi-2 H2 = −log Σ λ², in nats; each also normalised by its maximum
  log min(T, d) (``*_norm``: 1 = every direction equally used, 0 = rank one). A compression valley is a dip
  of the entropy in the middle layers.
- Next to it, the L2 norm of the first token's residual (the BOS token when the tokenizer adds one; the
  first text token otherwise), the median (lower median) norm of the other T − 1 tokens and their ratio.
  The paper ties the valley to a massive first-token norm: when one row dominates X, one eigenvalue
  dominates K and the entropy collapses.
- Computed as reductions inside the capture: a ``Hook("blocks.*.hook_resid_post", fn, key="matrix_entropy")``
  returns, per layer, the few numbers above; the full residual tensors are never kept. Per layer, the
  result averages texts.

The result's grids are per layer, not per head: ``grids()`` returns ``[layer, 1]`` tensors and ``heads()``
returns the per-layer table (one row per layer, in layer order).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch

from ..core import names as N
from ..base import plots
from ..core.capture import capture, edit_labels, intervene
from ..base.errors import ProbeError
from ..core.hooks import Hook
from .result import Result
from .scan import config_of, int_value, run_cases
from .sinks import SinkConfig

DEFINITION = "compression valley: von Neumann and Renyi-2 entropy (nats) of the normalised uncentred Gram XX^T/tr of each " \
             "layer's residual output; first-token L2 norm vs the lower-median norm of the other tokens"  # fmt: skip
METRICS = ("entropy_vn", "entropy_renyi2", "entropy_vn_norm", "entropy_renyi2_norm", "bos_norm", "other_norm", "bos_ratio")
KEY = "matrix_entropy"


def matrix_entropy(x: torch.Tensor) -> tuple[float, float]:
    """(von Neumann H1, Rényi-2 H2) in nats of the normalised Gram matrix of ``x`` ``[T, d]`` (float64)."""
    x = x.double()
    g = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    lam = torch.linalg.eigvalsh(g).clamp_min(0)
    lam = lam / lam.sum()
    nz = lam[lam > 0]
    return float(-(nz * nz.log()).sum()), float(-torch.log((lam**2).sum()))


def layer_stats(x: torch.Tensor, name=None) -> torch.Tensor:
    """The per-layer reduction the capture keeps: ``[H1, H2, first-token norm, median other norm, T, d]``
    of the first sequence of ``x`` ``[batch, T, d]`` (a ``Hook`` function: ``fn(tensor, name)``)."""
    x0 = x[0].detach().double()
    h1, h2 = matrix_entropy(x0)
    norms = x0.norm(dim=-1)
    other = norms[1:].median() if norms.numel() > 1 else torch.tensor(float("nan"), dtype=torch.float64)
    return torch.tensor([h1, h2, float(norms[0]), float(other), x0.shape[0], x0.shape[1]], dtype=torch.float64)


def _row(text: int, layer: int, s: torch.Tensor) -> dict:
    h1, h2, bos, other, T, d = s.tolist()
    top = math.log(min(T, d)) if min(T, d) > 1 else float("nan")
    return {"text": text, "layer": layer, "entropy_vn": h1, "entropy_renyi2": h2, "entropy_vn_norm": h1 / top,
            "entropy_renyi2_norm": h2 / top, "bos_norm": bos, "other_norm": other, "bos_ratio": bos / other, "tokens": int(T)}  # fmt: skip


@dataclass(frozen=True)
class RepresentationConfig:
    """A compression-valley scan: the first ``T`` tokens of each text (None: the shipped prose,
    ``workbench.sinks.texts_for(T)``), one forward pass per text."""

    T: int = 512
    texts: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "T", int_value(self.T, "T", lo=2))
        if self.texts is not None:
            if isinstance(self.texts, str) or not self.texts or not all(isinstance(t, str) and t.strip() for t in self.texts):
                raise ProbeError("texts must be a non-empty list of non-empty strings")
            object.__setattr__(self, "texts", tuple(self.texts))

    def token_ids(self, model) -> list[list[int]]:
        """The first T token ids of each text, checked against the model before anything runs."""
        return SinkConfig(T=self.T, texts=self.texts).token_ids(model)


@dataclass(repr=False)
class RepresentationResult(Result):
    """Per (text, layer): matrix entropies of the residual output and the first token's norm; per layer, the
    mean over texts. Per layer, not per head: ``grids()`` are ``[layer, 1]`` and ``heads()`` is the per-layer
    table in layer order."""

    per_text: pd.DataFrame  # text, layer, METRICS, tokens
    T: int
    n_layers: int
    provenance: object
    complete: bool = True

    kind: ClassVar[str] = "representation"
    table_names: ClassVar[tuple[str, ...]] = ("layers", "per_text", "meta")
    grid_unit: ClassVar[str] = "layer"

    def layers(self) -> pd.DataFrame:
        """One row per layer: every metric averaged over texts (the ratio is the mean of per-text ratios)."""
        if self.per_text.empty:
            return pd.DataFrame({"layer": range(self.n_layers), **{m: float("nan") for m in METRICS}})
        return self.per_text.groupby("layer", as_index=False)[list(METRICS)].mean().sort_values("layer").reset_index(drop=True)

    def grids(self) -> dict[str, torch.Tensor]:
        """Per-layer values as ``[layer, 1]`` tensors (one column: these measures are per layer)."""
        df = self.layers()
        return {m: torch.tensor(df[m].to_numpy(), dtype=torch.float32)[:, None] for m in METRICS}

    def heads(self) -> pd.DataFrame:
        """The per-layer table (this result has no per-head values): one row per layer, in layer order."""
        return self.layers()

    def valley(self) -> dict:
        """Where the normalised von Neumann entropy is lowest, where the first-token norm ratio peaks, and the
        Pearson correlation over layers of the entropy with log(ratio) (the paper: strongly negative)."""
        df = self.layers().dropna(subset=["entropy_vn_norm"])
        if df.empty:
            return {}
        lo, hi = df.loc[df["entropy_vn_norm"].idxmin()], df.loc[df["bos_ratio"].idxmax()]
        corr = df["entropy_vn_norm"].corr(df["bos_ratio"].clip(lower=1e-12).map(math.log)) if len(df) > 2 else float("nan")
        return {"valley_layer": int(lo["layer"]), "valley_entropy": float(lo["entropy_vn_norm"]),
                "first_entropy": float(df["entropy_vn_norm"].iloc[0]), "last_entropy": float(df["entropy_vn_norm"].iloc[-1]),
                "peak_ratio_layer": int(hi["layer"]), "peak_ratio": float(hi["bos_ratio"]), "corr_entropy_log_ratio": float(corr)}  # fmt: skip

    def summary(self) -> str:
        """The text a CLI prints: where the entropy is lowest, where the first-token norm ratio peaks, and every layer."""
        n = self.per_text["text"].nunique() if len(self.per_text) else 0
        state = "" if self.complete else f" — cancelled, {n} text(s) done"
        lines = [f"compression valley: matrix entropy of each layer's residual output (T = {self.T}, {n} text(s)){state}"]
        v = self.valley()
        if not v:
            return "\n".join(lines + ["no text finished: nothing to report"])
        df = self.layers()
        lines.append(f"von Neumann entropy / log min(T, d): layer 0 {v['first_entropy']:.3f}, lowest {v['valley_entropy']:.3f} at layer "
                     f"{v['valley_layer']}, last layer {v['last_entropy']:.3f}")  # fmt: skip
        lines.append(f"first-token norm / median other norm: peak ×{v['peak_ratio']:.1f} at layer {v['peak_ratio_layer']} "
                     f"(layer 0 ×{df['bos_ratio'].iloc[0]:.1f}, last ×{df['bos_ratio'].iloc[-1]:.1f}); "
                     f"correlation over layers of entropy with log ratio: {v['corr_entropy_log_ratio']:.2f}")  # fmt: skip
        lines.append("per layer (H1 norm / ratio): " + ", ".join(f"L{int(l)} {h:.2f}/{r:.3g}" for l, h, r in
                                                                 zip(df["layer"], df["entropy_vn_norm"], df["bos_ratio"])))  # fmt: skip
        return "\n".join(lines)

    def figures(self) -> dict:
        """``layers``: normalised entropies per layer with the first-token norm ratio on a second (log) axis; ``norms``: the norms."""
        return {
            "layers": lambda: plots.twin_axis_lines(
                self.layers(), "layer", {"entropy_vn_norm": "von Neumann H1 / log min(T, d)", "entropy_renyi2_norm": "Rényi-2 H2 / log min(T, d)"},
                {"bos_ratio": "first-token norm / median norm"}, f"compression valley and first-token norm per layer (T = {self.T})",
                x_title="layer", left_title="normalised entropy (0 = rank one, 1 = isotropic)", right_title="norm ratio (×, log scale)",
                right_log=True),
            "norms": lambda: plots.twin_axis_lines(
                self.layers(), "layer", {"bos_norm": "first-token norm"}, {"other_norm": "median norm of the other tokens"},
                "residual norms per layer", x_title="layer", left_title="L2 norm (first token)", right_title="L2 norm (other tokens)"),
        }  # fmt: skip

    def tables(self) -> dict[str, pd.DataFrame]:
        meta = pd.DataFrame([{"T": self.T, "n_layers": self.n_layers, "complete": self.complete}])
        return {"layers": self.layers(), "per_text": self.per_text, "meta": meta}

    @classmethod
    def from_tables(cls, tables, provenance) -> "RepresentationResult":
        m = tables["meta"].iloc[0]
        return cls(per_text=tables["per_text"].reset_index(drop=True), T=int(m["T"]), n_layers=int(m["n_layers"]), provenance=provenance,
                   complete=bool(m["complete"]))  # fmt: skip


_COLUMNS = ["text", "layer", *METRICS, "tokens"]


@torch.no_grad()
def scan(model, config: RepresentationConfig | None = None, *, edits=(), on_case=None, cancel=None, progress: bool = True,
         **fields) -> RepresentationResult:  # fmt: skip
    """Matrix entropy of every layer's residual output and the first token's norm, one forward pass per text
    (``RepresentationConfig`` fields as keywords: ``T``, ``texts``); the residual tensors are reduced by a
    hook inside the capture, never kept."""
    cfg = config_of(RepresentationConfig, config, fields)
    ids_list = cfg.token_ids(model)
    hook = Hook("blocks.*.hook_resid_post", layer_stats, key=KEY)

    def run(item):
        i, ids = item
        # only reductions are kept: the budget for full tensors does not apply
        with capture(model, hook, max_elements=1 << 62) as cap:
            model.hf(input_ids=torch.tensor([ids], device=model.device), logits_to_keep=1)
        return [_row(i, l, cap[f"{N.name(l, 'hook_resid_post')}.{KEY}"]) for l in range(model.spec.n_layers)]

    with intervene(model, *edits) if edits else nullcontext():
        done, complete = run_cases(list(enumerate(ids_list)), run, on_case=on_case, cancel=cancel, progress=progress,
                                   desc="compression valley", unit="text")  # fmt: skip
    prov = model.provenance.with_run(definition=DEFINITION, T=cfg.T, texts=len(done), input_ids=ids_list[: len(done)],
                                     edits=", ".join(edit_labels(edits)) or None, complete=complete)  # fmt: skip
    per_text = pd.DataFrame([r for rows in done for r in rows], columns=_COLUMNS)
    return RepresentationResult(per_text=per_text, T=cfg.T, n_layers=model.spec.n_layers, provenance=prov, complete=complete)
