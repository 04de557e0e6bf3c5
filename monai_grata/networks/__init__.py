from .authors_resunet import AuthorsResUNet
from .denoiser import (
    DenoisingDecoder,
    build_denoiser,
    default_denoiser_path,
    default_feature_layer,
    load_denoiser,
    save_denoiser,
    tap_features,
)
from .res_unet import DECODERS, checkpoint_decoder, load_weights, resunet, save_half_precision

__all__ = [
    "AuthorsResUNet",
    "DECODERS",
    "DenoisingDecoder",
    "build_denoiser",
    "checkpoint_decoder",
    "default_denoiser_path",
    "default_feature_layer",
    "load_denoiser",
    "load_weights",
    "resunet",
    "save_denoiser",
    "save_half_precision",
    "tap_features",
]
