"""``Model``: a ``transformers`` causal LM with its tokenizer, ModelSpec and provenance."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from .errors import ProbeError
from .provenance import Provenance, weights_hash
from .spec import ModelSpec


@dataclass(eq=False)
class Model:
    """What :func:`workbench.load` returns. ``hf`` is the underlying ``transformers`` model."""

    hf: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    source: str
    model_id: str | None = None
    revision: str | None = None
    known_weights_hash: str | None = None
    extras: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @cached_property
    def provenance(self) -> Provenance:
        return Provenance(
            model_source=self.source,
            model_id=self.model_id,
            revision=self.revision,
            weights_hash=self.known_weights_hash or weights_hash(self.hf),
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            bos_policy=self.spec.bos.describe() if self.spec.bos else "unknown",
        )

    # --- text helpers -------------------------------------------------------------------------
    def encode(self, text: str | list[int] | torch.Tensor, *, chat: bool = False) -> torch.Tensor:
        """Token ids ``[1, T]`` on the model's device. ``chat=True`` applies the chat template as a user turn."""
        if isinstance(text, torch.Tensor):
            ids = text if text.dim() == 2 else text[None]
        elif isinstance(text, (list, tuple)):
            ids = torch.tensor([list(text)], dtype=torch.long)
        else:
            if not isinstance(text, str) or not text.strip():
                raise ProbeError("empty prompt: give some text (or token ids) to run")
            if chat and getattr(self.tokenizer, "chat_template", None):
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
                )["input_ids"]
            else:
                ids = torch.tensor([self.tokenizer.encode(text)], dtype=torch.long)
        if ids.numel() == 0:
            raise ProbeError("empty prompt: no tokens to run")
        if self.spec.max_positions and ids.shape[-1] > self.spec.max_positions:
            raise ProbeError(f"prompt has {ids.shape[-1]} tokens; the model supports at most {self.spec.max_positions}")
        return ids.to(self.device)

    @torch.no_grad()
    def forward_text(self, text, *, chat: bool = False, **kwargs):
        """Run one forward pass on ``text`` (string or ids); returns the ``transformers`` output."""
        ids = self.encode(text, chat=chat)
        return self.hf(input_ids=ids, **kwargs)

    @torch.no_grad()
    def generate(self, text, *, max_new_tokens: int = 32, chat: bool = True, **kwargs) -> str:
        """Greedy generation (unless sampling kwargs say otherwise); returns only the new text."""
        ids = self.encode(text, chat=chat)
        kwargs.setdefault("do_sample", False)
        pad = getattr(self.tokenizer, "pad_token_id", None) or getattr(self.tokenizer, "eos_token_id", None)
        out = self.hf.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, pad_token_id=pad, **kwargs
        )
        return self.tokenizer.decode(out[0, ids.shape[-1]:], skip_special_tokens=True)

    def tokens(self, ids) -> list[str]:
        """Readable token strings for ids (for labels in tables and plots)."""
        ids = [int(i) for i in (ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids)]
        return [self.tokenizer.decode([i]) for i in ids]

    def __repr__(self) -> str:
        return f"workbench.Model({self.source!r}, {self.spec.model_type}, {self.dtype}, {self.device})"
