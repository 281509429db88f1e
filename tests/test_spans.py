"""Span profile (MoA): row spans equal the grid-rounded exact spans of an explicit float64 matrix, planted
uniform and sink heads give their closed-form spans, and the scan follows the protocol."""
import threading

import pytest
import torch

import workbench as wb
from reference import assert_round_trip, eager_attentions
from handbuilt import SINK_HEAD, content_model
from workbench import spans
from workbench.models.testing import byte_tokenizer, tiny_hf_model

TEXT = "Span profiles measure how far back each head looks. " * 8


def eager_probs(m, ids):
    return eager_attentions(m, ids)[0][:, 0]  # [L, H, T, T]


def exact_spans(p: torch.Tensor, q: float, sink: int = 0):
    """Exact span per row from the matrix: the smallest d with Σ_{i−j<d or j<sink} p_ij ≥ q; also the
    cumulative masses by distance ``[..., row, d−1]`` (to spot rows within rounding of q)."""
    T = p.shape[-1]
    i = torch.arange(T)[:, None]
    d = torch.arange(1, T + 1)[None, :]
    # mass(d) for row i: keys j with i − j < d, plus keys j < sink outside the window
    j = torch.arange(T)
    inside = ((i[:, :, None] - j[None, None, :]) < d[:, :, None]) & (j[None, None, :] <= i[:, :, None])  # [T(row), T(d), T(key)]
    keep = inside | ((j[None, None, :] < sink) & (j[None, None, :] <= i[:, :, None]))
    mass = torch.einsum("...ij,idj->...id", p, keep.double())
    first = (mass >= q).to(torch.int8).argmax(-1) + 1
    return first, mass


def grid_round(d: torch.Tensor, grid) -> torch.Tensor:
    g = torch.tensor(grid)
    return g[torch.searchsorted(g, d)]


def sharp_llama():
    """A tiny random Llama with sharpened attention (random weights alone give near-uniform rows)."""
    hf = tiny_hf_model("llama", seed=3)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(25)
    return wb.load(hf, tokenizer=byte_tokenizer(), source_label="tiny:llama-sharp")


@pytest.mark.parametrize("sink", [0, 2])
def test_row_spans_equal_grid_rounded_exact_spans(sink):
    m = sharp_llama()
    ids = m.encode(TEXT)[:, :48]
    T = ids.shape[1]
    grid = spans.window_grid(T, 2)
    q = 0.9
    ours = spans.row_spans(spans.window_masses(m, ids, grid, sink=sink), grid, q)  # [L, H, T]
    exact, mass = exact_spans(eager_probs(m, ids), q, sink)
    ref = grid_round(exact, grid)
    # rows whose mass at some grid window lies within float32 rounding of q are ambiguous: leave them out
    at_grid = mass[..., torch.tensor(grid) - 1]
    clear = ((at_grid - q).abs() > 1e-4).all(-1)
    assert clear.float().mean() > 0.99
    assert torch.equal(ours[clear], ref[clear])
    assert len(set(ours.flatten().tolist())) > 4  # the sharpened heads give a spread of spans, not one value
    # the window masses themselves equal the matrix's (no sink: Σ_{i−j<w} p_ij)
    if sink == 0:
        torch.testing.assert_close(spans.window_masses(m, ids, grid), mass[..., torch.tensor(grid) - 1], atol=2e-6, rtol=0)


def planted_model():
    """Hand-built Llama on the byte vocabulary: head 0 puts all its mass on the first token (<s>),
    heads 2 and 3 attend exactly uniformly."""
    hf = content_model(vocab=260, bos_token=257, copy=False)
    return wb.load(hf, tokenizer=byte_tokenizer(), source_label="hand-built")


def test_planted_uniform_and_sink_heads_have_closed_form_spans():
    m = planted_model()
    ids = m.encode(TEXT)[:, :100]
    T = ids.shape[1]
    grid = spans.window_grid(T, 2)
    i = torch.arange(T)
    uniform = grid_round((9 * (i + 1) + 9) // 10, grid)  # ceil(0.9 (i + 1)) in integers, then the grid
    masses = spans.window_masses(m, ids, grid)
    got = spans.row_spans(masses, grid, 0.9)
    assert torch.equal(got[0, 2], uniform) and torch.equal(got[0, 3], uniform)
    assert torch.equal(got[0, SINK_HEAD], grid_round(i + 1, grid))  # must reach key 0: the whole row
    kept = spans.row_spans(spans.window_masses(m, ids, grid, sink=1), grid, 0.9)
    assert (kept[0, SINK_HEAD] == 1).all()  # with the first key kept, one key suffices


def test_scan_medians_and_elastic_rule_on_planted_heads():
    m = planted_model()
    r = spans.scan(m, lengths=[32, 64, 128], texts=[TEXT, TEXT.upper()], progress=False)
    cfg = spans.SpanConfig(lengths=[32, 64, 128])
    s = r.span()
    for k, n in enumerate(r.lengths):
        i = torch.arange(n)
        rows = grid_round((9 * (i + 1) + 9) // 10, cfg.grid(n))
        expected = rows.sort().values[(n - 1) // 2]  # lower median (both texts give the same rows)
        assert s[k, 0, 2] == expected and s[k, 0, 3] == expected
        assert s[k, 0, SINK_HEAD] == cfg.grid(n)[torch.searchsorted(torch.tensor(cfg.grid(n)), torch.tensor((n - 1) // 2 + 1))]
    a, b = r.fit()
    n = torch.tensor(r.lengths, dtype=torch.float64)
    expected_b = ((n - n.mean()) * (s[:, 0, 2] - s[:, 0, 2].mean())).sum() / ((n - n.mean()) ** 2).sum()
    assert b[0, 2] == pytest.approx(float(expected_b)) and b[0, 2] > 0.4
    heads = r.heads()
    assert heads.set_index(["layer", "head"]).loc[(0, 2), "elastic"]
    kept = spans.scan(m, lengths=[32, 64, 128], texts=[TEXT], sink=1, progress=False)
    assert kept.fit()[1][0, SINK_HEAD] == 0 and (kept.span()[:, 0, SINK_HEAD] == 1).all()
    assert not kept.heads().set_index(["layer", "head"]).loc[(0, SINK_HEAD), "elastic"]


def test_grid_and_resolution():
    assert spans.window_grid(64, 2) == (1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64)
    assert spans.window_grid(100, 1, extra=[50]) == (1, 2, 4, 8, 16, 32, 50, 64, 100)
    assert spans.resolution(range(1, 20)) == 0
    assert spans.resolution(spans.window_grid(8192, 2)) < 0.42
    assert len(spans.SpanConfig(lengths=[64, 8192]).windows()) <= 64


def test_protocol_cancel_and_round_trip(tiny, tmp_path):
    m = tiny("llama")
    fields = dict(lengths=[16, 32], texts=[TEXT, TEXT[::-1], TEXT.upper()])
    seen = []
    full = spans.scan(m, **fields, on_case=seen.append, progress=False)
    assert [c.index for c in seen] == [0, 1, 2] and full.complete
    stop = threading.Event()
    part = spans.scan(m, **fields, on_case=lambda c: stop.set() if c.index == 1 else None, cancel=stop, progress=False)
    assert not part.complete and part.n_texts == 2 and set(part.histogram["text"]) == {0, 1} and "cancel" in part.summary()
    store = wb.ResultStore(tmp_path)
    for r in (full, part):
        back = assert_round_trip(r, store)
        inputs = back.provenance.extra["input_ids"]  # the exact inputs, one list per finished text
        assert len(inputs) == r.n_texts and all(len(ids) == 32 for ids in inputs)
    empty = spans.scan(m, **fields, cancel=lambda: True, progress=False)
    assert empty.n_texts == 0 and "nothing to report" in empty.summary()


@pytest.mark.parametrize("bad, match", [
    (dict(lengths=[64]), "at least two different input lengths"),
    (dict(lengths=64), "lengths must be a list of integers"),
    (dict(q=0), "q must lie in \\(0, 1\\]"),
    (dict(q=1.5), "q must lie in"),
    (dict(steps_per_octave=0), "steps_per_octave must be in 1..8"),
    (dict(sink=64), "sink must be in 0..63"),
    (dict(lengths=[64, 8192], steps_per_octave=8), "needs .* span reductions; at most 64"),
    (dict(texts=["short"]), "has .* tokens; every text needs at least T = 128"),
    (dict(lengths=[64, 9000]), "exceeds the model's 512 positions"),
    (dict(texts="one string"), "texts must be a non-empty list"),
])  # fmt: skip
def test_bad_config_fails_before_the_model_runs(tiny, bad, match):
    m = tiny("llama")
    with pytest.raises(wb.ProbeError, match=match):
        spans.scan(m, **{"lengths": [64, 128], **bad}, on_case=lambda c: pytest.fail("a case ran"), progress=False)


def test_smollm2_span_regression(smollm):
    """SmolLM2 (one text, N = 32, 64): nearly every head widens with the input because it must reach the
    first token; a few layer-2/11 heads are static local heads; with the first key kept, the layer-17/18 sink
    heads need one key."""
    text = [wb.sinks.texts_for(128)[0]]
    r = spans.scan(smollm, lengths=[32, 64], texts=text, progress=False)
    h = r.heads().set_index(["layer", "head"])
    assert h["elastic"].mean() > 0.9
    for lh in [(2, 1), (11, 1)]:
        assert h.loc[lh, "span_slope"] == 0 and h.loc[lh, "span_at_64"] <= 4
    kept = spans.scan(smollm, lengths=[32, 64], texts=text, sink=1, progress=False).heads().set_index(["layer", "head"])
    assert kept["elastic"].mean() < h["elastic"].mean()
    for lh in [(17, 4), (18, 6), (18, 7)]:
        assert kept.loc[lh, "span_at_64"] == 1
