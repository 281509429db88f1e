"""Widgets without a browser: every number a view shows equals an independent reference."""
import shutil

import pandas as pd
import pytest
import torch

import workbench as wb
from reference import eager_attentions
from workbench.base.errors import ProbeError, WorkbenchError
from workbench.views.widgets import AttentionView, HeadGrid, NIAHGrid, RoutingView, head_scores, to_panel

TEXT = "Sinks soak up attention; retrieval heads copy."


def eager_rows(m, ids, layer):
    """HF eager attention probabilities of one layer ``[head, T, T]`` (the reference)."""
    return eager_attentions(m, ids)[0][layer, 0]


# --- AttentionView -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: a sliding-window layer
def test_attention_view_rows_equal_eager(tiny, arch):
    m = tiny(arch)
    view = AttentionView(m, TEXT, layer=0, head=1, queries=[5, 20])
    ref = eager_rows(m, view.ids, 0)
    assert [r["query"] for r in view.rows] == [5, 20]
    for r in view.rows:
        q = r["query"]
        torch.testing.assert_close(torch.tensor(r["weights"], dtype=torch.double), ref[1, q, : q + 1], atol=1e-5, rtol=0)
    view.show(1, 3)  # another layer and head: fetched lazily, still exact
    ref1 = eager_rows(m, view.ids, 1)
    torch.testing.assert_close(view.row(20).double(), ref1[3, 20, :21], atol=1e-5, rtol=0)
    assert view.tokens == m.tokens(view.ids[0])


def test_attention_view_smollm_row_equals_eager(smollm):
    view = AttentionView(smollm, "The capital of France is Paris. The capital of France is", layer=14, head=4)
    q = view.ids.shape[1] - 1
    assert view.queries == [q]  # default: the last token
    ref = eager_rows(smollm, view.ids, 14)
    torch.testing.assert_close(torch.tensor(view.rows[0]["weights"], dtype=torch.double), ref[4, q], atol=1e-5, rtol=0)


def test_attention_view_clicks_run_no_forward_pass(tiny):
    """The first run keeps every layer's queries and keys (one forward pass); then another query, head or
    layer costs one layer's rows — no forward pass. Nothing N×N is kept."""
    m = tiny("llama")
    seen = []
    hooks = [m.hf.get_submodule(p).register_forward_pre_hook(lambda mod, a, kw, i=i: seen.append((i, kw["hidden_states"].shape[1])),
                                                            with_kwargs=True)
             for i, p in enumerate(m.spec.attention_paths)]  # fmt: skip
    try:
        view = AttentionView(m, TEXT, layer=0, head=0, queries=[7])
        T = view.ids.shape[1]
        assert seen == [(0, T), (1, T)] and view.drill.forward_passes == 1
        assert len(view.rows) == 1 and len(view.rows[0]["weights"]) == 8
        view.show(1, 3)
        view.queries = [3, 20]
        view.selected = [0, 2]
        assert seen == [(0, T), (1, T)]  # served from the cached queries and keys
        assert view.drill.elements == T * (4 + 2) * 16 * 2  # [T, heads + kv heads, d_head] per layer
    finally:
        for h in hooks:
            h.remove()


def test_attention_view_rows_name_their_head_and_top_keys(tiny):
    m = tiny("gpt_oss")  # learned sinks and a sliding-window layer
    view = AttentionView(m, TEXT, layer=0, head=3, queries=[30], top_k=5)
    ref = eager_rows(m, view.ids, 0)
    (row,) = view.rows
    assert (row["layer"], row["head"], row["query"]) == (0, 3, 30)
    want = sorted(range(31), key=lambda j: (-float(ref[3, 30, j]), j))[:5]
    assert [k for k, _ in row["top"]] == want
    torch.testing.assert_close(torch.tensor([p for _, p in row["top"]], dtype=torch.double), ref[3, 30, want], atol=1e-5, rtol=0)
    assert view.top_keys(30, 2) == [tuple(x) for x in row["top"][:2]]


def test_attention_view_state_grows_linearly_with_length(tiny):
    """The page gets the tokens once and one row per query: O(N) bytes, never N×N (the 8K-token promise)."""
    import json

    m = tiny("llama")
    ids = torch.randint(3, 250, (1, 500), generator=torch.Generator().manual_seed(0))
    size = {}
    for n in (250, 500):
        view = AttentionView(m, ids[:, :n], layer=1, head=0)
        size[n] = len(json.dumps({k: getattr(view, k) for k in ("tokens", "rows")}))
    assert size[500] < 2.2 * size[250]
    assert len(view.rows) == 1 and len(view.rows[0]["weights"]) == 500


def test_attention_view_selecting_a_token_fetches_its_row(tiny):
    m = tiny("llama")
    view = AttentionView(m, TEXT, layer=1, head=2)
    view.queries = [11, 3]  # what a (shift-)click in the view sets
    assert [r["query"] for r in view.rows] == [3, 11]
    ref = eager_rows(m, view.ids, 1)
    torch.testing.assert_close(torch.tensor(view.rows[1]["weights"], dtype=torch.double), ref[2, 11, :12], atol=1e-5, rtol=0)


def test_attention_view_bad_input(tiny):
    m = tiny("llama")
    with pytest.raises(ProbeError, match="layer 5 does not exist"):
        AttentionView(m, TEXT, layer=5)
    view = AttentionView(m, TEXT)
    with pytest.raises(ProbeError, match="queries must be token positions"):
        view.queries = [10_000]
    with pytest.raises(ProbeError, match="head 9 does not exist"):
        view.head = 9
    with pytest.raises(ProbeError, match="at most 32 queries"):
        view.queries = list(range(33))
    with pytest.raises(ProbeError, match="empty prompt"):
        AttentionView(m, "  ")


# --- HeadGrid ------------------------------------------------------------------------------------------------


def fake_results(L=3, H=4):
    from workbench.measure.duo import DuoResult
    from workbench.measure.retrieval import RetrievalResult
    from workbench.measure.sinks import SinkResult

    g = torch.Generator().manual_seed(0)
    tests = pd.DataFrame({"length": [100, 100, 200, 200], "depth": [0.1, 0.9, 0.1, 0.9], "counted": [True, False, True, True]})
    ret = RetrievalResult(scores=torch.rand(L, H, generator=g), tests=tests, per_test_scores=torch.rand(4, L, H, generator=g),
                          variant="set", provenance=None)  # fmt: skip
    sink = SinkResult(alpha=torch.rand(2, L, H, 4, generator=g), seen_by=torch.full((2, L, 4), 64), token_ids=[[1]], tokens=[["a"]], eps=0.3, T=64,
                      massive=pd.DataFrame(columns=["text", "layer", "position", "dim", "value"]), provenance=None)  # fmt: skip
    duo = DuoResult(gates=torch.rand(L, 2, generator=g), losses=[1.0, 0.5], sink=4, recent=8, provenance=None)
    return ret, sink, duo


def test_head_grid_values_equal_the_results():
    ret, sink, duo = fake_results()
    grid = HeadGrid(ret)
    assert grid.metrics == ["retrieval_score"]
    torch.testing.assert_close(torch.tensor(grid.values["retrieval_score"]), ret.scores)
    l, h = grid.selected  # starts on the best head
    assert ret.scores[l, h] == ret.scores.max()
    grid = HeadGrid(sink)
    for k in range(4):
        torch.testing.assert_close(torch.tensor(grid.values[f"attn.alpha[{k}]"]), sink.alpha.mean(0)[..., k])
    grid.metric = "attn.alpha[2]"
    assert grid.value(1, 2) == pytest.approx(float(sink.alpha[:, 1, 2, 2].mean()))
    torch.testing.assert_close(torch.tensor(HeadGrid(duo).values["duo_gate"]), duo.gates)
    grid = HeadGrid({"a": [[1.0, float("nan")]], "b": torch.ones(1, 2)})
    assert grid.values["a"] == [[1.0, None]]  # NaN travels as null


def test_head_grid_duo_gates_expand_to_query_heads(tiny):
    m = tiny("llama")  # 4 query heads, 2 KV heads
    from workbench.measure.duo import DuoResult

    duo = DuoResult(gates=torch.tensor([[0.1, 0.9], [0.6, 0.2]]), losses=[], sink=4, recent=8, provenance=None)
    gate = head_scores(duo, m)["duo_gate"]
    assert torch.equal(gate, duo.gates[:, [0, 0, 1, 1]])


def test_head_grid_from_a_capture_equals_its_statistics(tiny):
    m = tiny("llama")
    with wb.capture(m, wb.AttentionStats(sink_keys=2, layers=[1])) as cap:
        m.forward_text(TEXT)
    grid = HeadGrid(cap)
    values = {k: torch.tensor([[float("nan") if v is None else v for v in row] for row in vs]) for k, vs in grid.values.items()}
    assert values["attn.alpha[0]"][0].isnan().all()  # layer 0 was not captured
    torch.testing.assert_close(values["attn.alpha[1]"][1], wb.sinks.alpha(cap)[1, :, 1])
    torch.testing.assert_close(values["attn.entropy"][1], cap["blocks.1.attn.entropy"][0].mean(-1))
    torch.testing.assert_close(values["attn.top1_prob"][1], cap["blocks.1.attn.top1_prob"][0].mean(-1))


def test_head_grid_click_updates_the_drill_down(tiny):
    m = tiny("llama")
    with wb.capture(m, wb.AttentionStats(sink_keys=1)) as cap:
        m.forward_text(TEXT)
    grid = HeadGrid(cap, prompt=TEXT)
    assert grid.model is m and grid.can_ablate
    grid.selected = [1, 3]  # what clicking the cell sets
    view = grid.attention
    assert (view.layer, view.head) == (1, 3)
    q = view.queries[0]
    ref = eager_rows(m, view.ids, 1)
    torch.testing.assert_close(torch.tensor(view.rows[0]["weights"], dtype=torch.double), ref[3, q, : q + 1], atol=1e-5, rtol=0)
    box = grid.view()
    assert list(box.children) == [grid, view]


def test_head_grid_ablation_reports_the_edit_effect(tiny):
    m = tiny("llama")
    grid = HeadGrid({"x": torch.zeros(2, 4)}, model=m, prompt=TEXT, max_new_tokens=3)
    grid.ablate = [[0, 1], [1, 2], [0, 1]]
    assert grid.ablate == [[0, 1], [1, 2]]
    grid.mode = "uniform"
    grid.run += 1  # the view's "run ablation" button
    assert grid.error == ""
    ref = wb.effects.edit_effect(m, TEXT, wb.HeadAblation([(0, 1), (1, 2)], mode="uniform"), max_new_tokens=3)
    assert grid.effect["loss_after"] == pytest.approx(ref.loss_after, abs=1e-6)
    assert grid.effect["max_logit_change"] == pytest.approx(ref.max_logit_change, abs=1e-5)
    assert grid.effect["text_after"] == ref.text_after and grid.effect["heads"] == [[0, 1], [1, 2]]
    eff = grid.run_ablation(mode="mean")  # mean over the prompt's own tokens
    assert eff.labels == ("head-ablation:mean",)


def test_head_grid_bad_input(tiny):
    m = tiny("llama")
    with pytest.raises(ProbeError, match="cannot read per-head scores from str"):
        HeadGrid("scores")
    with pytest.raises(ProbeError, match="must be a non-empty \\[layer, head\\] grid"):
        HeadGrid({"x": torch.zeros(3)})
    with pytest.raises(ProbeError, match="has shape"):
        HeadGrid({"x": torch.zeros(2, 4), "y": torch.zeros(2, 3)})
    with pytest.raises(ProbeError, match="the model has 2 layers × 4 query heads"):
        HeadGrid({"x": torch.zeros(3, 4)}, model=m)
    with pytest.raises(ProbeError, match="needs a model"):
        HeadGrid({"x": torch.zeros(2, 4)}, prompt="hi")
    grid = HeadGrid({"x": torch.zeros(2, 4)})
    with pytest.raises(ProbeError, match="not a \\[layer, head\\] cell"):
        grid.selected = [2, 0]
    with pytest.raises(ProbeError, match="no metric"):
        grid.metric = "y"
    with pytest.raises(ProbeError, match="ablation needs model= and prompt="):
        grid.run_ablation()
    grid.run += 1  # from the browser: the error is shown, not raised
    assert "ablation needs model" in grid.error
    with pytest.raises(ProbeError, match="mode must be one of"):
        HeadGrid({"x": torch.zeros(2, 4)}, model=m, prompt=TEXT).mode = "half"


# --- RoutingView ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_moe():
    return wb.load("tiny-moe")


def test_routing_view_grid_equals_router_argmax(tiny_moe):
    """Qwen3-MoE routes by softmax top-k: top-1 is the argmax of the router logits HF returns."""
    view = RoutingView(tiny_moe, "def add(a, b):\n    return a + b")
    with torch.no_grad():
        out = tiny_moe.hf(input_ids=view.ids, output_router_logits=True)
    ref = torch.stack([lg.argmax(-1) for lg in out.router_logits])  # [layer, token]
    assert view.top1 == ref.tolist()
    assert view.layers == [0, 1, 2, 3] and view.n_experts == 8 and len(view.tokens) == view.ids.shape[1]
    load = torch.tensor(view.load)
    torch.testing.assert_close(load.sum(1), torch.ones(4))
    e = view.top1[2][3]
    assert 3 in view.tokens_of(2, e)
    assert view.tokens_of(2, e) == [j for j, ks in enumerate(view.experts[2]) if e in ks]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_routing_view_tiny_random_moes(tiny, arch):
    m = tiny(arch)
    view = RoutingView(m, "abc abd")
    with wb.capture(m, wb.Routing()) as cap:
        m.forward_text("abc abd")
    assert view.top1 == wb.routing.rows(cap).experts[..., 0].tolist()
    assert view.layers == list(m.spec.moe_layers)


def test_routing_view_edits_rerun_and_show_the_change(tiny_moe):
    view = RoutingView(tiny_moe, "the cat sat on the mat", max_new_tokens=4)
    e = view.top1[1][2]
    view.selected = [1, e]
    view.masked = [[1, e]]  # the view's "deactivate" toggle
    view.run += 1  # "apply"
    assert view.error == ""
    assert e not in [x for row in view.edited_top1[1] for x in [row]]
    with wb.intervene(tiny_moe, wb.ExpertMask([(1, e)])), wb.capture(tiny_moe, wb.Routing()) as cap:
        tiny_moe.forward_text("the cat sat on the mat")
    assert view.edited_top1 == wb.routing.rows(cap).experts[..., 0].tolist()
    assert view.effect["changed_top1"] == sum(a != b for ra, rb in zip(view.top1, view.edited_top1) for a, b in zip(ra, rb))
    view.masked, view.forced = [], [[0, 5]]
    view.apply()
    assert all(5 in ks for ks in view.edited_record.experts[0].tolist())
    view.forced = []
    assert view.apply() is None and view.edited_top1 == []


def test_routing_view_bad_input(tiny, tiny_moe):
    with pytest.raises(ProbeError, match="no MoE layers"):
        RoutingView(tiny("llama"), "abc")
    view = RoutingView(tiny_moe, "abc")
    with pytest.raises(ProbeError, match="not a \\[layer, expert\\] pair"):
        view.masked = [[0, 8]]
    view.forced = [[0, 1], [0, 2], [0, 3]]
    view.run += 1
    assert "forcing 3 experts in layer 0" in view.error


# --- NIAHGrid ------------------------------------------------------------------------------------------------


def test_niah_grid_equals_accuracy_grids():
    ret, _, _ = fake_results()
    ablated = ret.accuracy_grid() * 0.5
    grid = NIAHGrid(ret, ablated, titles=("baseline", "retrieval heads ablated"))
    assert [p["title"] for p in grid.panels] == ["baseline", "retrieval heads ablated"]
    assert grid.panels[0]["z"] == ret.accuracy_grid().to_numpy().tolist()
    assert grid.panels[1]["z"] == ablated.to_numpy().tolist()
    assert grid.panels[0]["lengths"] == ["100", "200"] and grid.panels[0]["depths"] == ["0.1", "0.9"]
    assert len(NIAHGrid(ret).panels) == 1
    with pytest.raises(ProbeError, match="RetrievalResult or an accuracy DataFrame"):
        NIAHGrid([[1]])
    with pytest.raises(ProbeError, match="in \\[0, 1\\]"):
        NIAHGrid(ret.accuracy_grid() * 3)


# --- one view, two hosts ---------------------------------------------------------------------------------------


def test_to_panel_mirrors_both_ways(tiny):
    from panel.custom import AnyWidgetComponent

    m = tiny("llama")
    grid = HeadGrid({"x": torch.rand(2, 4, generator=torch.Generator().manual_seed(0))}, model=m, prompt=TEXT, max_new_tokens=2)
    comp, view = to_panel(grid), to_panel(grid.attention)
    assert isinstance(comp, AnyWidgetComponent) and type(comp)._esm == grid._esm  # the same front-end
    comp.selected = [1, 2]  # the browser clicks a cell in Panel
    assert grid.selected == [1, 2]  # -> trait
    assert (grid.attention.layer, grid.attention.head) == (1, 2)  # -> the widget's observers ran
    assert view.selected == [1, 2] and view.rows == grid.attention.rows  # -> reaction pushed back
    assert view.pattern["layer"] == 1 and view.pattern["head"] == 2  # the enlarged pattern followed
    view.selected = [0, 3]  # a click on a pattern thumbnail: the grid follows (one selection)
    assert grid.selected == [0, 3] and comp.selected == [0, 3]
    comp.selected = [1, 2]
    comp.run = comp.run + 1  # "run ablation" in Panel
    assert comp.effect == grid.effect and comp.effect["heads"] == [[1, 2]]
    grid.metric = "x"
    grid.ablate = [[0, 0]]  # Python side -> param
    assert comp.ablate == [[0, 0]]
    comp.selected = [7, 7]  # a bad value from the page: error shown, value restored
    assert comp.selected == [1, 2] and "not a [layer, head] cell" in comp.error
    niah = to_panel(NIAHGrid(fake_results()[0]))
    assert niah.panels[0]["title"] == "baseline"


def test_esm_is_offline_and_uses_only_the_model_api():
    for cls in (HeadGrid, AttentionView, RoutingView, NIAHGrid):
        src = cls._esm.replace("http://www.w3.org/2000/svg", "")  # the SVG namespace is a name, not a fetch
        assert "http://" not in src and "https://" not in src and "\nimport " not in src
        assert "export default { render }" in src
        assert "model.send" not in src and "get_child" not in src


# --- rich display --------------------------------------------------------------------------------------------


def test_results_display_their_figures(tmp_path, tiny_moe):
    ret, sink, duo = fake_results()
    bundle = ret._repr_mimebundle_()
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["type"] == "heatmap"
    torch.testing.assert_close(torch.tensor(ret.figure().data[0].z), ret.scores)
    assert ret.figure_kinds == ["heads", "niah"] and sink.figure_kinds == ["heads", "layers"]
    torch.testing.assert_close(torch.tensor(sink.figure().data[0].z), sink.mean_alpha[..., 0])
    assert duo.figure().layout.xaxis.title.text == "KV head"
    with pytest.raises(WorkbenchError, match="no figure 'x'"):
        ret.figure("x")
    r = wb.routing.scan(tiny_moe, texts=["the cat"], progress=False)
    torch.testing.assert_close(torch.tensor(r.figure().data[0].z), wb.routing.expert_load(r.rows))
    page = ret.write_html(tmp_path / "ret.html", "niah")
    assert page.stat().st_size > 1_000_000 and "cdn.plot.ly" not in page.read_text()[:2000]  # plotly.js inlined
    eff = wb.effects.edit_effect(tiny_moe, "the cat", wb.ExpertMask([(0, 1)]), max_new_tokens=2)
    assert "<table" in eff._repr_html_() and "expert-mask" in eff._repr_html_()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="PNG export needs Chromium (make browser)")
def test_png_export(tmp_path):
    ret, _, _ = fake_results()
    png = ret.write_image(tmp_path / "ret.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_stays_up_while_a_queued_request_runs(tiny):
    """A host queues a click behind a running one (the dashboard's Worker): the first one finishing must not
    clear the spinner (and with it the cancel button) of the second."""
    m = tiny("llama")
    view = AttentionView(m, TEXT, layer=0, head=0)
    jobs = []
    view.runner = lambda label, work, finish: jobs.append((work, finish))
    view.queries = [3]
    view.queries = [5]  # a second click while the first runs
    first, second = jobs
    first[1](first[0]())
    assert view.status and view.rows[0]["query"] == 3  # the first's rows shown, the second still running
    view.cancel += 1
    assert view.stop_event.is_set()  # cancel still reaches the running request
    view.stop_event.clear()
    second[1](second[0]())
    assert view.status == "" and view.rows[0]["query"] == 5
