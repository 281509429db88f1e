"""A lazy attention mask: ``transformers`` hands us the mask *recipe*; we evaluate it a row block at a time.

Registered in ``AttentionMaskInterface`` under the backend's name, so the model never builds an N×N
mask for us. SDPA delegation materialises it once per forward (memoised), exactly as ``sdpa`` would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers.masking_utils import (
    and_masks,
    causal_mask_function,
    padding_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)


@dataclass(eq=False)
class LazyMask:
    """The arguments of ``sdpa_mask``, kept unevaluated."""

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    mask_function: Callable
    attention_mask: torch.Tensor | None
    device: Any
    kwargs: dict = field(default_factory=dict)
    _dense: Any = field(default=None, repr=False)
    _dense_done: bool = field(default=False, repr=False)

    def dense(self) -> torch.Tensor | None:
        """What ``sdpa_mask`` would have returned (None when ``is_causal`` suffices)."""
        if not self._dense_done:
            self._dense = sdpa_mask(
                batch_size=self.batch_size, q_length=self.q_length, kv_length=self.kv_length,
                q_offset=self.q_offset, kv_offset=self.kv_offset, mask_function=self.mask_function,
                attention_mask=self.attention_mask, device=self.device, **self.kwargs,
            )  # fmt: skip
            self._dense_done = True
        return self._dense

    @property
    def padding(self) -> torch.Tensor | None:
        """``[B, kv_length]`` key padding (True = real token), or None."""
        pad = prepare_padding_mask(self.attention_mask, self.kv_length, self.kv_offset)
        return None if pad is None else pad[:, self.kv_offset : self.kv_offset + self.kv_length].bool()

    def rows(self, i0: int, i1: int) -> torch.Tensor:
        """Visibility of query rows ``i0:i1`` as bool ``[B, 1, i1-i0, kv_length]``."""
        if self.kwargs.get("use_vmap"):
            full = self.dense()
            return full[:, :, i0:i1].bool()
        fn = self.mask_function
        pad = prepare_padding_mask(self.attention_mask, self.kv_length, self.kv_offset)
        if pad is not None:
            fn = and_masks(fn, padding_mask_function(pad))
        dev = self.device
        b = torch.arange(self.batch_size, device=dev)[:, None, None, None]
        h = torch.zeros(1, device=dev, dtype=torch.long)[None, :, None, None]
        q = (torch.arange(i0, i1, device=dev) + self.q_offset)[None, None, :, None]
        kv = (torch.arange(self.kv_length, device=dev) + self.kv_offset)[None, None, None, :]
        return fn(b, h, q, kv).expand(self.batch_size, 1, i1 - i0, self.kv_length)

    def structured(self, sliding_window: int | None) -> bool:
        """True when visibility is exactly causal (+ this sliding window) + key padding: what the kernel handles."""
        if not self.kwargs.get("allow_is_causal_skip", True) or self.kwargs.get("use_vmap"):
            return False
        local = self.kwargs.get("local_size")
        if local is None:
            return self.mask_function is causal_mask_function and not sliding_window
        return sliding_window is not None and local == sliding_window


def lazy_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
              attention_mask=None, device="cpu", **kwargs) -> LazyMask:  # fmt: skip
    """``AttentionMaskInterface`` entry: same signature as ``sdpa_mask``, returns a :class:`LazyMask`."""
    return LazyMask(batch_size, q_length, kv_length, int(q_offset), int(kv_offset), mask_function, attention_mask, device, kwargs)


def visibility_from_tensor(mask: torch.Tensor | None, q_len: int, kv_len: int, causal: bool, device) -> Callable:
    """Row-block visibility for a mask someone else built (bool/additive 4D tensor, or None = causal/full)."""

    def rows(i0: int, i1: int) -> torch.Tensor:
        if mask is None:
            q = torch.arange(i0, i1, device=device)[:, None] + (kv_len - q_len)
            vis = torch.arange(kv_len, device=device)[None, :] <= q if causal else torch.ones(i1 - i0, kv_len, dtype=torch.bool, device=device)
            return vis[None, None]
        m = mask[:, :, i0:i1, :kv_len]
        return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2

    return rows
