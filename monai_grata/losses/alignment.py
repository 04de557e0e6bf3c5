"""Target-domain alignment losses for unsupervised domain adaptation of segmentation networks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.nets import PatchDiscriminator
from torch import nn

from monai_grata.tta.base import require_multilabel
from monai_grata.tta.losses import probabilities

__all__ = [
    "ALIGNMENTS",
    "AdversarialAlignmentLoss",
    "EntropyAlignmentLoss",
    "build_alignment_loss",
    "discriminator_loss",
]

ALIGNMENTS = ("adversarial", "entropy")


class EntropyAlignmentLoss(nn.Module):
    """ADVENT-style direct entropy minimisation on target predictions.

    Sigmoid outputs: the mean over pixels and channels of the binary entropy
    ``-(p log p + (1-p) log(1-p))``; softmax outputs: the mean over pixels of ``-sum_c p_c log p_c``. Both are
    divided by log 2 (resp. log C) so that 1 is the maximum, as ADVENT normalises.

    Args:
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs; no default.
        weight: a factor on the loss (ADVENT's lambda_ent).
    """

    def __init__(self, multilabel: bool | None = None, weight: float = 1.0) -> None:
        super().__init__()
        self.multilabel, self.weight = require_multilabel(multilabel, type(self).__name__, via_task=False), weight

    def forward(self, target_logits: torch.Tensor) -> torch.Tensor:
        """
        Args:
            target_logits: network output on target images (B, C, *spatial).
        """
        if self.multilabel:
            p = torch.sigmoid(target_logits)
            entropy = F.binary_cross_entropy_with_logits(target_logits, p, reduction="none")
            return self.weight * entropy.mean() / math.log(2.0)
        log_p = F.log_softmax(target_logits, dim=1)
        entropy = -(log_p.exp() * log_p).sum(dim=1)
        return self.weight * entropy.mean() / math.log(target_logits.shape[1])


class AdversarialAlignmentLoss(nn.Module):
    """AdaptSegNet-style output-space adversarial loss: the segmentation network is trained so that a
    discriminator takes its target predictions for source predictions (label 1).

    The discriminator's own parameters get no gradient from this loss (they are frozen during the call);
    train them with :func:`discriminator_loss`.

    Args:
        discriminator: a network mapping probability maps (B, C, *spatial) to real/fake logits, e.g. MONAI's
            ``PatchDiscriminator`` (its last output is used when it returns a list).
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs; no default.
        weight: a factor on the loss (AdaptSegNet's lambda_adv).
    """

    def __init__(self, discriminator: nn.Module, multilabel: bool | None = None, weight: float = 1.0) -> None:
        super().__init__()
        self.multilabel = require_multilabel(multilabel, type(self).__name__, via_task=False)
        self.discriminator, self.weight = discriminator, weight

    def discriminate(self, logits: torch.Tensor) -> torch.Tensor:
        out = self.discriminator(probabilities(logits, self.multilabel))
        return out[-1] if isinstance(out, (list, tuple)) else out

    def forward(self, target_logits: torch.Tensor) -> torch.Tensor:
        flags = [p.requires_grad for p in self.discriminator.parameters()]
        self.discriminator.requires_grad_(False)
        try:
            judged = self.discriminate(target_logits)
            return self.weight * F.binary_cross_entropy_with_logits(judged, torch.ones_like(judged))
        finally:
            for p, flag in zip(self.discriminator.parameters(), flags, strict=True):
                p.requires_grad_(flag)


def discriminator_loss(
    alignment: AdversarialAlignmentLoss, source_logits: torch.Tensor, target_logits: torch.Tensor
) -> torch.Tensor:
    """The discriminator's loss: source predictions are real (1), target predictions fake (0); inputs detached.

    Args:
        alignment: the adversarial alignment loss holding the discriminator.
        source_logits: segmentation logits on source images.
        target_logits: segmentation logits on target images.
    """
    real = alignment.discriminate(source_logits.detach())
    fake = alignment.discriminate(target_logits.detach())
    return (
        F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
        + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    ) / 2


def build_alignment_loss(
    name: str,
    out_channels: int = 2,
    spatial_dims: int = 2,
    weight: float = 1.0,
    multilabel: bool | None = None,
) -> nn.Module:
    """The alignment loss called ``name``: ``"adversarial"`` (with a new MONAI ``PatchDiscriminator`` on the
    ``out_channels`` probability maps, reachable as ``.discriminator``) or ``"entropy"``.

    Args:
        name: ``"adversarial"`` or ``"entropy"``.
        out_channels: output channels of the segmentation network (the discriminator's input channels).
        spatial_dims: 2 or 3.
        weight: the loss weight (lambda_adv / lambda_ent).
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs; no default.

    Raises:
        ValueError: for any other name, or no ``multilabel``.
    """
    if name == "adversarial":
        discriminator = PatchDiscriminator(
            spatial_dims=spatial_dims, channels=64, in_channels=out_channels, num_layers_d=3
        )
        return AdversarialAlignmentLoss(discriminator, multilabel=multilabel, weight=weight)
    if name == "entropy":
        return EntropyAlignmentLoss(multilabel=multilabel, weight=weight)
    raise ValueError(f"alignment must be adversarial or entropy, got {name!r}")
