"""One shape for every scan and result: cancel keeps the finished cases, on_case sees every case, every
result round-trips through the store and prints one summary."""
import threading

import pytest
import torch

import workbench as wb
from reference import assert_round_trip
from workbench import duo, retrieval, routing, sinks
from workbench.models.testing import tiny_model

TEXT = "Scans run case by case; a cancelled scan keeps what it finished. " * 3


def _scans():
    """(name, model, scan function, config fields) — small enough for the default suite."""
    dense, moe = tiny_model("llama"), tiny_model("olmoe")
    return [
        ("retrieval", dense, retrieval.scan, dict(lengths=[400], depths=[10, 50, 90], max_new_tokens=3)),
        ("sinks", dense, sinks.scan, dict(texts=[TEXT, TEXT[::-1], TEXT.upper()], T=32)),
        ("duo", dense, duo.scan, dict(steps=3, length=320, sink=2, recent=8)),
        ("routing", moe, routing.scan, dict(texts=["abc def", "ghi jkl", "mno pqr"], labels=["a", "b", "a"])),
    ]


@pytest.fixture(scope="module")
def scans():
    return _scans()


@pytest.mark.filterwarnings("ignore:no NIAH test was answered")
def test_on_case_sees_every_case_and_cancel_keeps_two(scans):
    for name, m, scan, fields in scans:
        seen = []
        full = scan(m, **fields, on_case=seen.append, progress=False)
        n = 3
        assert [c.index for c in seen] == list(range(n)) and all(c.total == n for c in seen), name
        assert full.complete, name
        stop = threading.Event()
        two = []

        def after_two(c, two=two):
            two.append(c)
            if len(two) == 2:
                stop.set()

        part = scan(m, **fields, on_case=after_two, cancel=stop, progress=False)
        assert not part.complete and len(two) == 2, name
        assert "cancel" in part.summary(), name
        if name == "retrieval":
            assert len(part.tests) == 2
        elif name == "sinks":
            assert part.alpha.shape[0] == 2 and len(part.token_ids) == 2
        elif name == "duo":
            assert len(part.losses) == 2
        else:
            assert set(part.text.tolist()) == {0, 1}


@pytest.mark.filterwarnings("ignore:no NIAH test was answered")
def test_every_result_round_trips_through_the_store(scans, tmp_path):
    store = wb.ResultStore(tmp_path)
    results = [scan(m, **fields, progress=False) for _, m, scan, fields in scans]
    ret = results[0]
    ret_scores = torch.rand_like(ret.scores)
    results[0] = retrieval.RetrievalResult(ret_scores, ret.tests, ret.per_test_scores, ret.variant, ret.provenance)
    m = scans[0][1]
    results.append(retrieval.ablation_check(m, results[0], k=2, seeds=(0,), max_new_tokens=3, progress=False))
    for r in results:
        assert r.figure_kinds
        assert_round_trip(r, store)
    with pytest.raises(wb.WorkbenchError, match="holds a 'ablation' result, not 'calibration'"):
        sinks.CalibrationResult.load(store, "ablation")  # both are made of a "runs" table


def test_scan_configs_validate_before_the_model_runs(tiny):
    m = tiny("llama")
    for bad, match in [
        (dict(lengths=500), "lengths must be a list of integers"),
        (dict(lengths="500"), "lengths must be a list of integers"),
        (dict(depths=2.5), "depths \\(a count"),
        (dict(max_new_tokens=0), "max_new_tokens must be ≥ 2"),
        (dict(lengths=[9000]), "exceeds the model's 512 positions"),
    ]:
        with pytest.raises(wb.ProbeError, match=match):
            retrieval.scan(m, **bad, progress=False)
    with pytest.raises(wb.ProbeError, match="either a RetrievalConfig or its fields"):
        retrieval.scan(m, retrieval.RetrievalConfig(), lengths=[100])
    with pytest.raises(wb.ProbeError, match="cancel must be"):
        sinks.scan(m, texts=[TEXT], T=32, cancel="yes", progress=False)
    with pytest.raises(wb.ProbeError, match="has no MoE layers"):
        routing.scan(m)
