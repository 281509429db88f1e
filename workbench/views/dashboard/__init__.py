"""The Panel dashboard (``workbench serve`` / ``panel serve apps/dashboard.py``).

- :mod:`.pool`: the models a server serves, loaded once, one lock per model;
- :mod:`.validation`: caps and the checks of every request, on the library's validators
  (``ModelSpec.heads``, ``ExpertMask.bind``, ``RetrievalConfig`` / ``SinkConfig`` / ``TaxonomyConfig`` / ``RoutingConfig``);
- :mod:`.runs`: the runs browser (study runs inside one directory; comparisons of like metrics only);
- :mod:`.state`: the computations the pages ask for (plain Python: the :class:`Workbench` all sessions share);
- one module per tab (Panel ``Viewer`` classes with ``param``): :mod:`.prompt_lab`,
  :mod:`.retrieval_page`, :mod:`.sinks_page`, :mod:`.heads_page`, :mod:`.routing_page`, :mod:`.runs_page`; :mod:`.common` (background
  work off the event loop, notices, tables);
- :mod:`.views`: the notebook widgets hosted through ``workbench.views.widgets.panel.to_panel``;
- :mod:`.app` builds the page, :func:`workbench.views.dashboard.serve.serve` serves it.

Panel is imported only by the page modules: ``pool``, ``validation``, ``runs`` and ``state`` work without it.
"""

from .state import Caps, HeadEdits, Workbench

__all__ = ["Caps", "HeadEdits", "Workbench"]
