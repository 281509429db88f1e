"""Plotly figures for results and a self-contained HTML report (plotly.js inlined once: works offline)."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import torch


def top_cells(values: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` largest cells of a ``[layer, head]`` grid as (layer, head, value); NaN ranks last."""
    flat = torch.nan_to_num(values.detach().float().cpu(), nan=-float("inf")).flatten()
    idx = flat.topk(min(k, flat.numel())).indices
    H = values.shape[1]
    return [(int(i) // H, int(i) % H, float(values.flatten()[i])) for i in idx]


def head_grid(values: torch.Tensor, title: str, *, colorbar: str = "score", zmax: float | None = None, heads: str = "query head"):
    """Layer × head heatmap of a per-head score ``[layer, head]`` (``heads`` names the columns' unit)."""
    import plotly.graph_objects as go

    v = values.detach().float().cpu()
    fig = go.Figure(go.Heatmap(z=v.numpy(), x=[f"H{h}" for h in range(v.shape[1])], y=[f"L{l}" for l in range(v.shape[0])],
                               colorscale="Viridis", zmin=0, zmax=zmax, colorbar={"title": colorbar},
                               hovertemplate="layer %{y} head %{x}: %{z:.3f}<extra></extra>"))  # fmt: skip
    fig.update_layout(title=title, xaxis_title=heads, yaxis_title="layer", height=max(320, 18 * v.shape[0] + 120), width=520)
    return fig


def niah_grid(grid: pd.DataFrame, title: str = "NIAH accuracy (ROUGE-1 recall > 0.5)"):
    """Depth × context-length accuracy heatmap, the grid people plot for needle-in-a-haystack."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=[f"{d:g}%" for d in grid.index],
                               colorscale="RdYlGn", zmin=0, zmax=1, colorbar={"title": "accuracy"},
                               hovertemplate="length %{x}, depth %{y}: %{z:.2f}<extra></extra>"))  # fmt: skip
    fig.update_layout(title=title, xaxis_title="context length (tokens)", yaxis_title="needle depth", height=360, width=520)
    return fig


def layer_bars(frame: pd.DataFrame, y: str, title: str):
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=frame["layer"], y=frame[y]))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title=y, height=320, width=620)
    return fig


def layer_expert_grid(load: torch.Tensor, layers, title: str = "expert load per layer"):
    """MoE layer × expert heatmap (e.g. :func:`workbench.routing.expert_load`)."""
    import plotly.graph_objects as go

    v = load.detach().float().cpu()
    fig = go.Figure(go.Heatmap(z=v.numpy(), x=[f"E{e}" for e in range(v.shape[1])], y=[f"L{l}" for l in layers],
                               colorscale="Viridis", zmin=0, colorbar={"title": "share"},
                               hovertemplate="layer %{y} expert %{x}: %{z:.3f}<extra></extra>"))  # fmt: skip
    fig.update_layout(title=title, xaxis_title="expert", yaxis_title="MoE layer", height=max(300, 22 * v.shape[0] + 140), width=560)
    return fig


def curve(values, title: str, *, x: str = "step", y: str = "loss"):
    """A line of values over steps (training curves)."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(y=list(values), mode="lines"))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=320, width=620)
    return fig


def write_html(path: str | Path, title: str, sections: list[tuple[str, object]]) -> Path:
    """One HTML file: each section is (heading, plotly figure | DataFrame | text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]  # fmt: skip
    first = True
    for heading, obj in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if hasattr(obj, "to_html") and hasattr(obj, "layout"):  # plotly figure
            parts.append(obj.to_html(full_html=False, include_plotlyjs=True if first else False))
            first = False
        elif isinstance(obj, pd.DataFrame):
            parts.append(obj.to_html(index=False, float_format=lambda x: f"{x:.3f}"))
        else:
            parts.append(f"<pre>{html.escape(str(obj))}</pre>")
    parts.append("</body></html>")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    return path


def retrieval_sections(result) -> list[tuple[str, object]]:
    """Report sections for a :class:`workbench.retrieval.RetrievalResult`."""
    top = pd.DataFrame(result.top_heads(10), columns=["layer", "head", "score"])
    sp = result.sparsity()
    return [
        ("Retrieval score per head (Wu et al. 2024, " + result.variant + ")", head_grid(result.scores, "retrieval score", zmax=1)),
        ("Top retrieval heads", top),
        ("Sparsity", f"{sp['above_0.1'] * 100:.1f}% of heads score > 0.1 (paper: 3–6%); {sp['zero'] * 100:.1f}% score 0 (paper: 45–73%)"),
        ("NIAH accuracy", niah_grid(result.accuracy_grid())),
        ("Tests", result.tests[["length", "depth", "needle", "rouge1_recall", "counted", "answer_found", "response"]]),
    ]


def sink_sections(result) -> list[tuple[str, object]]:
    """Report sections for a :class:`workbench.sinks.SinkResult`."""
    mv = result.massive_vs_sinks()
    return [
        (f"First-token sink α₀ per head (Gu et al., T = {result.T})", head_grid(result.mean_alpha[..., 0], "α₀", colorbar="α₀", zmax=1)),
        (f"Share of sink heads per layer (α₀ > {result.eps})", layer_bars(result.per_layer(), "sink_share", "Sink_1^ε share per layer")),
        ("Hidden sink tokens (ACT: α_k > 0.1, k ≥ 1)", result.hidden_sink_tokens().head(15)),
        ("Massive activations (Sun et al.)", f"{mv['massive_entries']} entries; share on sink tokens: {mv['on_sink_token']:.2f}"),
        ("Largest massive activations", result.massive.reindex(result.massive["value"].abs().sort_values(ascending=False).index).head(10)),
    ]
