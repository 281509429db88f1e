"""The load layer: model sources, the embedded model, architectures as data, ``ModelSpec``, ``Model``,
``load()`` and the shipped zoo. Nothing here imports the hook core, the measurements or the views.

The folder is ``models``, not ``load``: ``wb.load`` is the loading function, and a subpackage of that name
would be shadowed by it (``workbench.load.loading`` would read an attribute of the function)."""
