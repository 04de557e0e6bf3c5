"""DeTTA (Wen et al., WACV 2024, "From Denoising Training to Test-Time Adaptation"): normalisation affine parameters
trained at test time by a blind-spot denoising loss through a denoising decoder that shares the source encoder."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from monai_grata.networks.denoiser import (
    DenoisingDecoder,
    build_denoiser,
    default_denoiser_path,
    load_denoiser,
    tap_features,
)

from .base import VOLUME_AXES_HINT, GradientAdapter, collect_norm_params, register_adapter
from .normalization import BatchNormPolicy, convert_to_adaptive_batch_norm
from .steps import AdaptationStep

__all__ = ["DeTTA", "DeTTAStep", "blind_spot", "denoising_loss", "resolve_denoiser"]

logger = logging.getLogger(__name__)


def blind_spot(
    x: torch.Tensor,
    mask_ratio: float = 0.1,
    window: int = 5,
    generator: torch.Generator | None = None,
    plane: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise2Void masking, as DeTTA's code does it: in every image and channel, ``mask_ratio`` · (number of pixels)
    positions drawn uniformly with replacement each take the value of a random pixel of the ``window``-wide
    neighbourhood around them in ``plane`` (offsets in [-window//2, window//2] per in-plane axis, wrapping at the
    borders; the offset may be 0). A neighbour never comes from another slice of a volume.

    Args:
        x: images (B, C, H, W) or volumes (B, C, *spatial).
        mask_ratio: the share of positions masked (DeTTA: 0.1, its ``ratio`` 0.9 being the share kept).
        window: the neighbourhood's side, odd (DeTTA: 5).
        generator: the random generator (on ``x``'s device type).
        plane: the two in-plane spatial axes, as negative axes (e.g. (-3, -2) for (B, C, H, W, D)); ``None``: the
            last two axes of images (B, C, H, W).

    Returns:
        (masked images, mask) — the mask is 1 at the replaced positions, 0 elsewhere, shaped like ``x``.

    Raises:
        ValueError: a volume without ``plane``, or a ``plane`` that is not two different spatial axes.
    """
    b, c, *spatial = x.shape
    if plane is None and len(spatial) != 2:
        raise ValueError(f"blind_spot on a volume {tuple(x.shape)}: {VOLUME_AXES_HINT}")
    moved = {len(spatial) + int(a) for a in (plane if plane is not None else (-2, -1))}
    if len(moved) != 2 or not all(0 <= a < len(spatial) for a in moved):
        raise ValueError(f"plane must be two different spatial axes of {tuple(x.shape)} as negative axes, got {plane}")
    n_pixels = math.prod(spatial)
    n = int(n_pixels * mask_ratio)
    flat = x.reshape(b * c, n_pixels)
    draw = {"generator": generator, "device": x.device}
    where = torch.randint(0, n_pixels, (b * c, n), **draw)
    neighbour = torch.zeros_like(where)
    stride, rest = 1, where
    for axis in reversed(range(len(spatial))):  # unravel, shift in-plane axes and wrap, ravel again
        size = spatial[axis]
        coord = rest % size
        rest = rest // size
        if axis in moved:
            coord = (coord + torch.randint(-(window // 2), window // 2 + 1, (b * c, n), **draw)) % size
        neighbour += coord * stride
        stride *= size
    masked = flat.clone().scatter_(1, where, flat.gather(1, neighbour))
    mask = torch.zeros_like(flat).scatter_(1, where, 1.0)
    return masked.reshape(x.shape), mask.reshape(x.shape)


def denoising_loss(denoised: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DeTTA's loss: L1 between the denoised and the clean image at the masked positions, averaged over all
    positions as the authors' ``L1Loss()(out * m, target * m)`` does. The target is the image min-max scaled to
    [0, 1] per image (the authors' input scaling; the decoder's output is a sigmoid)."""
    dims = tuple(range(1, image.ndim))
    low, high = image.amin(dim=dims, keepdim=True), image.amax(dim=dims, keepdim=True)
    target = (image - low) / (high - low).clamp_min(1e-8)
    return F.l1_loss(denoised * mask, target * mask)


def resolve_denoiser(denoiser: str | nn.Module | None, model: nn.Module, seed: int = 0) -> nn.Module:
    """The denoising decoder DeTTA uses with ``model``.

    Args:
        denoiser: a file written by :func:`~monai_grata.networks.save_denoiser`, a ready decoder, or ``None``: the file
            ``denoiser_<name>.pt`` beside the checkpoint ``source_<name>.pt`` that
            :func:`~monai_grata.networks.load_weights` loaded into ``model``, when there is one; otherwise an untrained
            decoder (a warning says so: DeTTA then measures BatchNorm statistics plus noise).
        model: the source network.
        seed: seed of an untrained decoder's weights.

    Raises:
        MissingInputError, BadInputError: a named file that is missing or not a denoiser.
    """
    if isinstance(denoiser, nn.Module):
        return denoiser
    if denoiser is None:
        checkpoint = getattr(model, "checkpoint_path", None)
        beside = default_denoiser_path(checkpoint) if checkpoint else None
        if beside is None or not os.path.isfile(beside):
            logger.warning(
                "DeTTA without a trained denoiser (none given%s): adapting through an untrained decoder; train one "
                "with python -m monai_grata.utils.train_denoiser",
                f", no {beside}" if beside else "",
            )
            return build_denoiser(model, seed=seed)
        denoiser = beside
    return load_denoiser(denoiser).to(next(model.parameters()).device)


@dataclasses.dataclass(kw_only=True)
class DeTTAStep(AdaptationStep):
    """A DeTTA step.

    Args:
        loss_denoise: the blind-spot denoising loss the step minimised.
    """

    loss_denoise: torch.Tensor


@register_adapter("detta")
class DeTTA(GradientAdapter):
    """DeTTA baseline. Per test batch x:

    1. x̃, m = :func:`blind_spot` (x): :attr:`MASK_RATIO` (0.1) of the positions replaced by a random neighbour
       within a ``window`` × ``window`` window (m = 1 there);
    2. the source network's encoder runs on x̃ (the forward stops there), the denoising decoder D reconstructs the
       image from its features: L = mean |D(enc(x̃)) − x| · m (:func:`denoising_loss`);
    3. one Adam step (lr 1e-6, betas (0.9, 0.99), the authors' values) on the affine weights and biases of every
       normalisation layer of the source network and of D (the segmentation decoder's get no gradient);
    4. x (not masked) is predicted by the updated network.

    The segmentation output never enters the loss. The denoiser comes from training with the source model (see
    :func:`resolve_denoiser`; ``python -m monai_grata.utils.train_denoiser``).

    Differences from the authors' code: their Y-net is trained jointly (segmentation + ramped-up denoising loss), the
    denoiser here is trained afterwards on the frozen source encoder; they adapt offline for one epoch over the whole
    target set in shuffled batches of 8 with BatchNorm in train mode and then predict with the running statistics
    (momentum 0.1) — here adaptation is online and continual at batch size 1 like every method of the benchmark, and
    BatchNorm normalises as ``bn_prior`` says (0: the test image's statistics; ``bn_prior=inf, bn_momentum=0.1``
    approximates their running statistics).

    Args:
        model: the source network (adapted in place).
        denoiser: see :func:`resolve_denoiser` (a path, a decoder, or ``None``: the one beside the source checkpoint).
        lr: Adam learning rate (1e-6).
        window: side of the neighbourhood a masked position takes its value from (5).
        episodic: reset network and denoiser to the source state before every batch.
        seed: seed of the masks (and of an untrained denoiser).
        normalization: how BatchNorm normalises (:class:`~monai_grata.tta.BatchNormPolicy`; the flat options
            ``bn_prior``/``bn_momentum`` of :func:`~monai_grata.tta.build_adapter`).
            None: the test image's own statistics.
        plane: the in-plane axes the masked positions take their neighbours from (:func:`blind_spot`); ``None``: the
            last two axes of images. A volume needs it (``build_adapter``'s ``task`` gives it).
    """

    stochastic = True  # the masks are random
    #: share of the positions masked per image and channel (DeTTA: 0.1, its ``ratio`` 0.9 being the share kept)
    MASK_RATIO: float = 0.1

    def __init__(
        self,
        model: nn.Module,
        denoiser: str | nn.Module | None = None,
        lr: float = 1e-6,
        window: int = 5,
        episodic: bool = False,
        seed: int = 0,
        normalization: BatchNormPolicy | None = None,
        plane: tuple[int, int] | None = None,
    ) -> None:
        if window < 3 or window % 2 == 0:
            raise ValueError(f"window must be odd and >= 3, got {window}")
        super().__init__(model, episodic=episodic, normalization=normalization)
        self.lr, self.window, self.seed = float(lr), int(window), int(seed)
        self.plane = None if plane is None else (int(plane[0]), int(plane[1]))
        self.denoiser: DenoisingDecoder = resolve_denoiser(denoiser, model, self.seed)
        self._generator: torch.Generator | None = None

    def setup(self) -> None:
        # the denoiser's BatchNorm normalises as the network's does; only its normalisation parameters adapt
        convert_to_adaptive_batch_norm(self.denoiser.eval(), self.normalization).requires_grad_(False)
        self._source_denoiser = copy.deepcopy(self.denoiser.state_dict())

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return collect_norm_params(model) + collect_norm_params(self.denoiser)

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.99))

    def _random(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device.type != device.type:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def adapt(self, x: torch.Tensor) -> DeTTAStep:
        masked, mask = blind_spot(x, self.MASK_RATIO, self.window, self._random(x.device), self.plane)
        features = tap_features(self.model, masked, self.denoiser.layer, self.denoiser.tap)
        denoised = self.denoiser(features)
        if denoised.ndim < x.ndim and hasattr(self.model, "as_volumes"):  # a 2D network run slice by slice
            denoised = self.model.as_volumes(denoised)
        loss = denoising_loss(denoised, x, mask)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return DeTTAStep(loss_denoise=loss.detach())

    def reset(self) -> None:
        super().reset()
        self.denoiser.load_state_dict(self._source_denoiser, strict=True)
        self._generator = None
