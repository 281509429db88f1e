"""Attention kernels and their definitions.

- ``semantics``: the definitions (visibility, spans, every edit, top-k tie-break), small torch functions;
- ``reference``: float64 ground truth from the full matrix, built on ``semantics``;
- ``attention_stats``: the Triton kernel (imported lazily: ``import workbench.kernels.reference`` never
  imports triton);
- ``capabilities``: which path supports which statistic / edit / input (the backend's routing table).
"""
from __future__ import annotations

__all__ = ["attention_stats_triton", "triton_available"]


def __getattr__(name: str):
    if name in __all__:
        from . import attention_stats

        return getattr(attention_stats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
