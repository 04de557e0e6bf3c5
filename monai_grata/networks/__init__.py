from .resunet import load_weights, resunet, save_half_precision

__all__ = ["load_weights", "resunet", "save_half_precision"]
