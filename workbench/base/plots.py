"""Plotly figure builders shared by every result (pure functions of tensors and tables: no workbench
imports). Every colour scale carries a colourbar with its unit; heads are labelled ``L{layer}H{head}``.
Layer grids run top-down (L0 at the top), like the HeadGrid widget and the pattern thumbnails."""
from __future__ import annotations

import pandas as pd
import torch


def head_grid(values: torch.Tensor, title: str, *, colorbar: str = "score", zmax: float | None = None,
              heads: str = "query head"):  # fmt: skip
    """Layer × head heatmap of a per-head value ``[layer, head]`` (``heads`` names the columns' unit)."""
    import plotly.graph_objects as go

    v = values.detach().float().cpu()
    unit = "KV" if heads.startswith("KV") else "H"
    fig = go.Figure(go.Heatmap(z=v.numpy(), x=[f"{unit}{h}" for h in range(v.shape[1])], y=[f"L{l}" for l in range(v.shape[0])],
                               colorscale="Viridis", zmin=0, zmax=zmax, colorbar={"title": colorbar},
                               hovertemplate="layer %{y} head %{x}: %{z:.3f}<extra></extra>"))  # fmt: skip
    fig.update_layout(title=title, xaxis_title=heads, yaxis_title="layer", height=max(320, 18 * v.shape[0] + 120), width=520,
                      yaxis_autorange="reversed")  # fmt: skip
    if not torch.isfinite(v).any():  # say why the grid is blank instead of drawing an empty frame
        explain(fig, "no head has a defined value (NaN everywhere: e.g. no NIAH test was answered)")
    return fig


def explain(fig, text: str):
    """A note across the middle of ``fig``: why it draws nothing (a figure is never silently empty)."""
    fig.add_annotation(text=text, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False, font={"size": 13, "color": "#8a2b0f"},
                       bgcolor="#fff6e5", name="empty")  # fmt: skip
    return fig


def niah_grid(grid: pd.DataFrame, title: str = "NIAH accuracy (ROUGE-1 recall > 0.5)"):
    """Depth × context-length accuracy heatmap, the grid people plot for needle-in-a-haystack."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=[f"{d:g}%" for d in grid.index],
                               colorscale="RdYlGn", zmin=0, zmax=1, colorbar={"title": "accuracy"},
                               hovertemplate="length %{x}, depth %{y}: %{z:.2f}<extra></extra>"))  # fmt: skip
    fig.update_layout(title=title, xaxis_title="context length (tokens)", yaxis_title="needle depth", height=360, width=520)
    return fig


def bars(frame: pd.DataFrame, x: str, y: str, title: str, *, color: str | None = None):
    """Bars of ``y`` over ``x`` (grouped by ``color`` when given)."""
    import plotly.express as px

    fig = px.bar(frame, x=x, y=y, color=color, barmode="group", title=title)
    fig.update_layout(height=320, width=620)
    return fig


def layer_expert_grid(load: torch.Tensor, layers, title: str = "expert load per layer"):
    """MoE layer × expert heatmap (e.g. :func:`workbench.routing.expert_load`)."""
    import plotly.graph_objects as go

    v = load.detach().float().cpu()
    fig = go.Figure(go.Heatmap(z=v.numpy(), x=[f"E{e}" for e in range(v.shape[1])], y=[f"L{l}" for l in layers],
                               colorscale="Viridis", zmin=0, colorbar={"title": "share"},
                               hovertemplate="layer %{y} expert %{x}: %{z:.3f}<extra></extra>"))  # fmt: skip
    fig.update_layout(title=title, xaxis_title="expert", yaxis_title="MoE layer", height=max(300, 22 * v.shape[0] + 140), width=560,
                      yaxis_autorange="reversed")  # fmt: skip
    return fig


def curve(values, title: str, *, x: str = "step", y: str = "loss"):
    """A line of values over steps (training curves)."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(y=list(values), mode="lines"))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=320, width=620)
    return fig


def histogram(values: torch.Tensor, title: str, *, x: str, by: list[str] | None = None):
    """Histograms of one row of values per trace (e.g. routing margins per layer)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    rows = values if values.dim() > 1 else values[None]
    for i, row in enumerate(rows):
        finite = row[torch.isfinite(row)].float().numpy()
        fig.add_trace(go.Histogram(x=finite, name=(by[i] if by else None), opacity=0.6))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title="tokens", barmode="overlay", height=320, width=620)
    return fig


def scatter(frame: pd.DataFrame, x: str, y: str, color: str, hover: str, title: str, *, log_x: bool = False):
    """Points of ``frame`` (one per head, say), coloured by a category, ``hover`` naming each point."""
    import plotly.express as px

    fig = px.scatter(frame, x=x, y=y, color=color, hover_name=hover, log_x=log_x, title=title)
    fig.update_layout(height=420, width=640)
    return fig


#: categorical colours (Okabe–Ito, colour-blind safe): one per kind, in order; "none" is light grey
KIND_COLOURS = ("#E69F00", "#56B4E9", "#009E73", "#D55E00", "#CC79A7", "#0072B2", "#F0E442", "#000000")
NONE_COLOUR = "#e6e6e6"


def kinds_grid(kinds: dict[tuple[int, int], list[str]], order: list[str], shape: tuple[int, int], title: str, *,
               heads: str = "query head"):  # fmt: skip
    """Layer × head map of categories where a head may have several: each cell is split into one vertical
    stripe per kind it has, one colour per kind (``order``), a legend entry per kind with its head count
    (the number of cells that show it), heads of no kind light grey; hover names every kind of a head."""
    import plotly.graph_objects as go

    L, H = shape
    fig = go.Figure()

    def stripes(cells):  # cells: (layer, head, i, m) -> the i-th of m stripes of that cell, as one path
        xs, ys = [], []
        for l, h, i, m in cells:
            x0, x1, y0, y1 = h - 0.45 + 0.9 * i / m, h - 0.45 + 0.9 * (i + 1) / m, l - 0.45, l + 0.45
            xs += [x0, x1, x1, x0, x0, None]
            ys += [y0, y0, y1, y1, y0, None]
        return xs, ys

    colours = {k: KIND_COLOURS[i % len(KIND_COLOURS)] for i, k in enumerate(order)}
    for kind in [*order, None]:
        if kind is None:
            cells = [(l, h, 0, 1) for (l, h), ks in kinds.items() if not ks]
            name, colour = f"none ({len(cells)})", NONE_COLOUR
        else:
            cells = [(l, h, ks.index(kind), len(ks)) for (l, h), ks in kinds.items() if kind in ks]
            name, colour = f"{kind} ({len(cells)})", colours[kind]
        xs, ys = stripes(cells)
        fig.add_trace(go.Scatter(x=xs or [None], y=ys or [None], mode="lines", fill="toself", fillcolor=colour, line={"width": 0},
                                 name=name, legendgroup=str(kind), hoverinfo="skip", showlegend=True,
                                 meta={"kind": kind, "heads": len(cells)}))  # fmt: skip
    cells = sorted(kinds)
    fig.add_trace(go.Scatter(x=[h for _, h in cells], y=[l for l, _ in cells], mode="markers", marker={"opacity": 0, "size": 14},
                             text=[f"L{l}H{h}: {', '.join(kinds[(l, h)]) or 'no kind'}" for l, h in cells], hoverinfo="text",
                             showlegend=False, name="heads"))  # fmt: skip
    fig.update_layout(title=title, plot_bgcolor="white", height=max(400, 18 * L + 140), width=620, legend_title_text="kind (heads)",
                      xaxis={"title": heads, "tickvals": list(range(H)), "ticktext": [f"H{h}" for h in range(H)], "range": [-0.6, H - 0.4],
                             "showgrid": False, "zeroline": False},
                      yaxis={"title": "layer", "tickvals": list(range(L)), "ticktext": [f"L{l}" for l in range(L)], "range": [L - 0.4, -0.6],
                             "showgrid": False, "zeroline": False})  # fmt: skip
    return fig


def lines(frame: pd.DataFrame, x: str, y: str, group: str, title: str, *, x_title: str | None = None,
          y_title: str | None = None, dash: dict | None = None):  # fmt: skip
    """One line with markers per ``group`` value (e.g. span over input length, one line per head); ``dash``
    maps a group to a plotly dash style (e.g. to set two sets of lines apart)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, g in frame.groupby(group, sort=False):
        g = g.sort_values(x)
        fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="lines+markers", name=str(name),
                                 line={"dash": (dash or {}).get(name, "solid")}))  # fmt: skip
    fig.update_layout(title=title, xaxis_title=x_title or x, yaxis_title=y_title or y, height=380, width=680)
    return fig


def twin_axis_lines(frame: pd.DataFrame, x: str, left: dict[str, str], right: dict[str, str], title: str, *,
                    x_title: str, left_title: str, right_title: str, right_log: bool = False):  # fmt: skip
    """Lines on two y axes over a shared ``x``: ``left`` / ``right`` map column → legend label (units in the
    axis titles); ``right_log`` puts the right axis on a log scale."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for col, label in left.items():
        fig.add_trace(go.Scatter(x=frame[x], y=frame[col], mode="lines+markers", name=label, yaxis="y"))
    for col, label in right.items():
        fig.add_trace(go.Scatter(x=frame[x], y=frame[col], mode="lines+markers", name=label, yaxis="y2", line={"dash": "dot"}))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis={"title": left_title},
                      yaxis2={"title": right_title, "overlaying": "y", "side": "right", "type": "log" if right_log else "linear"},
                      legend={"x": 1.08}, height=380, width=760)  # fmt: skip
    return fig


def facet_heatmaps(grids: list[tuple[str, pd.DataFrame]], title: str, *, colorbar: str, x_title: str, zmax: float | None = None):
    """Side-by-side heatmaps sharing one colour scale: ``grids`` is a list of (panel title, frame) with the
    frame's index as rows and its columns as x (e.g. per MoE layer: token kind × expert shares)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = max(1, len(grids))
    fig = make_subplots(rows=1, cols=n, subplot_titles=[t for t, _ in grids] or [""], shared_yaxes=True, horizontal_spacing=0.03)
    zmax = zmax if zmax is not None else max((float(f.to_numpy().max()) for _, f in grids if f.size), default=1.0)
    for i, (name, f) in enumerate(grids):
        fig.add_trace(go.Heatmap(z=f.to_numpy(), x=[str(c) for c in f.columns], y=[str(r) for r in f.index], coloraxis="coloraxis",
                                 hovertemplate=f"{name}: %{{y}} → %{{x}}: %{{z:.3f}}<extra></extra>"), row=1, col=i + 1)  # fmt: skip
        fig.update_xaxes(title_text=x_title, row=1, col=i + 1)
    fig.update_layout(title=title, coloraxis={"colorscale": "Viridis", "cmin": 0, "cmax": zmax, "colorbar": {"title": colorbar}},
                      height=340, width=max(520, 260 * n))  # fmt: skip
    return fig
