"""Unsupervised losses of test-time adaptation, for sigmoid multi-label and softmax multi-class outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["consistency_loss", "entropy_loss", "probabilities"]

_LOG_EPS = 1e-6


def probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Sigmoid (multi-label) or channel softmax (multi-class) of ``logits`` (B, C, *spatial)."""
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


def entropy_loss(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Mean over pixels of ``-sum_c p_c log(p_c + 1e-6)`` (GraTa Eq. 1; only the p·log p term for sigmoid).

    Args:
        logits: network output (B, C, *spatial).
        multilabel: sigmoid per channel (True) or softmax over channels (False).
    """
    p = probabilities(logits, multilabel)
    return -(p * torch.log(p + _LOG_EPS)).sum(dim=1).mean()


def consistency_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Consistency of a student prediction with teacher probabilities (GraTa Eq. 2).

    Sigmoid: binary cross-entropy with logits, averaged over all elements. Softmax: soft cross-entropy
    ``-sum_c q_c log softmax(s)_c``, averaged over pixels.

    Args:
        student_logits: logits of the strong view (B, C, *spatial).
        teacher_probs: mean probabilities of the weak views (B, C, *spatial), without gradient.
        multilabel: sigmoid per channel (True) or softmax over channels (False).
    """
    if multilabel:
        return F.binary_cross_entropy_with_logits(student_logits, teacher_probs)
    return -(teacher_probs * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()
