"""Attention sinks: Gu's α_k and Sink_k^ε, hidden sinks, massive activations, calibration; bad input."""
import pytest
import torch

import workbench as wb
from handbuilt import SINK_HEAD, content_model
from workbench import sinks
from workbench.models.testing import byte_tokenizer

TEXT = "Sinks are a quiet habit of attention. " * 4


def handbuilt():
    # byte tokenizer: BOS is 257; a BOS feature of 500 is a planted massive activation at position 0
    return wb.load(content_model(vocab=260, bos_token=257, bos_scale=500.0, copy=False), tokenizer=byte_tokenizer(),
                   source_label="hand-built")  # fmt: skip


def test_known_sink_head_and_uniform_heads():
    m = handbuilt()
    r = sinks.scan(m, texts=[TEXT, TEXT[::-1]], T=64, progress=False)
    a = r.mean_alpha[0]  # [head, key]
    assert r.sink_heads(0) == [(0, SINK_HEAD)]
    assert r.sink_rate(0) == pytest.approx(25.0)  # one head of four
    # uniform heads: α_k = mean over i ≥ k of 1/(i + 1) (0-based), exactly
    T = 64
    expected = torch.tensor([sum(1 / (i + 1) for i in range(k, T)) / (T - k) for k in range(T)])
    torch.testing.assert_close(a[2], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(a[3], expected, atol=1e-5, rtol=0)
    assert r.hidden_sinks().empty  # no key after the first gets α > 0.1 in any head
    mv = r.massive_vs_sinks()
    assert mv["massive_entries"] == 2 and mv["on_sink_token"] == 1.0  # one layer, two texts, position 0
    row = r.massive.iloc[0]
    assert (row["layer"], row["position"], row["dim"]) == (0, 0, 126) and row["value"] > 100


def test_smollm2_sink_regression(smollm):
    r = sinks.scan(smollm, progress=False)
    assert r.T == 64 and len(r.token_ids) == 12
    assert abs(r.sink_rate(0) - 78.15) < 0.5  # pinned: fp32, CPU, the shipped essays
    assert (r.per_layer()["sink_share"][:2] == 0).all()  # layers 0–1 have no first-token sinks
    assert r.massive_vs_sinks()["on_sink_token"] == 1.0  # Sun et al.: massive activations sit on sinks
    assert 507 in set(r.massive["dim"])  # the dimension that carries the first-token massive activation
    assert {".", ","} <= set(r.hidden_sink_tokens()["token"].head(5))


def test_calibration_experiment_runs_and_reports(smollm):
    s = sinks.scan(smollm, progress=False)
    items = sinks.sentiment_task()[:6]
    res = sinks.calibration_experiment(smollm, s, heads=[(20, 0), (20, 1)], items=items, progress=False).runs
    assert len(res) == 2 and res["heads"].iloc[0] == [] and res["heads"].iloc[1] == [(20, 0), (20, 1)]
    assert res["loss"].iloc[0] != res["loss"].iloc[1]  # the calibration acts
    searched = sinks.calibration_experiment(smollm, s, items=items, search=True, max_candidates=2, progress=False).runs
    assert searched["accuracy"].is_monotonic_increasing or len(searched) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(texts=[]), "non-empty list"),
        (dict(texts=["", "x"]), "non-empty list"),
        (dict(texts=["too short"]), "needs at least T = 64"),
        (dict(eps=0.0), "ε must lie in \\(0, 1\\)"),
        (dict(eps=1.0), "ε must lie in \\(0, 1\\)"),
        (dict(eps=1.5), "ε must lie in \\(0, 1\\)"),
        (dict(T=1), "T must be ≥ 2"),
        (dict(T=100_000), "T = 100000 exceeds the model's 512 positions"),
        (dict(T="64"), "T must be an integer"),
        (dict(texts="one string"), "non-empty list"),
    ],
)
def test_bad_input(tiny, kwargs, match):
    with pytest.raises(wb.ProbeError, match=match):
        sinks.scan(tiny("llama"), **{"texts": [TEXT], **kwargs}, progress=False)


def test_calibration_bad_beta(smollm):
    with pytest.raises(wb.ProbeError, match="beta"):
        sinks.calibration_experiment(smollm, sinks.scan(smollm, progress=False), beta=0.0)


def test_calibration_keeps_the_first_token_sink(monkeypatch):
    """ACT calibrates the hidden sinks only (its released code drops the first sink index; docs/definitions.md):
    position 0 is never in the calibrated keys, and a prompt without a sink token runs unedited."""
    m = handbuilt()
    seen = []
    real = sinks.SinkCalibration
    def recording(heads, sink_keys, beta):
        seen.append(list(sink_keys))
        return real(heads, sink_keys=sink_keys, beta=beta)

    monkeypatch.setattr(sinks, "SinkCalibration", recording)
    items = [{"text": "Good. Fine.", "label": "positive"}, {"text": "bad", "label": "negative"}]
    sinks.task_accuracy(m, items, sink_tokens={"."}, heads=[(0, 0)])
    ids = m.encode(sinks._prompt(items[0]["text"]))[0].tolist()
    assert seen == [[i for i, t in enumerate(m.tokens(ids)) if i and t == "."]] and 0 not in seen[0]
    with pytest.raises(wb.ProbeError, match="'label'"):
        sinks.calibration_experiment(m, sinks.scan(m, texts=[TEXT], progress=False), items=[{"text": "x"}])
