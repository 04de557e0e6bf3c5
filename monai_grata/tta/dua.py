"""DUA (Mirza et al., CVPR 2022, "The Norm Must Go On"): BatchNorm running statistics updated on augmented copies
of each test image with a decaying momentum; no backpropagation."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from monai_grata.transforms.views import LAST_PLANE

from .base import VOLUME_AXES_HINT, TTAdapter, register_adapter
from .normalization import BatchNormPolicy, convert_to_adaptive_batch_norm, update_running_statistics
from .steps import AdaptationStep

__all__ = ["DUA", "DUAStep", "dua_copies"]


def _in_plane_axes(image: torch.Tensor, plane: tuple[int, int] | None) -> tuple[int, int]:
    """The two in-plane axes of one image as negative axes: ``plane``, or by default the last two axes of a
    (C, H, W) image; a volume's are never guessed."""
    if image.ndim not in (3, 4):
        raise ValueError(f"expected one image (C, H, W) or one volume (C, H, W, D), got shape {tuple(image.shape)}")
    if plane is None:
        if image.ndim == 4:
            raise ValueError(f"DUA on a volume {tuple(image.shape)}: {VOLUME_AXES_HINT}")
        return LAST_PLANE
    if len(plane) != 2:
        raise ValueError(f"plane must be two spatial axes, got {plane}")
    axes = []
    for axis in plane:
        if not -image.ndim <= int(axis) < image.ndim:
            raise ValueError(f"plane axis {axis} is out of range for an image of shape {tuple(image.shape)}")
        axes.append(int(axis) % image.ndim - image.ndim)
    if -image.ndim in axes:
        raise ValueError(f"plane {plane} includes the channel axis of an image of shape {tuple(image.shape)}")
    if axes[0] == axes[1]:
        raise ValueError(f"plane must be two different axes, got {plane}")
    return axes[0], axes[1]


def dua_copies(
    image: torch.Tensor,
    n: int,
    generator: torch.Generator,
    pad_fraction: float = 0.125,
    plane: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``n`` augmented copies (n, C, *spatial) of one image (C, H, W) or volume (C, H, W, D), all in its plane
    (H, W): each a random crop of the image zero-padded in that plane (DUA's ``RandomCrop(32, padding=4)``, the
    padding ``pad_fraction`` of the plane's shorter side), flipped along the plane's second axis (the authors'
    horizontal flip) with probability 1/2 and rotated in the plane by a random multiple of 90° (of 180° when the
    plane is not square). The other axes, such as a volume's slice axis D, are left as they are: slice k of every
    copy is an in-plane transform of the image's slice k.

    Args:
        image: one image (C, H, W) or one volume (C, H, W, D).
        n: the number of copies.
        generator: the random generator (on the image's device's type, CPU for a CPU image).
        pad_fraction: the padding of the random crop, as a fraction of the plane's shorter side.
        plane: the two in-plane axes of ``image`` (not its channel axis 0), e.g. (-3, -2) for (H, W) of (C, H, W, D);
            default: the last two axes of an image (a volume needs it).

    Raises:
        ValueError: a volume without ``plane``, or a bad ``plane``.
    """
    rows, cols = _in_plane_axes(image, plane)
    h, w = image.shape[rows], image.shape[cols]
    pad = max(1, round(pad_fraction * min(h, w)))
    widths = [0] * (-2 * min(rows, cols))  # F.pad's (before, after) pairs, from the last axis backwards
    for axis in (rows, cols):
        widths[-2 * axis - 2 : -2 * axis] = [pad, pad]
    padded = F.pad(image, widths)
    draws = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=generator.device).tolist()
    flips = torch.randint(0, 2, (n,), generator=generator, device=generator.device).tolist()
    turns = torch.randint(0, 4 if h == w else 2, (n,), generator=generator, device=generator.device).tolist()
    copies = []
    for (top, left), flip, turn in zip(draws, flips, turns, strict=True):
        view = padded.narrow(rows, top, h).narrow(cols, left, w)
        view = view.flip(cols) if flip else view
        copies.append(torch.rot90(view, turn if h == w else 2 * turn, dims=(rows, cols)))
    return torch.stack(copies)


@dataclasses.dataclass(kw_only=True)
class DUAStep(AdaptationStep):
    """A DUA step (``updated``: some image of the batch moved the running statistics).

    Args:
        momentum: that of the batch's last update (0 when no image of the batch updated the statistics).
    """

    changes = "the BatchNorm statistics"

    momentum: torch.Tensor


@register_adapter("dua")
class DUA(TTAdapter):
    """DUA baseline, backward-free: for each test image (one at a time), every BatchNorm runs in train mode on
    ``n_augmentations`` augmented copies of it (:func:`dua_copies`) and moves its running statistics towards
    their statistics with momentum

        m_t = momentum · decay^t + MIN_MOMENTUM        (t = 1, 2, ... images since the source)

    then the image is predicted in eval mode with the updated running statistics. Only the running statistics
    change; no weight is trained. Defaults (the authors' code): 64 copies, momentum 0.1, decay 0.94, floor 0.005.

    As the authors run it, only the first ``max_updates`` test images (80) update the statistics; later images are
    predicted with them, unchanged (jmiemirza/DUA, ``main.py``: ``--num_samples`` default 80; ``methods/dua.py``
    adapts on images 1 to ``num_samples`` of the test set). Their loop also scores the whole test set after every
    image and keeps the best step by test labels (an oracle); this one adapts continually and predicts each image
    once, as every other method here.

    After each call ``last_step`` (a :class:`DUAStep`) holds ``momentum``, that of the batch's last update (0 when no
    image of the batch updated the statistics).

    Args:
        model: the source network (its running statistics adapted in place).
        n_augmentations: the augmented copies per image.
        momentum: the initial momentum (before decay).
        decay: the factor applied to the momentum per image.
        plane: the two axes of each image (C, *spatial) that the copies are cropped, flipped and rotated in;
            ``None``: the last two axes of a 2D image (C, H, W); a volume needs it (``build_adapter``'s ``task``
            gives it), so its slice axis is never augmented.
        max_updates: how many test images (since the source, or the last reset) update the statistics, counted per
            sample of a batch (each patch, in patch adaptation); ``None``: every image.
        episodic: reset to the source statistics (and the momentum schedule) before every batch.
        seed: seed of the augmentations.
    """

    stochastic = True  # the augmentations are random
    #: the floor added to the decayed momentum (the authors' code: 0.005)
    MIN_MOMENTUM: float = 0.005
    #: the random crop's padding as a fraction of the shorter in-plane side (DUA: 4 of 32 pixels)
    PAD_FRACTION: float = 0.125

    def __init__(
        self,
        model: nn.Module,
        n_augmentations: int = 64,
        momentum: float = 0.1,
        decay: float = 0.94,
        plane: tuple[int, int] | None = None,
        max_updates: int | None = 80,
        episodic: bool = False,
        seed: int = 0,
    ) -> None:
        if n_augmentations < 2:
            raise ValueError(f"n_augmentations must be >= 2 (BatchNorm needs a batch), got {n_augmentations}")
        if plane is not None and (len(plane) != 2 or int(plane[0]) == int(plane[1])):
            raise ValueError(f"plane must be two different spatial axes or None, got {plane}")
        if max_updates is not None and not int(max_updates) >= 0:
            raise ValueError(f"max_updates must be >= 0 or None (every image), got {max_updates}")
        if not (0 < momentum <= 1 and 0 < decay <= 1):
            raise ValueError(f"need 0 < momentum <= 1 and 0 < decay <= 1; got {momentum}, {decay}")
        self.n_augmentations, self.momentum, self.decay = int(n_augmentations), float(momentum), float(decay)
        self.seed = int(seed)
        self.max_updates = None if max_updates is None else int(max_updates)
        self.plane = None if plane is None else (int(plane[0]), int(plane[1]))
        super().__init__(model, episodic=episodic)
        self.steps = 0
        self._generator: torch.Generator | None = None

    def configure_model(self, model: nn.Module) -> nn.Module:
        # predictions use the running statistics, which update_running_statistics moves
        return convert_to_adaptive_batch_norm(model.eval(), BatchNormPolicy(prior=math.inf))

    def _random(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device.type != device.type:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    @torch.no_grad()
    def adapt(self, x: torch.Tensor) -> DUAStep:
        momentum = 0.0
        for image in x:
            if self.max_updates is not None and self.steps >= self.max_updates:
                break
            generator = self._random(x.device)
            self.steps += 1
            momentum = self.momentum * self.decay**self.steps + self.MIN_MOMENTUM
            copies = dua_copies(image, self.n_augmentations, generator, self.PAD_FRACTION, self.plane)
            if copies.device.type == "cpu" and copies.ndim == 4:
                # oneDNN's NHWC convolutions run the 64-copy batch about 30 % faster on CPU (batch size 1: no gain)
                copies = copies.contiguous(memory_format=torch.channels_last)
            with update_running_statistics(self.model, min(momentum, 1.0)):
                self.model(copies)
        return DUAStep(updated=momentum > 0, momentum=torch.tensor(momentum))

    def reset(self) -> None:
        super().reset()
        self.steps = 0
        self._generator = None
