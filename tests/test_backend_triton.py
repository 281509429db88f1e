"""The backend's Triton route (interpreter on CPU) against its chunked torch route, through real models."""
import os

import pytest
import torch

import workbench as wb

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and the Triton interpreter is not selected", allow_module_level=True)


def _capture(m, ids, mask, use_triton):
    m.hf._workbench_state.use_triton = use_triton
    probe = wb.AttentionStats(sink_keys=2, key_positions=[5], spans={"bos": (0, 1), "mid": (3, 8), "local": wb.Window(4)})
    try:
        with wb.capture(m, probe) as cap, torch.no_grad():
            logits = m.hf(input_ids=ids, attention_mask=mask).logits
    finally:
        m.hf._workbench_state.use_triton = None
    return cap, logits


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt_oss"])
def test_triton_route_equals_torch_route(tiny, arch):
    m = tiny(arch)
    ids = torch.randint(3, 250, (2, 21), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    a, la = _capture(m, ids, mask, use_triton=False)
    b, lb = _capture(m, ids, mask, use_triton=True)
    real = mask.bool()
    torch.testing.assert_close(la[real], lb[real], atol=1e-4, rtol=0)
    rows = real[None, :, None, :]
    for name in ("entropy", "lse", "top1_prob", "span.bos", "span.mid", "span.local", "hook_z_norm"):
        x, y = a.stack(f"attn.{name}"), b.stack(f"attn.{name}")
        sel = rows.expand_as(x)
        torch.testing.assert_close(x[sel], y[sel], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(a.stack("attn.alpha"), b.stack("attn.alpha"), atol=1e-5, rtol=0, equal_nan=True)


def test_edits_that_change_probabilities_fall_back_to_torch(tiny):
    m = tiny("llama")
    ids = torch.randint(3, 250, (1, 12))
    m.hf._workbench_state.use_triton = True
    try:
        with wb.intervene(m, wb.SinkCalibration([(0, 1)], sink_keys=[0])), torch.no_grad():
            tri = m.hf(ids).logits
    finally:
        m.hf._workbench_state.use_triton = None
    with wb.intervene(m, wb.SinkCalibration([(0, 1)], sink_keys=[0])), torch.no_grad():
        ref = m.hf(ids).logits
    torch.testing.assert_close(tri, ref, atol=1e-6, rtol=0)
