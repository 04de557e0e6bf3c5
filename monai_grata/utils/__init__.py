from .checkpoints import best_checkpoint, export_source_model, latest_checkpoint

__all__ = ["best_checkpoint", "export_source_model", "latest_checkpoint"]
