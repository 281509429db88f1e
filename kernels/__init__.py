"""Attention kernels. ``reference`` (float64 ground truth) and ``attention_stats`` (Triton).

The Triton entry points are imported lazily so that ``import workbench.kernels.reference`` never imports triton.
"""
from __future__ import annotations

__all__ = ["attention_stats_triton", "triton_available"]


def __getattr__(name: str):
    if name in __all__:
        from . import attention_stats

        return getattr(attention_stats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
