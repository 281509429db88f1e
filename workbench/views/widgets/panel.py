"""Host a workbench widget in Panel: the same ESM in a ``panel.custom.AnyWidgetComponent`` whose
params mirror the widget's synced traits both ways, so every behaviour stays in the widget's Python.

    pn.Column(to_panel(grid), to_panel(grid.attention)).servable()

Browser → component param → widget trait (only the widget's ``_inputs``; validated and capped; the
widget's observers run) → every trait the widget changed in reaction → component params → browser.
A value the page sends for any other trait is refused and the widget's own value restored."""
from __future__ import annotations

from functools import lru_cache

import anywidget
import param
import traitlets
from panel.custom import AnyWidgetComponent

from ...base.errors import WorkbenchError

_PARAMS = [  # traitlets type -> param type, most specific first
    (traitlets.Bool, param.Boolean),
    (traitlets.Int, param.Integer),
    (traitlets.Float, param.Number),
    (traitlets.Unicode, param.String),
    (traitlets.List, param.List),
    (traitlets.Dict, param.Dict),
]


def mirrored_traits(widget_cls) -> tuple[str, ...]:
    """The synced traits a widget class adds to anywidget's own (those are the view's state)."""
    own = set(anywidget.AnyWidget.class_trait_names(sync=True))
    return tuple(sorted(n for n in widget_cls.class_trait_names(sync=True) if n not in own and not n.startswith("_")))


@lru_cache(maxsize=None)
def component_class(widget_cls) -> type[AnyWidgetComponent]:
    """An AnyWidgetComponent subclass with ``widget_cls``'s ESM and one param per mirrored trait."""
    names = mirrored_traits(widget_cls)
    clash = sorted(set(names) & set(AnyWidgetComponent.param))
    if clash:
        raise WorkbenchError(f"{widget_cls.__name__}: traits {clash} clash with Panel's own parameters; rename them")
    params = {}
    for name in names:
        trait = widget_cls.class_traits()[name]
        kind = next((p for t, p in _PARAMS if isinstance(trait, t)), param.Parameter)
        default = trait.default()  # the trait's default, made fresh (List/Dict defaults are factories)
        params[name] = kind(default=default, allow_None=True)
    return type(f"{widget_cls.__name__}Panel", (AnyWidgetComponent,), {"_esm": widget_cls._esm, **params})


def widget_class(widget) -> type:
    """The class that declares the widget's ESM (anywidget gives each instance a subclass of its own)."""
    for cls in type(widget).__mro__:
        if isinstance(cls.__dict__.get("_esm"), str):
            return cls
    raise WorkbenchError(f"{type(widget).__name__} is not a workbench widget (no ESM source); see workbench.views.widgets")


def to_panel(widget) -> AnyWidgetComponent:
    """A Panel component showing ``widget`` with its traits and the component's params kept equal."""
    cls = widget_class(widget)
    names = mirrored_traits(cls)
    comp = component_class(cls)(**{n: getattr(widget, n) for n in names})
    echo: set[str] = set()  # params being written from the widget: not sent back to it

    def to_widget(*events):
        for ev in events:
            if ev.name in echo:
                continue
            try:  # an output trait, or an input over its size limit: refused before anything looks inside it
                widget.check_from_page(ev.name, ev.new)
            except WorkbenchError as e:
                widget.error = str(e)
                to_component({"name": ev.name, "new": getattr(widget, ev.name)})
                continue
            try:
                setattr(widget, ev.name, ev.new)
            except (WorkbenchError, traitlets.TraitError) as e:  # a bad value from the page: say so, restore ours
                widget.error = str(e)
                to_component({"name": ev.name, "new": getattr(widget, ev.name)})

    def to_component(change):
        echo.add(change["name"])
        try:
            comp.param.update({change["name"]: change["new"]})
        finally:
            echo.discard(change["name"])

    comp.param.watch(to_widget, list(names))
    widget.observe(to_component, names=list(names))
    comp.widget = widget  # keeps the widget (and its model) alive as long as the component
    return comp
