"""``Model``: a ``transformers`` causal LM with its tokenizer, ModelSpec and provenance."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch

from ..base.errors import ProbeError
from ..base.provenance import Provenance, tokenizer_hash, weights_hash
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
            tokenizer_hash=tokenizer_hash(self.tokenizer),
        )

    # --- text helpers -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the token ids this model can take."""
        emb = self.hf.get_input_embeddings()
        return int(emb.num_embeddings if hasattr(emb, "num_embeddings") else emb.weight.shape[0])

    def encode(self, text: str | list[int] | torch.Tensor, *, chat: bool = False) -> torch.Tensor:
        """Token ids ``[1, T]`` on the model's device. ``chat=True`` applies the chat template as a user turn.
        Ids are checked against the vocabulary and text against Unicode (a lone surrogate cannot be encoded)."""
        if isinstance(text, torch.Tensor):
            if text.dtype.is_floating_point or text.dtype.is_complex or text.dtype == torch.bool:
                raise ProbeError(f"token ids must be an integer tensor, got {text.dtype}")
            if text.dim() not in (1, 2) or (text.dim() == 2 and text.shape[0] != 1):
                raise ProbeError(f"token ids must have shape [T] or [1, T], got {list(text.shape)}")
            ids = (text if text.dim() == 2 else text[None]).long()
        elif isinstance(text, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in text):
                bad = next(i for i in text if not isinstance(i, int) or isinstance(i, bool))
                raise ProbeError(f"token ids must be integers, got {bad!r} ({type(bad).__name__})"[:300])
            ids = torch.tensor([list(text)], dtype=torch.long) if text else torch.empty(1, 0, dtype=torch.long)
        else:
            if not isinstance(text, str):
                raise ProbeError(f"a prompt is text (str) or token ids (list of int / tensor), got {type(text).__name__}")
            if not text.strip():
                raise ProbeError("empty prompt: give some text (or token ids) to run")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ProbeError(f"the prompt is not valid Unicode: {text[e.start]!r} at position {e.start} is a lone "
                                 "surrogate (half of a character); remove it or decode the text properly") from None  # fmt: skip
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
        self._check_ids(ids)
        return ids.to(self.device)

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ProbeError(f"token id {bad} is outside the model's vocabulary (ids 0..{self.vocab_size - 1})")

    @torch.no_grad()
    def forward_text(self, text, *, chat: bool = False, **kwargs):
        """Run one forward pass on ``text`` (string or ids); returns the ``transformers`` output."""
        ids = self.encode(text, chat=chat)
        return self.hf(input_ids=ids, **kwargs)

    @torch.no_grad()
    def generate(self, text, *, max_new_tokens: int = 32, chat: bool = True, **kwargs) -> str:
        """Greedy generation (unless sampling kwargs say otherwise); returns only the new text. The prompt and
        the new tokens must fit the model's positions (checked before generating)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ProbeError(f"max_new_tokens must be a whole number ≥ 1, got {max_new_tokens!r}")
        ids = self.encode(text, chat=chat)
        limit = self.spec.max_positions
        if limit and ids.shape[-1] + max_new_tokens > limit:
            raise ProbeError(f"prompt ({ids.shape[-1]} tokens) + {max_new_tokens} new tokens exceeds the model's {limit} "
                             f"positions; ask for at most {max(limit - ids.shape[-1], 0)} new tokens or shorten the prompt")  # fmt: skip
        kwargs.setdefault("do_sample", False)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = getattr(self.tokenizer, "eos_token_id", None) if pad is None else pad  # id 0 is a real pad token
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


#: called with (model, source) after every load; the capture layer registers the attention backend's
#: install here (and interop a TransformerLens bridge's hooks), so loading never imports the layers above it
ON_LOAD: list[Callable[[Model, Any], None]] = []


def loaded(model: Model, source) -> None:
    """Run the :data:`ON_LOAD` callbacks for a freshly loaded model."""
    for fn in ON_LOAD:
        fn(model, source)
