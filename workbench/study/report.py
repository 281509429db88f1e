"""A study's report: metric vs ablation size per grid family, NIAH grids, the ranking, a summary table and
the failures, as one offline HTML page plus one PNG per figure."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pandas as pd
import torch

from ..base import plots
from ..views import report
from ..base.files import atomic_path

_METRIC = {"niah": "NIAH accuracy", "loss": "loss (nats)", "logit_diff": "logit difference", "generation_match": "generation match"}


def metric_vs_k(run, summary: pd.DataFrame):
    """Mean metric against the number of ablated heads/experts, one line per grid family (± std over seeds);
    ``None`` when the study has no sized families (only ``none`` and ``layer`` grids: see :func:`per_layer`)."""
    sized = summary[~summary["select"].isin(["none", "layer"])]
    if not len(sized):
        return None
    study = run.study
    fig = _families(sized, summary, lambda select: "markers" if select == "explicit" else "lines+markers")
    # a line joins the sizes of one family (top-k, random-k); explicit sets are unrelated: points, no line
    fig.update_layout(title=f"{study.name}: {_METRIC[study.task.kind]} vs number of ablated {study.ablation.target} "
                            f"(mode {study.ablation.mode})", xaxis_title=f"ablated {study.ablation.target} (k)",
                      yaxis_title=_METRIC[study.task.kind], width=760, height=420)  # fmt: skip
    return fig


def per_layer(run, summary: pd.DataFrame):
    """``select = "layer"`` grids: mean metric with every head (expert) of one layer ablated, per layer (± std),
    the unablated baseline as a dashed line; ``None`` without layer grids."""
    layers = summary[summary["select"] == "layer"]
    if not len(layers):
        return None
    study = run.study
    fig = _families(layers, summary, lambda select: "lines+markers")
    fig.update_layout(title=f"{study.name}: {_METRIC[study.task.kind]} with every {study.ablation.target[:-1]} of one layer "
                            f"ablated (mode {study.ablation.mode})", xaxis_title="ablated layer",
                      yaxis_title=_METRIC[study.task.kind], width=760, height=420)  # fmt: skip
    fig.update_xaxes(tickmode="array", tickvals=sorted(int(k) for k in layers["k"].unique()))
    return fig


def _families(part: pd.DataFrame, summary: pd.DataFrame, mode):
    """One trace per (grid, select) family of ``part`` (x = its ``k``), the ``none`` baselines as dashed lines."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for (grid, select), fam in part.groupby(["grid", "select"], sort=False):
        fig.add_trace(go.Scatter(x=fam["k"], y=fam["metric_mean"], name=f"{grid} ({select})", mode=mode(select),
                                 error_y={"type": "data", "array": fam["metric_std"].tolist(), "visible": True}))  # fmt: skip
    for _, row in summary[summary["select"] == "none"].iterrows():
        fig.add_hline(y=row["metric_mean"], line_dash="dash", annotation_text=f"{row['grid']} (no ablation)")
    return fig


def write_report(run, out: Path, *, png: bool = True) -> Path:
    study = run.study
    res = run.results()
    summary = run.summary(res)
    sections: list[tuple[str, object]] = [("Study", f"{study.name}: {study.description or ''} — model {study.model.source} "
                                                   f"({study.model.dtype}); task {study.task.kind}; {run.status()}")]  # fmt: skip
    figs: dict[str, object] = {}
    if len(summary):
        for name, build in (("metric_vs_k", metric_vs_k), ("per_layer", per_layer)):
            if (fig := build(run, summary)) is not None:  # a study draws only the figures its grids fill
                figs[name] = fig
    if study.task.kind == "niah" and len(res):
        for (grid, k), part in res.groupby(["grid", "k"]):
            if k == res.loc[res["grid"] == grid, "k"].max():
                grid_frame = part.pivot_table(index="depth", columns="length", values="metric", aggfunc="mean")
                grid_frame.columns = [int(c) for c in grid_frame.columns]
                figs[f"niah_{re.sub(r'[^A-Za-z0-9]+', '-', grid)}_k{k}"] = plots.niah_grid(grid_frame, f"NIAH accuracy, {grid} (k = {k})")
    ranks = run.rankings()
    if len(ranks) and study.ablation.target == "heads":
        first = ranks[ranks.unit_id == ranks.unit_id.iloc[0]]
        grid = torch.zeros(int(first.layer.max()) + 1, int(first.unit.max()) + 1)
        grid[first.layer.tolist(), first.unit.tolist()] = torch.tensor(first.metric.tolist(), dtype=torch.float32)
        figs["ranking"] = plots.head_grid(grid, "retrieval score of the ranking scan (Wu 2024, set)")
    sections += [(name.replace("_", " "), fig) for name, fig in figs.items()]
    sections.append(("Summary", summary))
    fails = run.failures()
    sections.append((f"Failures ({len(fails)})", fails[["unit", "error", "worker"]] if len(fails) else "none"))
    if len(res):
        prov = res.iloc[0]
        sections.append(("Provenance", pd.DataFrame([{c: prov[c] for c in ("model_source", "model_id", "revision", "weights_hash",
                                                                            "dtype", "bos_policy", "workbench_version",
                                                                            "transformers_version", "definition")}]).T))  # fmt: skip
    # Every write below stays in `out` (resolved once; the run resolves and confines its own report/) and
    # replaces files atomically: a symlink named like a report file is replaced, never written through.
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    for stale in out.glob("*.png"):  # figures of an earlier report of this run (a link is removed, not followed)
        stale.unlink()
    with atomic_path(out / "summary.csv", root=out) as tmp:
        summary.to_csv(tmp, index=False)
    if png:
        for name, fig in figs.items():
            try:
                with atomic_path(out / f"{name}.png", root=out) as tmp:
                    fig.write_image(tmp, format="png", scale=1)
            except Exception as e:  # noqa: BLE001 - PNG export needs a browser; the HTML report does not
                warnings.warn(f"PNG export skipped ({type(e).__name__}: {e}); install chromium for PNGs")
                break
    with atomic_path(out / "index.html", root=out) as tmp:
        report.write_html(tmp, f"Study report: {study.name}", sections)
    return out / "index.html"
