"""The benchmark harness: test-time adaptation methods × source→target pairs × seeds, logged to MLflow."""

from .bundle import DEFAULT_BUNDLE, BundleSetup, bundle_setup
from .cells import Cell, MethodSpec, default_setup, load_target, parse_method, predict_stream, run_cell, target_items
from .store import BenchmarkStore, tracking_uri_of
from .table import summarise, write_chart, write_csv, write_markdown

__all__ = [
    "DEFAULT_BUNDLE",
    "BundleSetup",
    "bundle_setup",
    "default_setup",
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
