"""The reducing attention backend: per-head statistics and interventions without the N×N matrix."""
from __future__ import annotations

from .backend import NAME, BackendState, register, workbench_attention
from .backend import install as _install
from .chunked import chunked_attention
from .edits import HeadAblation, SinkCalibration, SpanMask, StreamingHeads
from .stats import AttentionRecord, AttentionStats, Window


def install(hf_model, attention_paths=None) -> BackendState:
    """Route a ``transformers`` model's attention through the workbench backend."""
    if attention_paths is None:
        from ..spec import discover_spec

        attention_paths = discover_spec(hf_model).attention_paths
    return _install(hf_model, attention_paths)


__all__ = [
    "NAME", "AttentionRecord", "AttentionStats", "BackendState", "HeadAblation", "SinkCalibration", "SpanMask",
    "StreamingHeads", "Window", "chunked_attention", "install", "register", "workbench_attention",
]  # fmt: skip
