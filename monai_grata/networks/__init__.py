from .authors_resunet import AuthorsResUNet
from .resunet import DECODERS, checkpoint_decoder, load_weights, resunet, save_half_precision

__all__ = ["AuthorsResUNet", "DECODERS", "checkpoint_decoder", "load_weights", "resunet", "save_half_precision"]
