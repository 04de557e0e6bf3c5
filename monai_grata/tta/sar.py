"""SAR (Niu et al., ICLR 2023): sharpness-aware, reliable entropy minimisation, with pixels as the samples."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import GradientAdapter, register_adapter, require_multilabel
from .normalization import BatchNormPolicy
from .steps import AdaptationStep

__all__ = ["SAR", "SARStep", "pixel_entropy"]


def pixel_entropy(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """The entropy of each prediction: (B, C, *spatial) binary entropies of the channels (sigmoid), or
    (B, *spatial) entropies of the class distribution (softmax).

    Args:
        logits: network output (B, C, *spatial).
        multilabel: sigmoid per channel (True) or softmax over channels (False).
    """
    if multilabel:
        p = torch.sigmoid(logits)
        return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


@dataclasses.dataclass(kw_only=True)
class SARStep(AdaptationStep):
    """A SAR step.

    Args:
        kept: the fraction of entropies kept as reliable.
        loss_aux: the mean kept entropy (step 1); None when no pixel was kept.
        loss_pseudo: the mean kept entropy at the perturbed weights (step 3); None when no pixel was kept.
        reset: 1 when the model was reset to the source after the step, else 0.
    """

    kept: torch.Tensor
    loss_aux: torch.Tensor | None = None
    loss_pseudo: torch.Tensor | None = None
    reset: torch.Tensor


@register_adapter("sar")
class SAR(GradientAdapter):
    """SAR baseline for segmentation: the reliable samples are pixels. Per batch, with K the number of outcomes of
    each entropy (2 per sigmoid channel, C classes for softmax) so that every entropy lies in [0, ln K]:

    1. entropies E of the predictions (per pixel and channel for sigmoid, :func:`pixel_entropy`); keep those with
       E < ``margin`` · ln K (``margin`` 0.4: the authors' 0.4 · ln 1000);
    2. g = grad of their mean entropy; move the normalisation affine parameters to theta + rho · g / |g| (rho 0.05);
    3. entropies there, of the pixels kept in 1, filtered again by the same threshold; their mean's gradient steps
       theta (SGD, momentum 0.9); that mean feeds an exponential moving average (:attr:`EMA_DECAY` 0.9);
    4. when the average is below :attr:`RESET_CONSTANT` · ln K, the model and optimizer are reset to the source (the
       authors' model recovery).

    As in the authors' code (mr-eggplant/SAR, ``sar.py``): the prediction returned is the logits of step 1's forward,
    before the update (``predict="before"``); a batch without any kept pixel still takes the SGD step with zero
    gradients (their mean over no sample), which moves the weights by the momentum alone; and the loss average
    survives a reset (``SAR.forward`` assigns it again after ``reset()`` cleared it), so once it is below the
    threshold every step is undone until it climbs back. ``reset()`` called from outside (a new target domain)
    clears it. BatchNorm normalises with the batch's statistics.

    Scaled for segmentation: the authors' thresholds are 0.4 · ln 1000 (margin) and 0.2 (reset) for a 1000-class
    softmax. A sigmoid pixel's entropy is at most ln 2, below 0.2 for any prediction more confident than 95 %, so
    the unscaled 0.2 reset the model after every step (SAR scored what BatchNorm statistics alone score). Both
    thresholds are therefore fractions of ln K: the reset's default is 0.2 / ln 1000 ≈ 0.029 of ln K (≈ 0.020 for
    sigmoid outputs).

    Learning rate: the authors scale it with the batch size, ``(0.00025 / 64) · bs · 2`` for their BatchNorm and
    GroupNorm ResNet-50 at batch sizes below 32 (``main.py``, where ``args.lr`` is set per model; ``0.001 / 64 · bs``
    for ViT-Base), i.e. 7.8e-6 at batch size 1, with ``layer4`` left out of the adapted parameters. That rate belongs
    to one ImageNet sample's 1000-class entropy; GraTa's paper gives none for SAR. The default here, 1e-3 (the SGD
    rate of DomainAdaptor and DLTTA in the same benchmark), is kept: on a fundus image (256 px, the REFUGE source
    model) the gradient of the mean pixel entropy is small, so that over the first three images SGD at 7.8e-6 moves
    the BatchNorm affine parameters by about 1e-9 on average (1e-7 at 1e-3; TENT's Adam at 1e-4: 2e-4) and SAR
    would score what BatchNorm statistics alone score. Every normalisation layer adapts.

    After each call ``last_step`` (a :class:`SARStep`) holds ``loss_aux`` (step 1's loss), ``loss_pseudo`` (step 3's),
    ``kept`` (the fraction of entropies kept) and ``reset`` (1 when the model was reset after the step); a batch without
    a kept pixel reports only ``kept`` and ``reset``.

    Args:
        model: the source network (adapted in place).
        lr: SGD learning rate.
        momentum: SGD momentum.
        rho: the radius of the sharpness-aware perturbation.
        margin: the reliability threshold as a fraction of ln K.
        episodic: reset to the source weights before every batch.
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs; no default (``build_adapter``'s
            ``task`` fills it).
        normalization: how BatchNorm normalises (:class:`~monai_grata.tta.BatchNormPolicy`; the flat options
            ``bn_prior``/``bn_momentum`` of :func:`~monai_grata.tta.build_adapter`).
            None: the test batch's own statistics.
        predict: ``"before"`` (the authors' order: the logits of step 1) or ``"after"`` (a second forward with the
            updated weights).
    """

    #: the loss average below which the model is reset, as a fraction of ln K (0: never): the authors' reset threshold
    #: 0.2 (``sar.py``, ``forward_and_adapt_sar``) as a fraction of the largest entropy of their 1000-class softmax
    RESET_CONSTANT: float = 0.2 / math.log(1000)
    #: the decay of the loss average (the authors' 0.9, ``sar.py``, ``update_ema``)
    EMA_DECAY: float = 0.9

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        momentum: float = 0.9,
        rho: float = 0.05,
        margin: float = 0.4,
        episodic: bool = False,
        multilabel: bool | None = None,
        normalization: BatchNormPolicy | None = None,
        predict: str = "before",
    ) -> None:
        multilabel = require_multilabel(multilabel, type(self).__name__)
        if not rho >= 0 or not margin > 0:
            raise ValueError(f"need rho >= 0 and margin > 0, got {rho}, {margin}")
        self.lr, self.momentum, self.rho, self.margin = float(lr), float(momentum), float(rho), float(margin)
        self.multilabel = multilabel
        super().__init__(model, episodic=episodic, normalization=normalization, predict=predict)
        self.ema: float | None = None

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    def log_classes(self, logits: torch.Tensor) -> float:
        """ln K, the largest entropy of one prediction of ``logits``."""
        return math.log(2 if self.multilabel else logits.shape[1])

    def perturbed_loss(
        self, x: torch.Tensor, grads: tuple[torch.Tensor, ...], kept: torch.Tensor, threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Steps 2-3: the mean kept entropy at theta + rho · g / |g|, the entropies kept there, and its gradient
        (taken at the perturbed point); the parameters are back at theta on return."""
        scale = self.rho / (torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) + 1e-12)
        source = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_add_(self.params, [g * scale for g in grads])
        entropy = pixel_entropy(self.model(x), self.multilabel)[kept]
        kept2 = entropy.detach() < threshold
        loss = entropy[kept2].mean() if bool(kept2.any()) else entropy.sum() * 0
        grads2 = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            for p, s in zip(self.params, source, strict=True):
                p.copy_(s)
        return loss, kept2, grads2

    def adapt(self, x: torch.Tensor) -> SARStep:
        logits = self.loss_forward(x)
        log_k = self.log_classes(logits)
        entropy = pixel_entropy(logits, self.multilabel)
        kept = entropy.detach() < self.margin * log_k
        losses = {}
        if bool(kept.any()):
            loss = entropy[kept].mean()
            grads = torch.autograd.grad(loss, self.params)
            loss2, kept2, grads2 = self.perturbed_loss(x, grads, kept, self.margin * log_k)
            losses = {"loss_aux": loss.detach(), "loss_pseudo": loss2.detach()}
            if bool(kept2.any()) and math.isfinite(value := float(loss2.detach())):
                self.ema = value if self.ema is None else self.EMA_DECAY * self.ema + (1 - self.EMA_DECAY) * value
        else:  # the authors' mean over no pixel: zero gradients, no perturbation
            grads2 = tuple(torch.zeros_like(p) for p in self.params)
        for p, g in zip(self.params, grads2, strict=True):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        reset = self.ema is not None and self.ema < self.RESET_CONSTANT * log_k
        if reset:
            ema = self.ema
            self.reset()
            self.ema = ema
        return SARStep(kept=kept.float().mean(), **losses, reset=torch.tensor(float(reset)))

    def reset(self) -> None:
        super().reset()
        self.ema = None
