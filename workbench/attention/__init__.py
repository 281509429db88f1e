"""The reducing attention backend: per-head statistics and interventions without the N×N matrix."""
from __future__ import annotations

from ..models.model import ON_LOAD
from .backend import NAME, install, register, workbench_attention
from .chunked import chunked_attention
from .edits import HeadAblation, SinkCalibration, SpanMask, StreamingHeads, head_output_means
from .stats import AttentionStats, Window

register()  # "workbench" is a valid attn_implementation as soon as workbench is imported (nnsight, from_pretrained)


def _on_load(model, source) -> None:
    install(model)


ON_LOAD.append(_on_load)  # every workbench.load sends attention through the backend

__all__ = [
    "NAME", "AttentionStats", "HeadAblation", "SinkCalibration", "SpanMask", "StreamingHeads", "Window",
    "chunked_attention", "head_output_means", "install", "register", "workbench_attention",
]  # fmt: skip
