"""MedBN (Park et al., CVPR 2024): TENT with median BatchNorm statistics."""

from __future__ import annotations

import dataclasses

from .base import register_adapter
from .normalization import BatchNormPolicy
from .tent import Tent

__all__ = ["MedBN"]


@register_adapter("medbn")
class MedBN(Tent):
    """MedBN baseline: TENT (one Adam step on the prediction's entropy, normalisation affine parameters) whose
    BatchNorm layers normalise with robust test statistics (:class:`~monai_grata.tta.BatchNormPolicy` with
    ``statistic="median"``):

        mu = median over (batch, space) of each channel,   var = mean over (batch, space) of (x - mu)^2

    in the adapting forward and in the prediction alike. Defaults: Adam, lr 1e-4 (TENT's setting in GraTa's
    benchmark); the median over a batch of one image is over its pixels. Like TENT, whose update MedBN runs,
    ``adapter(x)`` returns by default the logits of the adapting forward, before the update (``predict="before"``;
    the authors' script, hyejin-s/MedBN-robust-test-time-adpatation ``test_attack.py``, logs accuracies before
    and after it).

    Args:
        model: the source network (adapted in place).
        lr: Adam learning rate.
        episodic: reset to the source weights before every batch.
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs; no default (``build_adapter``'s
            ``task`` fills it).
        normalization: the prior and momentum (:class:`~monai_grata.tta.BatchNormPolicy`; its statistic is always
            the median): ``prior`` 0 (the paper: the batch's median statistics alone) or N > 0 (mixed with the
            source statistics, the source counted as N samples).
        predict: ``"before"`` (TENT's order: the logits the loss was computed from) or ``"after"`` (a second
            forward with the updated weights).
    """

    default_normalization = BatchNormPolicy(statistic="median")

    @classmethod
    def resolve_normalization(cls, normalization: BatchNormPolicy | None) -> BatchNormPolicy:
        return dataclasses.replace(super().resolve_normalization(normalization), statistic="median")
