"""Per-head summaries of a capture: one ``[layer, head]`` grid per statistic, named by the capture names
they come from (the same vocabulary in notebooks, the dashboard and stored results)."""
from __future__ import annotations

import torch

from ..base.errors import ProbeError

#: row statistics averaged over a capture's real rows into one value per head
ROW_MEANS = ("attn.entropy", "attn.top1_prob", "attn.hook_z_norm")


def summary(cap, *, max_keys: int = 4) -> dict[str, torch.Tensor]:
    """``{name: [layer, head]}``: Gu's α of the first tracked keys (``attn.alpha[k]``) and the mean over real
    rows (padding left out) of :data:`ROW_MEANS`; NaN in layers the capture did not record."""
    from .sinks import alpha

    out: dict[str, torch.Tensor] = {}
    names = {n.split(".", 2)[2] for n in cap.names() if n.startswith("blocks.")}
    if "attn.alpha" in names:
        a = alpha(cap)
        out.update({f"attn.alpha[{k}]": a[..., k] for k in range(min(max_keys, a.shape[-1]))})
    real = cap.real[None, :, None, :]  # [1, B, 1, R]
    for s in ROW_MEANS:
        if s in names:
            v = cap.stack(s).double()  # [L, B, H, R]
            w = real.expand_as(v).double()
            out[s] = ((v.nan_to_num(0) * w).sum((1, 3)) / w.sum((1, 3))).float()
            out[s][torch.isnan(v).all(3).all(1)] = torch.nan
    if not out:
        raise ProbeError("this capture holds no attention statistics: capture with workbench.AttentionStats()")
    return out
