"""One protocol for every result a scan returns (retrieval, sinks, DuoAttention, routing, ablations, ...).

A :class:`Result` holds numbers and the provenance of the run that made them, and offers the same
handles everywhere — the CLI prints :meth:`summary`, reports and dashboards draw :meth:`figures`, stores
keep :meth:`tables`:

- ``heads()`` (or ``experts()``): one row per head (expert) with its scores, the table people sort;
- ``to_frame()``: the main table; ``tables()``: every table the result is made of;
- ``save(store)`` / ``Result.load(store)``: Parquet files with the provenance in their metadata; a loaded
  result equals the saved one;
- ``figures()``: name → zero-argument plotly builder (the first is the default picture);
- ``summary()``: the text the CLI prints; ``repr()``: one line; ``_repr_html_``: the summary and the top rows.
"""
from __future__ import annotations

import html
from dataclasses import fields
from typing import TYPE_CHECKING, Callable, ClassVar

import pandas as pd

from ..base.display import Figures
from ..base.errors import WorkbenchError
from ..base.provenance import Provenance

if TYPE_CHECKING:
    import torch


class Result(Figures):
    """Base of every scan result. Subclasses are dataclasses with a ``provenance`` field and implement
    :meth:`tables`, :meth:`from_tables`, :meth:`figures` and :meth:`summary`."""

    kind: ClassVar[str] = "result"
    provenance: Provenance | None

    # --- what a result is made of ------------------------------------------------------------------
    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table this result is made of (name → frame); the first is :meth:`to_frame`."""
        raise NotImplementedError

    @classmethod
    def from_tables(cls, tables: dict[str, pd.DataFrame], provenance: Provenance | None):
        """Rebuild the result from :meth:`tables` (what :meth:`load` reads back)."""
        raise NotImplementedError

    def figures(self) -> dict[str, Callable]:
        raise NotImplementedError

    #: what the columns of :meth:`grids` index: ``head`` (query heads) or ``kv_head``
    grid_unit: ClassVar[str] = "head"

    def grids(self) -> dict[str, "torch.Tensor"]:
        """Per-head values, name → ``[layer, head]`` (views such as HeadGrid draw these)."""
        raise NotImplementedError

    def heads(self) -> pd.DataFrame:
        """One row per head with every grid as a column, sorted by the first grid (best first)."""
        import torch

        grids = self.grids()
        first, *rest = grids
        df = head_table(grids[first], first, unit=self.grid_unit)
        for name in rest:
            v = grids[name]
            df[name] = v[torch.tensor(df["layer"].to_numpy()), torch.tensor(df[self.grid_unit].to_numpy())].float().numpy()
        return df

    def summary(self) -> str:
        raise NotImplementedError

    def to_frame(self) -> pd.DataFrame:
        """The main table."""
        return next(iter(self.tables().values()))

    def _figures(self) -> dict:  # the Figures mixin's hook
        return self.figures()

    # --- storage ---------------------------------------------------------------------------------------
    def save(self, store, prefix: str | None = None) -> list:
        """Write every table to ``store`` (a :class:`~workbench.ResultStore`) as ``{prefix}_{table}``."""
        prefix = prefix or self.kind
        prov = self.provenance.to_dict() if self.provenance is not None else {}
        return [store.save(f"{prefix}_{name}", frame, {**prov, "result": {"kind": self.kind, "table": name}})
                for name, frame in self.tables().items()]  # fmt: skip

    @classmethod
    def load(cls, store, prefix: str | None = None):
        """Read a result written by :meth:`save` back from ``store``."""
        prefix = prefix or cls.kind
        tables, prov = {}, None
        for name in cls._table_names():
            frame, meta = store.load(f"{prefix}_{name}")
            kind = (meta.get("result") or {}).get("kind")
            if kind not in (None, cls.kind):
                raise WorkbenchError(f"{prefix}_{name} holds a {kind!r} result, not {cls.kind!r}")
            tables[name] = frame
            prov = prov or meta
        return cls.from_tables(tables, _provenance(prov))

    @classmethod
    def _table_names(cls) -> tuple[str, ...]:
        return cls.table_names

    table_names: ClassVar[tuple[str, ...]] = ()

    # --- display ---------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        first = self.summary().splitlines()[0] if self.summary() else ""
        return f"<{type(self).__name__}: {first}>"

    def _repr_html_(self) -> str:
        rows = self.heads() if hasattr(self, "heads") else self.to_frame()
        table = rows.head(10).to_html(index=False, float_format=lambda x: f"{x:.3f}", classes="wb-table", border=0)
        return (f"<div class='workbench-result'><pre>{html.escape(self.summary())}</pre>{table}"
                f"<small>{html.escape(type(self).__name__)}: .figure(kind) for {', '.join(self.figure_kinds)}; "
                ".to_frame(), .save(store)</small></div>")  # fmt: skip

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        bundle = super()._repr_mimebundle_(include, exclude)
        bundle["text/html"] = self._repr_html_()
        bundle["text/plain"] = repr(self)
        return bundle


def _provenance(meta: dict | None) -> Provenance | None:
    """A :class:`Provenance` from the dict a store keeps (unknown keys go to ``extra``)."""
    if not meta:
        return None
    meta = {k: v for k, v in meta.items() if k != "result"}
    names = {f.name for f in fields(Provenance)}
    known = {k: v for k, v in meta.items() if k in names}
    if known.get("token_ids") is not None:
        known["token_ids"] = tuple(known["token_ids"])
    extra = {**(known.pop("extra", None) or {}), **{k: v for k, v in meta.items() if k not in names}}
    try:
        return Provenance(**known, extra=extra)
    except TypeError as e:
        raise WorkbenchError(f"stored provenance is incomplete ({e})") from None


def head_table(values, name: str, *, unit: str = "head") -> pd.DataFrame:
    """``[layer, head]`` values as a table (layer, head, ``name``), best first, NaN last."""
    v = values.detach().float().cpu()
    L, H = v.shape
    df = pd.DataFrame({"layer": [l for l in range(L) for _ in range(H)], unit: list(range(H)) * L, name: v.flatten().tolist()})
    return df.sort_values(name, ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def top_cells(values, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` largest cells of a ``[layer, head]`` grid as (layer, head, value); NaN ranks last."""
    import torch

    flat = torch.nan_to_num(values.detach().float().cpu(), nan=-float("inf")).flatten()
    idx = flat.topk(min(k, flat.numel())).indices
    H = values.shape[1]
    return [(int(i) // H, int(i) % H, float(values.flatten()[i])) for i in idx]
