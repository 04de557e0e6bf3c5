"""DeTTA's denoising decoder: a second decoder on a segmentation network's encoder features (the Y-shaped network of
Wen et al., "From Denoising Training to Test-Time Adaptation", WACV 2024), built from MONAI's U-Net decoder."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv
from monai.networks.nets.flexible_unet import UNetDecoder
from torch import nn

from monai_grata.data.checks import BadInputError, MissingInputError

__all__ = [
    "DenoisingDecoder",
    "build_denoiser",
    "default_denoiser_path",
    "default_feature_layer",
    "load_denoiser",
    "save_denoiser",
    "tap_features",
]

#: the encoder modules of monai_grata's networks: FlexibleUNet's ``encoder``, the authors' ResUnet's ``res``
ENCODER_NAMES = ("encoder", "res")
_NORM = ("batch", {"eps": 1e-3, "momentum": 0.1})


class DenoisingDecoder(nn.Module):
    """Reconstructs an image from the feature maps of a segmentation network's encoder (output in [0, 1], sigmoid).

    With several feature maps (a U-Net encoder's, shallow to deep, such as the five of a ResNet encoder) it is
    MONAI's ``UNetDecoder`` — the decoder of ``FlexibleUNet``, so for :func:`~monai_grata.networks.resunet` a mirror of
    the segmentation decoder, as DeTTA's Y-net has — followed by a 3×3 convolution to the image's channels; with one
    full-resolution feature map, a 3×3 convolution block and the same head.

    Args:
        feature_channels: channels of each feature map it reads, shallow to deep.
        out_channels: channels of the reconstructed image.
        spatial_dims: 2 or 3.
        decoder_channels: channels of the decoder blocks (the first ``len(feature_channels)`` are used; with one
            feature map, the last).
        layer: the layer of the source network whose output (``tap="output"``) or input (``tap="input"``) it reads,
            kept with the weights so that the pairing travels with the file.
        tap: ``"output"`` or ``"input"`` of ``layer``.
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        out_channels: int = 3,
        spatial_dims: int = 2,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        layer: str = "encoder",
        tap: str = "output",
    ) -> None:
        super().__init__()
        if tap not in ("output", "input"):
            raise ValueError(f"tap must be 'output' or 'input', got {tap!r}")
        n = len(feature_channels)
        if n > 1 and len(decoder_channels) < n:
            raise ValueError(f"{n} feature maps need {n} decoder channels, got {list(decoder_channels)}")
        self.config = {
            "feature_channels": [int(c) for c in feature_channels],
            "out_channels": int(out_channels),
            "spatial_dims": int(spatial_dims),
            "decoder_channels": [int(c) for c in decoder_channels],
            "layer": layer,
            "tap": tap,
        }
        self.layer, self.tap = layer, tap
        if n > 1:
            channels = list(decoder_channels[:n])
            self.decoder = UNetDecoder(
                spatial_dims=spatial_dims,
                encoder_channels=(out_channels, *feature_channels),
                decoder_channels=channels,
                act=("relu", {"inplace": True}),
                norm=_NORM,
                dropout=0.0,
                bias=False,
                upsample="nontrainable",
                pre_conv="default",
                interp_mode="nearest",
                align_corners=None,
                is_pad=True,
            )
        else:
            channels = [decoder_channels[-1]]
            self.decoder = Convolution(spatial_dims, feature_channels[0], channels[-1], act="relu", norm=_NORM)
        self.head = Conv[Conv.CONV, spatial_dims](channels[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(self.decoder, UNetDecoder):
            x = self.decoder(list(features), len(features) - 1)
        else:
            x = self.decoder(features[0])
        return torch.sigmoid(self.head(x))


def default_feature_layer(model: nn.Module) -> tuple[str, str]:
    """Where a denoiser reads ``model``: the output of its encoder (a child named ``encoder`` or ``res``: the five
    feature maps of MONAI's FlexibleUNet or of the authors' ResUnet), else the input of its last convolution (a
    segmentation network's per-pixel features before the head).

    Returns:
        (layer name, ``"output"`` or ``"input"``).

    Raises:
        ValueError: a model without either.
    """
    children = dict(model.named_children())
    for name in ENCODER_NAMES:
        if name in children:
            return name, "output"
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no encoder and no convolution: name the denoiser's layer")
    return convs[-1], "input"


class _Captured(Exception):
    """Ends a forward once the features are taken (the rest of the network is not needed)."""


def tap_features(model: nn.Module, x: torch.Tensor, layer: str, tap: str = "output") -> list[torch.Tensor]:
    """The feature maps the output (or input) of ``model``'s ``layer`` holds when ``model`` runs on ``x``.

    The forward stops at that layer, so nothing after it is computed; gradients flow to everything before it.

    Returns:
        The feature maps as a list (one element when the layer gives a single tensor).

    Raises:
        ValueError: an unknown layer, or one the forward does not reach.
    """
    try:
        module = model.get_submodule(layer)
    except AttributeError as err:
        raise ValueError(f"{type(model).__name__} has no layer {layer!r}") from err
    taken: list = []

    def keep(value) -> None:
        taken.append(value)
        raise _Captured

    if tap == "output":
        handle = module.register_forward_hook(lambda m, args, out: keep(out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]))
    try:
        model(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not taken:
        raise ValueError(f"the forward of {type(model).__name__} does not run layer {layer!r}")
    features = taken[0]
    return list(features) if isinstance(features, (list, tuple)) else [features]


def build_denoiser(
    model: nn.Module,
    layer: str | None = None,
    tap: str = "output",
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    seed: int = 0,
    image_size: int = 64,
) -> DenoisingDecoder:
    """An untrained :class:`DenoisingDecoder` for ``model``, its feature channels read from one forward of noise.

    Args:
        model: the source network (unchanged: the probe runs in eval mode without gradients).
        layer: the layer to read (default: :func:`default_feature_layer`).
        tap: ``"output"`` or ``"input"`` of ``layer`` (ignored with the default layer).
        decoder_channels: as :class:`DenoisingDecoder` takes them.
        seed: seed of the initial weights (the global random state is left as it was).
        image_size: side of the probe input (a multiple of 32 for U-Nets).
    """
    if layer is None:
        layer, tap = default_feature_layer(model)
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None:
        raise ValueError(f"{type(model).__name__} has no convolution: cannot tell its input channels")
    in_channels, spatial_dims = first.in_channels, len(first.kernel_size)
    device = next(model.parameters()).device
    probe = torch.rand((2, in_channels) + (image_size,) * spatial_dims, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    try:
        with torch.no_grad():
            features = tap_features(model.eval(), probe.to(device), layer, tap)
    finally:
        model.train(was_training)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser = DenoisingDecoder(
            [f.shape[1] for f in features], in_channels, spatial_dims, decoder_channels, layer=layer, tap=tap
        )
    return denoiser.to(device)


def default_denoiser_path(ckpt_path: str) -> str:
    """The denoiser shipped beside a source checkpoint: ``source_<name>.pt`` → ``denoiser_<name>.pt``."""
    folder, name = os.path.split(ckpt_path)
    name = name[len("source_") :] if name.startswith("source_") else name
    return os.path.join(folder, "denoiser_" + name)


def save_denoiser(denoiser: DenoisingDecoder, path: str) -> None:
    """Save a denoiser's configuration and half-precision weights to one file (read by :func:`load_denoiser`)."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in denoiser.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"config": denoiser.config, "state_dict": state}, path)


def load_denoiser(path: str) -> DenoisingDecoder:
    """Rebuild a denoiser written by :func:`save_denoiser` (float32 weights).

    Raises:
        MissingInputError: (a ``FileNotFoundError``) no such file.
        BadInputError: (a ``ValueError``) a file that is not a denoiser written by :func:`save_denoiser`.
    """
    if not os.path.isfile(path):
        raise MissingInputError(f"denoiser not found: {path!r}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        denoiser = DenoisingDecoder(**saved["config"])
        denoiser.load_state_dict(saved["state_dict"])
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        first = (str(err).strip().splitlines() or [""])[0]
        raise BadInputError(f"cannot read denoiser {path!r} (not written by save_denoiser?): {first}") from err
    return denoiser
