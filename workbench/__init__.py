"""workbench: find which heads retrieve, which heads sink, which experts fire — and turn them off.

Flat public API (see the README)::

    import workbench as wb
    m = wb.load()                                  # embedded SmolLM2-135M-Instruct
    with wb.capture(m, wb.AttentionStats(sink_keys=4)) as cap:
        m.forward_text("...")
    cap["blocks.17.attn.top1"]                     # named hook points, TransformerLens-style
    with wb.intervene(m, wb.HeadAblation([(12, 3)], mode="zero")):
        m.generate("...")
"""
from __future__ import annotations

from importlib import metadata as _metadata

from .measure import duo, effects, niah, qrhead, representation, retrieval, sinks, spans, taxonomy
from .core import interop, names
from . import study
from .core.activations import Activations
from .attention import AttentionStats, HeadAblation, SinkCalibration, SpanMask, StreamingHeads, Window, head_output_means
from .core.capture import Capture, capture, intervene
from .core.hooks import Edit, Hook, Probe
from .base.errors import ModelLoadError, ProbeError, UnsupportedModelError, WorkbenchError
from .models.loading import load
from .models.model import Model
from .base.provenance import DISTRIBUTION as _DISTRIBUTION, Provenance
from .models.spec import ModelSpec
from .store.results import ResultStore

try:
    __version__ = _metadata.version(_DISTRIBUTION)
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"

__all__ = [
    "Activations", "Edit", "Hook", "Probe", "names",
    "AttentionStats", "Capture", "HeadAblation", "Model", "ModelLoadError", "ModelSpec", "ProbeError", "Provenance",
    "SinkCalibration", "SpanMask", "StreamingHeads", "UnsupportedModelError", "Window", "WorkbenchError",
    "ResultStore", "capture", "head_output_means", "intervene", "duo", "effects", "interop", "load", "niah", "qrhead", "representation",
    "retrieval", "sinks", "spans", "study", "taxonomy",
]  # fmt: skip

# --- routing (MoE) ---
from . import routing  # noqa: E402
from .routing import ExpertForce, ExpertMask, Routing, TopK  # noqa: E402

__all__ += ["ExpertForce", "ExpertMask", "Routing", "TopK", "routing"]


def __getattr__(name: str):
    # widgets pull in anywidget/ipywidgets: imported on first use of ``wb.widgets``, not with workbench
    if name == "widgets":
        import importlib

        return importlib.import_module(".views.widgets", __name__)  # `from . import` would call this again
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
