"""TENT (Wang et al., ICLR 2021): entropy minimisation on normalisation affine parameters."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .base import GradientAdapter, register_adapter, require_multilabel
from .losses import entropy_loss
from .normalization import BatchNormPolicy
from .steps import AdaptationStep

__all__ = ["Tent", "TentStep"]


@dataclasses.dataclass(kw_only=True)
class TentStep(AdaptationStep):
    """A TENT (or MedBN) step.

    Args:
        loss_aux: the entropy the step minimised.
    """

    loss_aux: torch.Tensor


@register_adapter("tent")
class Tent(GradientAdapter):
    """TENT baseline: one Adam step on the entropy of the batch's prediction, BN on batch statistics.

    As in the authors' code (DequanWang/tent, ``tent.py``: ``forward_and_adapt`` returns the outputs of the forward
    its loss is computed from), ``adapter(x)`` returns the prediction *before* the update by default
    (``predict="before"``), and the update serves the next batch.

    Args:
        model: the source network (adapted in place).
        lr: Adam learning rate (1e-4 in GraTa's benchmark).
        episodic: reset to the source weights before every batch.
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs; no default (``build_adapter``'s
            ``task`` fills it).
        normalization: how BatchNorm normalises (:class:`~monai_grata.tta.BatchNormPolicy`; the flat options
            ``bn_prior``/``bn_momentum`` of :func:`~monai_grata.tta.build_adapter`).
            None: the test batch's own statistics.
        predict: ``"before"`` (the authors' order: the logits the loss was computed from) or ``"after"`` (a second
            forward with the updated weights).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        episodic: bool = False,
        multilabel: bool | None = None,
        normalization: BatchNormPolicy | None = None,
        predict: str = "before",
    ) -> None:
        multilabel = require_multilabel(multilabel, type(self).__name__)
        self.lr, self.multilabel = float(lr), multilabel
        super().__init__(model, episodic=episodic, normalization=normalization, predict=predict)

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999))

    def adapt(self, x: torch.Tensor) -> TentStep:
        loss = entropy_loss(self.loss_forward(x), self.multilabel)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return TentStep(loss_aux=loss.detach())
