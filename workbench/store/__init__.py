"""The store layer: results kept as Parquet files queried with DuckDB."""
from .results import ResultStore

__all__ = ["ResultStore"]
