"""The benchmark harness: test-time adaptation methods × source→target pairs × seeds, logged to MLflow."""

from .cells import Cell, MethodSpec, load_target, parse_method, predict_stream, run_cell, target_items
from .store import BenchmarkStore, tracking_uri_of
from .table import summarise, write_chart, write_csv, write_markdown

__all__ = [
    "BenchmarkStore",
    "Cell",
    "MethodSpec",
    "load_target",
    "parse_method",
    "predict_stream",
    "run_cell",
    "summarise",
    "target_items",
    "tracking_uri_of",
    "write_chart",
    "write_csv",
    "write_markdown",
]
