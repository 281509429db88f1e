"""Independent references and checks shared by the tests: HF's own eager attention matrices, and the
round trip every Result must survive."""
import pandas as pd
import torch


def eager_attentions(m, ids, mask=None):
    """Per-layer probabilities ``[L, B, H, T, T]`` (float64) from HF's own eager attention, and the logits."""
    m.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = m.hf(input_ids=ids, attention_mask=mask, output_attentions=True)
    finally:
        m.hf.set_attn_implementation("workbench")
    return torch.stack([a.double() for a in out.attentions]), out.logits


def untied(prob: torch.Tensor, gap: float = 1e-9) -> torch.Tensor:
    """Slots of sorted top-k lists ``prob`` ``[..., k]`` whose value differs from both neighbours by more than
    ``gap``: where two paths must agree on the index (a tie may legitimately be broken either way)."""
    gaps = (prob[..., :-1] - prob[..., 1:]).abs() > gap
    ones = torch.ones_like(prob[..., :1], dtype=torch.bool)
    return torch.cat([ones, gaps], -1) & torch.cat([gaps, ones], -1)


def assert_round_trip(result, store, prefix=None):
    """``result`` saved to ``store`` loads back equal (every table, the summary, the provenance); its repr is
    one short line, its notebook display and every figure render. Returns the loaded result."""
    result.save(store, prefix)
    back = type(result).load(store, prefix)
    for name, frame in result.tables().items():
        pd.testing.assert_frame_equal(back.tables()[name].reset_index(drop=True), frame.reset_index(drop=True),
                                      check_dtype=False, obj=f"{type(result).__name__}.{name}")  # fmt: skip
    assert back.summary() == result.summary(), type(result).__name__
    if result.provenance is not None:
        assert back.provenance.definition == result.provenance.definition
        assert back.provenance.weights_hash == result.provenance.weights_hash
    assert len(repr(result)) < 300 and "<pre>" in result._repr_html_()
    for kind in result.figure_kinds:
        assert result.figure(kind) is not None, kind
    return back
