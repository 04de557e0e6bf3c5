"""SAR (Niu et al., ICLR 2023): sharpness-aware, reliable entropy minimisation, with pixels as the samples."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import TTAdapter, register_adapter

__all__ = ["SAR", "pixel_entropy"]


def pixel_entropy(logits: torch.Tensor, multilabel: bool = True) -> torch.Tensor:
    """The entropy of each prediction: (B, C, *spatial) binary entropies of the channels (sigmoid), or
    (B, *spatial) entropies of the class distribution (softmax)."""
    if multilabel:
        p = torch.sigmoid(logits)
        return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


@register_adapter("sar")
class SAR(TTAdapter):
    """SAR baseline for segmentation: the reliable samples are pixels. Per batch:

    1. entropies E of the predictions (per pixel and channel for sigmoid, :func:`pixel_entropy`); keep those with
       E < ``margin`` · ln(K) (K = 2 per sigmoid channel, C classes for softmax; ``margin`` 0.4);
    2. g = grad of their mean entropy; move the normalisation affine parameters to theta + rho · g / |g| (rho 0.05);
    3. entropies there, of the pixels kept in 1, filtered again by the same margin; their mean's gradient steps
       theta (SGD, momentum 0.9); that mean feeds an exponential moving average (0.9);
    4. when the average falls below ``reset_constant`` (0.2), the model, optimizer and average are reset to the
       source (the authors' model recovery).

    A batch without any kept pixel makes no step. BatchNorm normalises with the batch's statistics.

    Notes against the authors' setting: their ImageNet learning rate at batch size 1 is 2 · 0.00025 / 64 with
    layer4 of the ResNet frozen; GraTa's paper gives no SAR learning rate, so lr 1e-3 (DomainAdaptor's and DLTTA's)
    is the default and every normalisation layer adapts. The reset threshold 0.2 was set for 1000-class entropies
    (at most ln 1000); a segmentation map of mostly confident pixels has a mean kept entropy well below it, so with
    the defaults SAR resets after most steps (nearly episodic): set ``reset_constant`` 0 to never reset.

    After each call ``last_stats`` holds ``loss_aux`` (step 1's loss), ``loss_pseudo`` (step 3's), ``kept`` (the
    fraction of entropies kept) and ``reset`` (1 when the model was reset after the step).

    Args:
        model: the source network (adapted in place).
        lr: SGD learning rate.
        momentum: SGD momentum.
        rho: the radius of the sharpness-aware perturbation.
        margin: the reliability threshold as a fraction of ln(K).
        reset_constant: the loss average below which the model is reset (0: never).
        ema: the decay of the loss average.
        episodic: reset to the source weights before every batch.
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs.
        bn_prior: BatchNorm statistics, as :class:`~monai_grata.tta.TTAdapter` takes them (0: test batch only).
        bn_momentum: how fast that prior follows the test stream (:class:`~monai_grata.tta.TTAdapter`).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        momentum: float = 0.9,
        rho: float = 0.05,
        margin: float = 0.4,
        reset_constant: float = 0.2,
        ema: float = 0.9,
        episodic: bool = False,
        multilabel: bool = True,
        bn_prior: float = 0.0,
        bn_momentum: float = 0.0,
    ) -> None:
        if not rho >= 0 or not margin > 0 or not 0 <= ema < 1:
            raise ValueError(f"need rho >= 0, margin > 0 and 0 <= ema < 1, got {rho}, {margin}, {ema}")
        self.lr, self.momentum, self.rho, self.margin = float(lr), float(momentum), float(rho), float(margin)
        self.reset_constant, self.ema_decay, self.multilabel = float(reset_constant), float(ema), multilabel
        super().__init__(model, episodic=episodic, bn_prior=bn_prior, bn_momentum=bn_momentum)
        self.ema: float | None = None

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    def entropies(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The entropies of the predictions of ``x`` and the reliability threshold."""
        logits = self.model(x)
        classes = 2 if self.multilabel else logits.shape[1]
        return pixel_entropy(logits, self.multilabel), self.margin * math.log(classes)

    def adapt(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        entropy, threshold = self.entropies(x)
        kept = entropy.detach() < threshold
        if not bool(kept.any()):
            return {"kept": torch.zeros(()), "reset": torch.zeros(())}
        loss = entropy[kept].mean()
        grads = torch.autograd.grad(loss, self.params)
        scale = self.rho / (torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) + 1e-12)
        source = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_add_(self.params, [g * scale for g in grads])
        entropy2 = self.entropies(x)[0][kept]
        kept2 = entropy2.detach() < threshold
        loss2 = entropy2[kept2].mean() if bool(kept2.any()) else entropy2.sum() * 0
        grads2 = torch.autograd.grad(loss2, self.params)
        with torch.no_grad():
            for p, s, g in zip(self.params, source, grads2, strict=True):
                p.copy_(s)
                p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if bool(kept2.any()) and math.isfinite(float(loss2)):
            value = float(loss2)
            self.ema = value if self.ema is None else self.ema_decay * self.ema + (1 - self.ema_decay) * value
        reset = self.ema is not None and self.ema < self.reset_constant
        stats = {"loss_aux": loss.detach(), "loss_pseudo": loss2.detach(), "kept": kept.float().mean()}
        if reset:
            self.reset()
        return {**stats, "reset": torch.tensor(float(reset))}

    def reset(self) -> None:
        super().reset()
        self.ema = None
