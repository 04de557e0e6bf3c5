from .bundle_runs import run_bundle_once, write_metrics
from .checkpoints import best_checkpoint, export_source_model, latest_checkpoint
from .run_config import export_run_config

__all__ = [
    "best_checkpoint",
    "export_run_config",
    "export_source_model",
    "latest_checkpoint",
    "run_bundle_once",
    "write_metrics",
]
