"""DomainAdaptor (Zhang et al., ICCV 2023): AdaMixBN statistics and a generalised entropy loss, one step per batch
from the source weights."""

from __future__ import annotations

import torch
from torch import nn

from .base import TTAdapter, register_adapter

__all__ = ["DomainAdaptor", "generalized_entropy_loss"]


def generalized_entropy_loss(logits: torch.Tensor, multilabel: bool = True) -> torch.Tensor:
    """GEM-T (DomainAdaptor Eq. 9): per pixel, the logits centred over the classes and divided by a temperature
    T = 2 · their standard deviation over the classes (both without gradient), entropy of that softmax times T²,
    averaged over pixels.

    Sigmoid multi-label outputs are C binary problems with class logits (-z/2, z/2), summed over the channels.

    Args:
        logits: network output (B, C, *spatial).
        multilabel: sigmoid per channel (True) or softmax over channels (False).
    """
    classes = torch.stack([-logits / 2, logits / 2], dim=1) if multilabel else logits[:, None]  # (B, 2 | 1, C', ...)
    dim = 1 if multilabel else 2
    centred = classes - classes.mean(dim=dim, keepdim=True).detach()
    temperature = (2 * centred.std(dim=dim, keepdim=True)).detach().clamp_min(1e-8)
    log_p = torch.log_softmax(centred / temperature, dim=dim)
    entropy = -(log_p.exp() * log_p).sum(dim=dim, keepdim=True) * temperature.square()
    return entropy.squeeze(dim).sum(dim=1).mean()


@register_adapter("domainadaptor")
class DomainAdaptor(TTAdapter):
    """DomainAdaptor baseline: from the source weights for every batch (``episodic``), one SGD step (lr 1e-3) of the
    normalisation affine parameters on the GEM-T loss (:func:`generalized_entropy_loss`), then the prediction;
    BatchNorm normalises with AdaMixBN's mixture of source and test statistics in both forwards.

    AdaMixBN weighs the source statistics by lambda = 1 - d(s,t) / (d(s,t) + d(i,s) + d(i,t)) from the distances
    between the source (s), batch (t) and instance (i) statistics; at batch size 1 the instance is the batch, so
    lambda = 0.5 exactly: ``bn_prior`` N = 1 (the source counted as one image). At larger batches this fixed prior
    gives the source weight N / (N + n) instead of the authors' per-batch lambda.

    Other differences from the authors' code: their AdaMixBN folds the mixture into rectified affine parameters
    once per batch and trains those (the same forward; per-channel rescaled gradients, none through the
    statistics); here the mixture is normalised directly and the gradient flows through the batch statistics as
    in TENT. Their mixing is confined to the encoder; here every BatchNorm mixes.

    After each call ``last_stats`` holds ``loss_aux`` (the GEM-T loss).

    Args:
        model: the source network (adapted in place).
        lr: SGD learning rate.
        momentum: SGD momentum (the authors' offline setting: 0).
        episodic: reset to the source weights before every batch (the method's setting: True).
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs.
        bn_prior: the source prior of the BatchNorm statistics (1: AdaMixBN at batch size 1).
        bn_momentum: how fast that prior follows the test stream (:class:`~monai_grata.tta.TTAdapter`).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        momentum: float = 0.0,
        episodic: bool = True,
        multilabel: bool = True,
        bn_prior: float = 1.0,
        bn_momentum: float = 0.0,
    ) -> None:
        self.lr, self.momentum, self.multilabel = float(lr), float(momentum), multilabel
        super().__init__(model, episodic=episodic, bn_prior=bn_prior, bn_momentum=bn_momentum)

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    def adapt(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = generalized_entropy_loss(self.model(x), self.multilabel)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss_aux": loss.detach()}
