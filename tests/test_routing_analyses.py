"""Routing analyses against brute-force Python computations on synthetic records (known experts,
tokens and positions), plus one pass over a real capture."""
import math
from collections import Counter
import dataclasses

import pytest
import torch

import workbench as wb
from workbench.routing import RoutingRows
from workbench.routing import analyses as A
from workbench.models.testing import tiny_model

from test_routing_capture import one_thread  # noqa: F401,E402  (autouse fixture)

L, R, E, K = 3, 300, 6, 2


@pytest.fixture(scope="module")
def rec():
    """A fake record with random distinct top-2 experts, random tokens/positions and margins."""
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(R)]) for _ in range(L)])
    weights = torch.rand(L, R, K, generator=g)
    logits = torch.randn(L, R, E, generator=g)
    return RoutingRows(
        layers=(1, 2, 4), n_experts=E, experts=experts, weights=weights,
        token_ids=torch.randint(0, 20, (R,), generator=g), positions=torch.arange(R) % 30,
        batch=torch.zeros(R, dtype=torch.long), call=torch.zeros(R, dtype=torch.long),
        margin=torch.rand(L, R, generator=g), logits=logits, scores=logits, ran=experts, agrees=torch.ones(L, R, dtype=torch.bool),
    )  # fmt: skip


def test_load_activation_and_entropy(rec):
    for l in range(L):
        counts = Counter(int(e) for e in rec.experts[l].flatten())
        load = [counts[e] / (R * K) for e in range(E)]
        torch.testing.assert_close(A.expert_load(rec)[l], torch.tensor(load))
        wsum = [float(rec.weights[l][rec.experts[l] == e].sum()) for e in range(E)]
        torch.testing.assert_close(A.expert_load(rec, weighted=True)[l], torch.tensor(wsum) / sum(wsum))
        torch.testing.assert_close(A.activation_rate(rec)[l], torch.tensor([counts[e] / R for e in range(E)]))
        h = -sum(p * math.log2(p) for p in load if p > 0)
        assert float(A.load_entropy(rec)[l]) == pytest.approx(h, rel=1e-5)
        p = torch.softmax(rec.logits[l].double(), -1)
        assert float(A.router_entropy(rec)[l]) == pytest.approx(float(-(p * p.log2()).sum(-1).mean()), rel=1e-5)


def test_coactivation_and_transitions(rec):
    co = A.coactivation(rec)
    tr = A.transitions(rec, normalize=False)
    tr_all = A.transitions(rec, choice="all", normalize=False)
    for l in range(L):
        want = torch.zeros(E, E)
        for row in rec.experts[l].tolist():
            for i in row:
                for j in row:
                    want[i, j] += 1
        torch.testing.assert_close(co[l], want)
        torch.testing.assert_close(A.coactivation(rec, normalize="conditional")[l], want / want.diag()[:, None])
        if l + 1 < L:
            t1, ta = torch.zeros(E, E), torch.zeros(E, E)
            for a, b in zip(rec.experts[l].tolist(), rec.experts[l + 1].tolist()):
                t1[a[0], b[0]] += 1
                for i in a:
                    for j in b:
                        ta[i, j] += 1
            torch.testing.assert_close(tr[l], t1)
            torch.testing.assert_close(tr_all[l], ta)
    assert tr.shape == (L - 1, E, E)
    torch.testing.assert_close(A.transitions(rec).sum(-1), torch.ones(L - 1, E))


def _mi(x, y):
    n = len(x)
    pxy, px, py = Counter(zip(x, y)), Counter(x), Counter(y)
    return sum(c / n * math.log2((c / n) / (px[a] / n * py[b] / n)) for (a, b), c in pxy.items())


def test_specialisation_against_plug_in_mi(rec):
    df = A.token_specialisation(rec, shuffles=5, seed=3)
    x = rec.token_ids.tolist()
    for l in range(L):
        y = rec.experts[l, :, 0].tolist()
        h = -sum(c / R * math.log2(c / R) for c in Counter(y).values())
        assert df.mi[l] == pytest.approx(_mi(x, y), abs=1e-9)
        assert df.h_choice[l] == pytest.approx(h, abs=1e-9)
        assert df.context[l] == pytest.approx(h - _mi(x, y), abs=1e-9)
        assert 0 <= df.score[l] <= 0.2  # random routing: chance level after the shuffle correction
        assert df.mi_null[l] > 0  # the plug-in estimator's bias that the correction removes
    # "set": the unordered top-2 pair is the label
    ds = A.token_specialisation(rec, choice="set", shuffles=1)
    y = [tuple(sorted(r)) for r in rec.experts[0].tolist()]
    assert ds.mi[0] == pytest.approx(_mi(x, y), abs=1e-9)
    # min_count drops labels seen too rarely; a label tensor and a row mask work like token ids
    pos = A.specialisation(rec, rec.positions, rows=rec.positions < 10, shuffles=1)
    keep = [i for i in range(R) if int(rec.positions[i]) < 10]
    assert pos.rows[0] == len(keep)
    assert pos.mi[0] == pytest.approx(_mi([int(rec.positions[i]) for i in keep], [int(rec.experts[0, i, 0]) for i in keep]), abs=1e-9)


def test_margins_and_flip_risk(rec):
    counts, edges = A.margin_histogram(rec, bins=[0.0, 0.25, 0.5, 1.0])
    for l in range(L):
        m = rec.margin[l].tolist()
        assert counts[l].tolist() == [sum(0 <= v < 0.25 for v in m), sum(0.25 <= v < 0.5 for v in m), sum(0.5 <= v <= 1 for v in m)]
        assert float(A.flip_risk(rec, 0.1)[l]) == pytest.approx(sum(v < 0.1 for v in m) / R)


def test_flip_risk_bounds_real_flips():
    """Perturb router logits by at most ε per expert: only tokens whose margin (in probability units)
    is below the bound can change their top-2, and some near-ties do flip."""
    m = tiny_model("olmoe")
    with wb.capture(m, wb.Routing()) as cap, torch.no_grad():
        m.hf(input_ids=torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0)))
    rec = wb.routing.rows(cap)
    rs = m.spec.routers[0]
    eps = 0.02
    x = rec.logits[0]
    noise = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * eps
    flipped = (wb.routing.route(x + noise, rs).indices.sort(1).values != rec.experts[0].sort(1).values).any(1)
    # |Δ softmax prob| ≤ (e^{2ε} − 1)·p ≤ e^{2ε} − 1 per expert, so a flip needs margin < 2(e^{2ε} − 1)
    bound = 2 * (math.exp(2 * eps) - 1)
    assert not (flipped & (rec.margin[0] >= bound)).any()
    assert flipped.any() and float(A.flip_risk(rec, bound)[0]) >= float(flipped.float().mean())


def test_risk_difference_and_behaviour_experts(rec):
    g = torch.Generator().manual_seed(9)
    others = [e for e in range(E) if e != 3]
    b = torch.tensor([[[3, others[int(i)]] for i in torch.randint(0, E - 1, (R,), generator=g)] for _ in range(L)])
    other = dataclasses.replace(rec, experts=b)  # set B always uses expert 3
    rd = A.risk_difference(rec, other)
    for l in range(L):
        for e in range(E):
            pa = sum(e in row for row in rec.experts[l].tolist()) / R
            pb = sum(e in row for row in other.experts[l].tolist()) / R
            assert float(rd[l, e]) == pytest.approx(pa - pb, abs=1e-6)
    top = A.behaviour_experts(other, rec, n=3)
    assert all(e == 3 for _, e in top) and sorted(l for l, _ in top) == [1, 2, 4]
    table = A.risk_table(rec, other)
    assert table.risk_difference.abs().is_monotonic_decreasing and len(table) == L * E


def test_bad_analysis_input(rec):
    with pytest.raises(wb.ProbeError, match="choice must be"):
        A.token_specialisation(rec, choice="bogus")
    with pytest.raises(wb.ProbeError, match="occurs 2\\+ times"):
        A.specialisation(rec, torch.arange(R))
    with pytest.raises(wb.ProbeError, match="threshold"):
        A.flip_risk(rec, 0)
    one = dataclasses.replace(rec, experts=rec.experts[:1], layers=(1,))
    with pytest.raises(wb.ProbeError, match="two recorded MoE layers"):
        A.transitions(one)
    with pytest.raises(wb.ProbeError, match="same model"):
        A.risk_difference(rec, one)
    with pytest.raises(wb.ProbeError, match="non-empty list"):
        wb.routing.scan(tiny_model("granitemoe"), texts="just a string")


def test_routing_scan_on_a_real_model():
    m = tiny_model("granitemoe")
    rec = wb.routing.scan(m, texts=["abc", "hello"], progress=False).rows
    assert rec.experts.shape[1] == 4 + 6 and rec.call.tolist() == [0] * 4 + [1] * 6 and rec.verified
    torch.testing.assert_close(A.expert_load(rec).sum(1), torch.ones(len(rec.layers)))


def test_expert_load_by_label_equals_scanning_each_label_alone():
    m = tiny_model("granitemoe")
    texts, labels = ["abc def", "ghi jkl", "mno pqr"], ["a", "b", "a"]
    table = wb.routing.scan(m, texts=texts, labels=labels, progress=False).by_label()
    assert list(dict.fromkeys(table.index.get_level_values("label"))) == ["a", "b"]
    for lab in ("a", "b"):
        alone = wb.routing.scan(m, texts=[t for t, x in zip(texts, labels) if x == lab], progress=False)
        want = A.expert_load(alone.rows) * 100
        torch.testing.assert_close(torch.tensor(table.loc[lab].to_numpy()).double(), want.double(), atol=1e-5, rtol=0)
