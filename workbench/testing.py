"""Helpers for tests and offline experiments: tiny random models of real architectures as ready
:class:`workbench.Model` objects (``tiny_model("olmoe")``), and the pieces they are built from
(:mod:`workbench.zoo.tiny`: configs, the random ``transformers`` model, a byte-level tokenizer)."""
from __future__ import annotations

import torch

from .loading import load
from .zoo.tiny import TINY_CONFIGS, byte_tokenizer, tiny_config, tiny_hf_model

__all__ = ["TINY_CONFIGS", "byte_tokenizer", "tiny_config", "tiny_hf_model", "tiny_model"]


def tiny_model(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random model of architecture ``name`` wrapped as a :class:`workbench.Model`.

    Its tokenizer is :func:`byte_tokenizer` (one token per UTF-8 byte) so text APIs work offline.
    """
    return load(tiny_hf_model(name, seed=seed, dtype=dtype), tokenizer=byte_tokenizer(), source_label=f"tiny:{name}")
