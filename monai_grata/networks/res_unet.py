"""The ResUNet source network of GraTa: MONAI's FlexibleUNet with a ResNet encoder, or the authors' ResUnet."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from monai.networks.nets import FlexibleUNet

from monai_grata.data.checks import BadInputError, MissingInputError

from .authors_resunet import AuthorsResUNet

__all__ = ["DECODERS", "checkpoint_decoder", "resunet", "load_weights", "save_half_precision"]

#: the decoders :func:`resunet` builds
DECODERS = ("flexible", "authors")


def resunet(
    spatial_dims: int = 2,
    in_channels: int = 3,
    out_channels: int = 2,
    backbone: str = "resnet34",
    norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.1}),
    decoder: str = "flexible",
) -> FlexibleUNet | AuthorsResUNet:
    """Build the ResUNet-34 of the paper (a U-Net decoder on a ResNet-34 encoder).

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: channels of the input image (3 for colour fundus photographs).
        out_channels: output channels (2 for fundus: optic disc and optic cup, sigmoid multi-label).
        backbone: any FlexibleUNet backbone name, e.g. ``"resnet18"``, ``"resnet34"``, ``"resnet50"``.
        norm: normalisation of the decoder, as FlexibleUNet takes it; the encoder always uses BatchNorm.
            Ignored by the authors' decoder (BatchNorm, eps 1e-5).
        decoder: ``"flexible"`` (default): MONAI's FlexibleUNet decoder; ``"authors"``: the authors' ResUnet
            (VPTTA's / GraTa's code: BatchNorm after each skip concatenation at 256 channels, a 32-channel output
            block; :class:`~monai_grata.networks.authors_resunet.AuthorsResUNet`).

    Returns:
        An untrained ``monai.networks.nets.FlexibleUNet`` or ``AuthorsResUNet`` (no ImageNet weights: they
        cannot be downloaded offline). Input sides must be multiples of 32.

    Raises:
        ValueError: an unknown decoder.
    """
    if decoder == "authors":
        return AuthorsResUNet(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, backbone=backbone
        )
    if decoder != "flexible":
        raise ValueError(f"unknown decoder {decoder!r}; choose from {DECODERS}")
    return FlexibleUNet(
        in_channels=in_channels,
        out_channels=out_channels,
        backbone=backbone,
        pretrained=False,
        spatial_dims=spatial_dims,
        norm=norm,
    )


def checkpoint_decoder(ckpt_path: str) -> str:
    """Which :func:`resunet` decoder wrote the checkpoint ``ckpt_path``: ``"authors"`` or ``"flexible"``.

    Read from the state-dict keys (the authors' ResUnet has ``up1.bn.*``). A file that cannot be read counts as
    ``"flexible"``, so that :func:`load_weights` then reports what is wrong with it.
    """
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception:  # missing or unreadable: load_weights says why
        return "flexible"
    state = _state_dict_from(checkpoint) if isinstance(checkpoint, Mapping) else {}
    return "authors" if "up1.bn.weight" in state else "flexible"


def _state_dict_from(checkpoint: Mapping) -> Mapping[str, torch.Tensor]:
    """Return the network state dict inside a bare state dict or a trainer checkpoint."""
    for key in ("network", "model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return checkpoint[key]
    return checkpoint


def load_weights(network: torch.nn.Module, ckpt_path: str, strict: bool = True) -> torch.nn.Module:
    """Load a (possibly half-precision) checkpoint into ``network``, keeping the network's dtype.

    Args:
        network: the network to fill, e.g. from :func:`resunet`.
        ckpt_path: a file written by :func:`save_half_precision` or a trainer checkpoint holding
            the key ``"network"``.
        strict: passed to ``load_state_dict``.

    The path is kept as ``network.checkpoint_path`` (DeTTA looks for its denoiser beside it).

    Raises:
        MissingInputError: (a ``FileNotFoundError``) when ``ckpt_path`` does not exist.
        BadInputError: (a ``ValueError``) when the file is not a readable checkpoint of a matching network; the
            one-line message names the file and, for another architecture, counts the keys that differ.
    """
    if not os.path.isfile(ckpt_path):
        raise MissingInputError(f"checkpoint not found: {ckpt_path!r}")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt file
        first = (str(err).strip().splitlines() or [""])[0]
        raise BadInputError(f"cannot read checkpoint {ckpt_path!r} (truncated or not a torch file?): {first}") from err
    if not isinstance(checkpoint, Mapping):
        raise BadInputError(f"checkpoint {ckpt_path!r} does not hold a state dict")
    reference = network.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in _state_dict_from(checkpoint).items()}
    try:
        network.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        differences = _mismatch(reference, state)
        raise BadInputError(f"checkpoint {ckpt_path!r} does not match the network: {differences}") from err
    network.checkpoint_path = ckpt_path  # where it came from (DeTTA finds its denoiser beside it)
    return network


def _mismatch(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """One line on how a state dict differs from the network's: missing, unexpected and reshaped keys."""
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    reshaped = [k for k in reference if k in state and reference[k].shape != state[k].shape]
    parts = [
        f"{len(keys)} {what} (e.g. {keys[0]!r})"
        for keys, what in ((missing, "missing keys"), (unexpected, "unexpected keys"), (reshaped, "of another shape"))
        if keys
    ]
    return ", ".join(parts) + "; was it trained with another --decoder, --backbone, --in_channels or --out_channels?"


def save_half_precision(network_or_state: torch.nn.Module | Mapping, path: str) -> None:
    """Save a network's weights as a half-precision state dict (floating tensors only).

    Args:
        network_or_state: a network, a state dict, or a trainer checkpoint with a ``"network"`` key.
        path: the output file.
    """
    state = network_or_state.state_dict() if isinstance(network_or_state, torch.nn.Module) else network_or_state
    state = _state_dict_from(state)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(half, path)
