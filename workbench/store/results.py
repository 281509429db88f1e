"""Results store: one Parquet file per result in a directory, provenance in the file's metadata,
DuckDB for queries across them. Writes are atomic (temp file + rename) and get the umask's usual file
mode (0644 under umask 022), so a shared results directory stays readable by others."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pandas as pd

from ..base.errors import OutsideRootError, WorkbenchError
from ..base.files import atomic_path, confined_file

_META_KEY = b"workbench.provenance"


class ResultStore:
    """A directory of Parquet results. ``save(name, frame, provenance)``; ``load(name)``; ``sql(query)``
    where each result is a DuckDB view named after its file stem."""

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise WorkbenchError(f"result name {name!r} must be a plain file name")
        return self.root / f"{name}.parquet"

    def save(self, name: str, frame: pd.DataFrame, provenance=None) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(_plain(frame), preserve_index=False)
        prov = asdict(provenance) if is_dataclass(provenance) else (provenance or {})
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META_KEY: json.dumps(prov, default=str).encode()})
        target = self.path(name)
        with atomic_path(target) as tmp:  # the umask's mode; a symlink named like the result is replaced
            pq.write_table(table, tmp)
        return target

    def load(self, name: str) -> tuple[pd.DataFrame, dict]:
        """A stored frame and its provenance. A file that resolves outside the store (a symlink), or a folder named
        like a result, is refused."""
        import pyarrow.parquet as pq

        path = self.path(name)
        if not path.exists():
            raise WorkbenchError(f"no result {name!r} in {self.root}")
        import pyarrow as pa

        try:
            table = pq.read_table(confined_file(self.root, path))
            meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
            return table.to_pandas(), meta if isinstance(meta, dict) else {}
        except (OSError, pa.ArrowException, ValueError) as e:  # a truncated or foreign file: say which, no traceback
            raise WorkbenchError(f"result {name!r} in {self.root} is unreadable ({type(e).__name__}: {e})") from None

    def names(self) -> list[str]:
        """Stored results: the ``*.parquet`` files that resolve inside the store (a link out, or a folder named
        ``x.parquet``, is never listed)."""
        return sorted(p.stem for p in self.root.glob("*.parquet") if self.readable(p)) if self.root.is_dir() else []

    def readable(self, path: Path) -> bool:
        """``path`` is a regular file resolving inside the store (:func:`workbench.base.files.confined_file`)."""
        try:
            confined_file(self.root, path)
        except OutsideRootError:
            return False
        return True

    def sql(self, query: str) -> pd.DataFrame:
        """Run DuckDB SQL with one view per stored result (``SELECT * FROM retrieval_scores``; a name with
        odd characters is quoted as usual: ``SELECT * FROM "my result"``).

        File names never become SQL text: each file is opened as a pyarrow dataset (no glob expansion)
        and registered under its name through DuckDB's API, so a crafted name is only a view name. Only
        :meth:`names` are registered: a file linked out of the store is not read."""
        import duckdb
        import pyarrow.dataset as ds

        con = duckdb.connect()
        for n in self.names():
            con.register(n, ds.dataset(str(confined_file(self.root, self.path(n))), format="parquet"))
        return con.execute(query).df()


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """Parquet-friendly copy: tuples/lists of tuples become JSON strings."""
    out = frame.copy()
    for c in out.columns:
        if out[c].dtype == object and out[c].map(lambda v: isinstance(v, (tuple, list, dict))).any():
            out[c] = out[c].map(lambda v: json.dumps(v) if isinstance(v, (tuple, list, dict)) else v)
    return out
