"""Provenance: what produced a result, attached to every result and stored with it."""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from typing import Any

import torch


DISTRIBUTION = "interp-workbench"  # the name on PyPI; the import name is workbench (PyPI's "workbench" is another project)


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    return {"workbench": _version(DISTRIBUTION)} | {
        p: _version(p) for p in ("transformers", "torch", "triton", "transformer-lens")
    } | {"python": platform.python_version()}


def weights_hash(model: torch.nn.Module) -> str:
    """BLAKE2b over every parameter and buffer (name, dtype, shape, bytes): identical weights, identical hash."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "blake2b:" + h.hexdigest()


def tokenizer_hash(tokenizer) -> str | None:
    """BLAKE2b over what decides token ids: the tokenizer's full definition (a fast tokenizer's JSON, which holds
    its added tokens, else its vocabulary), its added and special tokens and its chat template. A file dropped
    next to a model (``added_tokens.json``) that changes ids changes this hash. ``None`` without a tokenizer."""
    if tokenizer is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    else:
        h.update(type(tokenizer).__qualname__.encode())
    added = {int(i): str(t) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    h.update(json.dumps({"added": added, "special": getattr(tokenizer, "special_tokens_map", None),
                         "chat_template": getattr(tokenizer, "chat_template", None)}, sort_keys=True, default=str).encode())  # fmt: skip
    return "blake2b:" + h.hexdigest()


@dataclass(frozen=True)
class Provenance:
    """Where a result came from. ``token_ids``/``definition`` are filled per result via :meth:`with_run`."""

    model_source: str
    model_id: str | None
    revision: str | None
    weights_hash: str
    dtype: str
    device: str
    bos_policy: str
    versions: dict[str, str | None] = field(default_factory=library_versions)
    tokenizer_hash: str | None = None  # tokenizer_hash(): the token ids' definition
    token_ids: tuple[int, ...] | None = None
    definition: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def with_run(self, *, token_ids=None, definition: str | None = None, **extra: Any) -> "Provenance":
        """A copy naming the exact inputs and the definition variant of one result."""
        ids = tuple(int(i) for i in token_ids) if token_ids is not None else self.token_ids
        return replace(self, token_ids=ids, definition=definition or self.definition, extra={**self.extra, **extra})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
