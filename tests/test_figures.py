"""Issue 26: no empty figure anywhere. Every figure of every Result kind is built from a small real result (tiny
models) and must draw data; a study with ``select = "layer"`` draws its metric per layer; the taxonomy's kind
map shows every kind of a head and counts what the summary counts."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import workbench as wb
from workbench.measure.result import Result

TEXTS = ("The lighthouse keeper climbed the stairs every evening to light the lamp for the ships at sea. " * 3,
         "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 3)  # fmt: skip


def _flat(v) -> list:
    if v is None or isinstance(v, (str, bytes)):
        return [] if v is None else [v]
    v = v.tolist() if hasattr(v, "tolist") else v
    return [x for e in v for x in _flat(e)] if isinstance(v, (list, tuple)) else [v]


def drawn_points(fig) -> int:
    """How many values a plotly figure's traces draw: finite numbers (or category names) of each trace's
    z, else y, else values, else x. Shapes and annotations alone do not count."""
    n = 0
    for tr in fig.data:
        for axis in ("z", "y", "values", "x"):
            vals = _flat(getattr(tr, axis, None))
            if vals:
                n += sum(isinstance(x, str) or (isinstance(x, (int, float)) and math.isfinite(x)) for x in vals)
                break
    return n


def _subclasses(cls) -> set:
    return {c for s in cls.__subclasses__() for c in {s} | _subclasses(s)}


@pytest.fixture(scope="module")
def results(tiny):
    """One small real result of every Result kind (seconds on tiny models)."""
    from workbench import duo, qrhead, representation, retrieval, sinks, spans, taxonomy
    from workbench.routing import joint
    from workbench import routing

    llama, moe = tiny("llama"), wb.load("tiny-moe")
    texts = list(TEXTS)
    r = retrieval.scan(llama, retrieval.RetrievalConfig(lengths=[400], depths=2, max_new_tokens=4), progress=False)
    s = sinks.scan(llama, sinks.SinkConfig(T=32, texts=texts), progress=False)
    out = [
        r,
        retrieval.ablation_check(llama, r, k=1, seeds=(0,), progress=False),
        s,
        sinks.calibration_experiment(llama, s, heads=[(1, 0)], progress=False),
        taxonomy.scan(llama, taxonomy.TaxonomyConfig(lengths=(64,), n_texts=1), progress=False),
        spans.scan(llama, spans.SpanConfig(lengths=(32, 64), texts=texts), progress=False),
        representation.scan(llama, representation.RepresentationConfig(T=32, texts=texts), progress=False),
        qrhead.scan(llama, qrhead.QRConfig(lengths=(400,), depths=2), progress=False),
        duo.scan(llama, duo.DuoConfig(length=320, steps=2, sink=1, recent=4), progress=False),
        routing.scan(moe, routing.RoutingConfig(texts=texts, max_tokens=48), progress=False),
        joint.scan(moe, joint.JointConfig(texts=texts, max_tokens=48), progress=False),
    ]
    return out


def test_every_figure_of_every_result_kind_draws_data(results):
    kinds = {type(r) for r in results}
    missing = {c.__name__ for c in _subclasses(Result)} - {c.__name__ for c in kinds}
    assert not missing, f"no figure test for {sorted(missing)}: add a small result of each kind above"
    for r in results:
        figures = r.figures()
        assert figures, f"{type(r).__name__} has no figure"
        for name, build in figures.items():
            fig = build()
            said = [a.text for a in fig.layout.annotations if a.name == "empty"]
            assert drawn_points(fig) > 0 or said, f"{type(r).__name__}.figures()[{name!r}] is empty and does not say why"


def test_a_grid_with_no_defined_value_says_why():
    from workbench.base import plots

    fig = plots.head_grid(torch.full((2, 3), float("nan")), "retrieval score")
    assert drawn_points(fig) == 0 and [a.text for a in fig.layout.annotations if a.name == "empty"]
    assert not plots.head_grid(torch.rand(2, 3), "x").layout.annotations


def test_a_layer_study_draws_its_metric_per_layer(tmp_path):
    from workbench.study import run_study
    from workbench.study.report import metric_vs_k, per_layer, write_report

    cfg = tmp_path / "layers.toml"
    cfg.write_text('name = "layers"\n[model]\nsource = "tiny:llama"\n[task]\nkind = "loss"\nn_texts = 1\nmax_tokens = 32\n'
                   '[ablation]\ntarget = "heads"\nmode = "zero"\n[[grid]]\nselect = "none"\n[[grid]]\nselect = "layer"\nlayers = [0, 1]\n')
    run = run_study(cfg, tmp_path / "run", executor="local", resume=False)
    summary = run.summary(run.results())
    assert metric_vs_k(run, summary) is None  # no sized family: no empty "metric vs k" plot
    fig = per_layer(run, summary)
    assert [list(t.x) for t in fig.data] == [[0, 1]] and all(math.isfinite(y) for y in fig.data[0].y)
    assert fig.layout.xaxis.title.text == "ablated layer"
    page = write_report(run, tmp_path / "report", png=False).read_text()
    assert "<h2>per layer</h2>" in page and "<h2>metric vs k</h2>" not in page


def _planted_taxonomy(tiny):
    """3 layers × 4 heads with planted means: L0H1 sink and previous-token, L1H2 sink and induction, L2H3 induction."""
    from workbench.measure.taxonomy import _AXES, TaxonomyResult

    values = torch.zeros(1, len(_AXES), 3, 4)
    ax = {a: i for i, a in enumerate(_AXES)}
    for (l, h), planted in {(0, 1): ("attn.alpha[0]", "attn.prev_mass"), (1, 2): ("attn.alpha[0]", "attn.induction_mass"),
                            (2, 3): ("attn.induction_mass",)}.items():  # fmt: skip
        for a in planted:
            values[0, ax[a], l, h] = 0.95
    cases = pd.DataFrame({"case": [0], "kind": ["planted"], "length": [64]})
    return TaxonomyResult(values, _AXES, cases, tiny("llama").provenance)


def test_the_kind_map_shows_every_kind_of_a_head_and_the_summary_counts(tiny):
    r = _planted_taxonomy(tiny)
    assert r.kinds()[(0, 1)] == ["sink", "previous-token"] and r.kinds()[(1, 2)] == ["sink", "induction"]
    fig = r.figure("kinds")
    counts = r.kind_counts()
    head_line = r.summary().splitlines()[0]
    shown = {t.meta["kind"]: t for t in fig.data if t.meta}
    assert set(shown) == {k for k in counts if k != "retrieval"} | {None}  # retrieval was not joined: not in the legend
    for kind, n in counts.items():
        if kind == "retrieval":
            continue
        tr = shown[kind]
        assert tr.name == f"{kind} ({n})" and tr.meta["heads"] == n  # the legend counts what the summary counts
        assert (list(tr.x).count(None) if n else 0) == n  # one stripe per head of that kind (an empty kind: [None])
        if n or kind != "retrieval":
            assert f"{kind} {n}" in head_line
    assert counts["sink"] == 2 and counts["induction"] == 2 and counts["previous-token"] == 1
    sink_x = [x for x in shown["sink"].x if x is not None]
    assert max(sink_x) - min(sink_x) < 3  # stripes, not whole cells: two kinds share L0H1's cell
    widths = {round(max(x) - min(x), 3) for x in zip(*[iter(shown["induction"].x)] * 6)  # (x0, x1, x1, x0, x0, None)
              for x in [[v for v in x if v is not None]]}  # fmt: skip
    assert widths == {0.45, 0.9}, widths  # L1H2 half a cell (two kinds), L2H3 a whole one
    colours = {t.fillcolor for t in shown.values()}
    assert len(colours) == len(shown)  # one colour per kind (and for none)
    assert list(fig.layout.yaxis.range) == [2.6, -0.6]  # L0 on top, as in every grid
    assert drawn_points(fig) > 0
