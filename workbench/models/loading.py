"""``workbench.load``: one entry point for every model source (the registry in :mod:`workbench.models.sources`)."""
from __future__ import annotations

from typing import Any

import torch

from . import sources
from ..base.errors import ModelLoadError
from .model import Model, loaded
from .spec import discover_spec

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


def load(
    source: Any = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    tokenizer: Any = None,
    source_label: str | None = None,
    device_map: str | dict | None = None,
) -> Model:
    """Load a model for probing.

    ``source`` may be ``None`` (the embedded SmolLM2-135M-Instruct), ``"tiny-moe"`` (the zoo's trained
    MoE, see :mod:`workbench.models.zoo`), ``"tiny:<arch>"`` (a tiny random model), a Hugging Face model id, a
    local model directory, a ``.gguf`` file, an already-constructed ``transformers`` model, a
    TransformerLens ``TransformerBridge`` (its hooks keep working: :mod:`workbench.interop`) or an nnsight
    ``LanguageModel`` (the same module, shared). ``dtype`` defaults to float32; ``device`` to CPU.
    ``device_map`` (hub ids and local directories; e.g. ``"auto"``, needs ``accelerate``) spreads a
    model too big for one GPU over several, layer by layer, as ``from_pretrained`` does; the reducing
    backend runs each layer where its weights live.
    """
    if device_map is not None and device is not None:
        raise ModelLoadError("give either device or device_map, not both")
    torch_dtype = _resolve_dtype(dtype)
    dev = _resolve_device(device, torch_dtype)
    kind = sources.resolve(source)
    if device_map is not None and not kind.device_map:
        raise ModelLoadError(f"device_map applies to hub ids and local model directories, not to {source!r}")
    got = kind.load(source, torch_dtype, device_map)
    hf = got.hf
    if kind.name in ("nnsight", "module") and dtype is not None:
        hf = hf.to(torch_dtype)
    tok = tokenizer if tokenizer is not None else got.tokenizer
    fields = dict(got.fields)
    if source_label:
        fields["source"] = source_label
    hf = (hf if got.device_mapped else hf.to(dev)).eval()
    model = Model(hf=hf, tokenizer=tok, spec=discover_spec(hf, tok), **fields)
    loaded(model, source)  # the capture layer installs its backend (and a bridge's hooks) here
    return model


def load_config(source: str | None = None):
    """The ``transformers`` config of a model source, without loading (or downloading) weights: enough to
    check layer/head/expert indices before a long job starts. Same sources as :func:`load` (except
    modules and ``.gguf`` files, whose shapes are only known once read)."""
    kind = sources.resolve(source)
    if kind.config is None:
        raise ModelLoadError(f"{type(source).__name__} sources have no config before they are loaded; load the model instead")
    return kind.config(source)


def _resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ModelLoadError(f"dtype {dtype!r} is not supported; use one of float32, float16, bfloat16")


def _resolve_device(device, dtype: torch.dtype) -> torch.device:
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"device {device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {dev} requested but CUDA is not available on this machine; use device='cpu'")
    try:  # the ops a transformer needs, in this dtype, on this device
        x = torch.ones(2, 4, dtype=dtype, device=dev)
        torch.softmax(x @ x.T, dim=-1).sum().item()
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"dtype {dtype} cannot run on device {dev}: {e}") from e
    return dev
