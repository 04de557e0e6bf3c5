from .bundle_runs import run_bundle_once, write_metrics
from .checkpoints import best_checkpoint, export_source_model, latest_checkpoint, prune_checkpoints
from .console import quiet_console
from .files import atomic_write, make_output_dir
from .per_image import channels_of_rows, finite_mean, mean_dice_of_rows, read_per_image_csv
from .run_config import export_run_config

__all__ = [
    "atomic_write",
    "best_checkpoint",
    "channels_of_rows",
    "export_run_config",
    "export_source_model",
    "finite_mean",
    "latest_checkpoint",
    "make_output_dir",
    "mean_dice_of_rows",
    "prune_checkpoints",
    "quiet_console",
    "read_per_image_csv",
    "run_bundle_once",
    "write_metrics",
]
