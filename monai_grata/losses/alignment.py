"""Target-domain alignment losses for unsupervised domain adaptation of segmentation networks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdversarialAlignmentLoss", "EntropyAlignmentLoss", "discriminator_loss"]


def _probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


class EntropyAlignmentLoss(nn.Module):
    """ADVENT-style direct entropy minimisation on target predictions.

    Sigmoid outputs: the mean over pixels and channels of the binary entropy
    ``-(p log p + (1-p) log(1-p))``; softmax outputs: the mean over pixels of ``-sum_c p_c log p_c``. Both are
    divided by log 2 (resp. log C) so that 1 is the maximum, as ADVENT normalises.

    Args:
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs.
        weight: a factor on the loss (ADVENT's lambda_ent).
    """

    def __init__(self, multilabel: bool = True, weight: float = 1.0) -> None:
        super().__init__()
        self.multilabel, self.weight = multilabel, weight

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
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs.
        weight: a factor on the loss (AdaptSegNet's lambda_adv).
    """

    def __init__(self, discriminator: nn.Module, multilabel: bool = True, weight: float = 1.0) -> None:
        super().__init__()
        self.discriminator, self.multilabel, self.weight = discriminator, multilabel, weight

    def discriminate(self, logits: torch.Tensor) -> torch.Tensor:
        out = self.discriminator(_probabilities(logits, self.multilabel))
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
