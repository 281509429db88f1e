"""Helpers for tests and offline experiments: tiny random models of real architectures as ready
:class:`workbench.Model` objects (``tiny_model("olmoe")``), and the pieces they are built from
(:mod:`workbench.models.zoo.tiny`: configs, the random ``transformers`` model, a byte-level tokenizer)."""
from __future__ import annotations

import torch

from .loading import load
from .zoo.tiny import TINY_CONFIGS, byte_tokenizer, tiny_config, tiny_hf_model

__all__ = ["TINY_CONFIGS", "byte_tokenizer", "tiny_bridge", "tiny_config", "tiny_hf_model", "tiny_model"]


def tiny_model(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random model of architecture ``name`` wrapped as a :class:`workbench.Model`.

    Its tokenizer is :func:`byte_tokenizer` (one token per UTF-8 byte) so text APIs work offline.
    """
    return load(tiny_hf_model(name, seed=seed, dtype=dtype), tokenizer=byte_tokenizer(), source_label=f"tiny:{name}")


def tiny_bridge(name: str, *, seed: int = 0):
    """``(bridge, hf)``: a TransformerLens 4.x ``TransformerBridge`` over the tiny random model ``name`` (the
    byte tokenizer), as a TransformerLens user would hand it to :func:`workbench.load`. Needs transformer-lens."""
    import tempfile

    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    hf = tiny_hf_model(name, seed=seed)
    with tempfile.TemporaryDirectory() as d:
        byte_tokenizer().save_pretrained(d)
        hf.config.save_pretrained(d)
        return TransformerBridge.boot_transformers(d, hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(d)), hf
