"""The Panel dashboard (``workbench serve`` / ``panel serve apps/dashboard.py``).

- :mod:`.state`: plain-Python controller — models, one lock per model, caps, computations;
- one module per tab (Panel ``Viewer`` classes with ``param``): :mod:`.prompt_lab`,
  :mod:`.retrieval_page`, :mod:`.sinks_page`, :mod:`.routing_page`, :mod:`.runs_page`;
- :mod:`.views`: the notebook widgets hosted through ``workbench.widgets.panel.to_panel``;
- :mod:`.app` builds the page, :func:`workbench.dashboard.serve.serve` serves it.

Panel is imported only by the page modules: ``workbench.dashboard.state`` works without it.
"""

from .state import Caps, HeadEdits, Workbench

__all__ = ["Caps", "HeadEdits", "Workbench"]
