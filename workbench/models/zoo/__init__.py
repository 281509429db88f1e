"""Small models trained by this project's own scripts, shipped with the package for offline work.

``workbench.load("tiny-moe")`` loads :data:`MODELS` ``["tiny-moe"]``: a 4-layer, 8-expert, top-2
Qwen3-MoE language model trained on CPU by ``python -m workbench.train.tiny_moe`` on the mixed
English / German / Python / arithmetic corpus under ``corpus/`` (its log: ``tiny-moe/train_log.txt``).
"""
from __future__ import annotations

from pathlib import Path

from ...base.errors import ModelLoadError

ZOO_DIR = Path(__file__).parent
MODELS: dict[str, str] = {"tiny-moe": "tiny-moe"}  # name -> directory under workbench/models/zoo/


def model_dir(name: str) -> Path:
    """The packaged directory of zoo model ``name`` (config, safetensors, tokenizer)."""
    if name not in MODELS:
        raise ModelLoadError(f"no zoo model named {name!r}; zoo models: {sorted(MODELS)}")
    path = ZOO_DIR / MODELS[name]
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"zoo model {name!r} is not built at {path}; train it with `python -m workbench.train.{name.replace('-', '_')}`"
        )
    return path
