"""Gradient harmonization (GH, GH++): reweight two losses so that their gradients stop conflicting.

Wang et al., "Gradient Harmonization in Unsupervised Domain Adaptation", IEEE TPAMI (Eq. 29, 40-44, Algorithm 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GH_MODES", "GradientHarmonizedLoss", "gh_weights"]

GH_MODES = ("none", "gh", "gh++")


def gh_weights(
    g1: torch.Tensor, g2: torch.Tensor, mode: str = "gh", lam: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss weights (tau1, tau2) that harmonize two gradients (1, 1 when they do not conflict).

    When ⟨g1, g2⟩ < 0 (an obtuse angle θ):

    - GH (Eq. 29/42): tau1 = 1 − ⟨g1,g2⟩/‖g1‖², tau2 = 1 − ⟨g1,g2⟩/‖g2‖², so that tau1·g1 + tau2·g2 is the
      sum of each gradient projected onto the normal plane of the other;
    - GH++ (Eq. 40/43): tau1 = 1 + 2·sin(lam·(θ − π/2)/2), tau2 = 1 + 2·sin((lam − 1)·(θ − π/2)/2).

    Args:
        g1: the first gradient, any shape (flattened).
        g2: the second gradient, same number of elements.
        mode: ``"gh"``, ``"gh++"`` or ``"none"`` (always (1, 1)).
        lam: λ of GH++, in [0, 1].

    Returns:
        (tau1, tau2) as 0-dim tensors on the gradients' device (no host round-trip); a zero gradient gives (1, 1).
    """
    if mode not in GH_MODES:
        raise ValueError(f"mode must be one of {GH_MODES}, got {mode!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    g1, g2 = g1.reshape(-1).double(), g2.reshape(-1).double()
    if g1.numel() != g2.numel():
        raise ValueError(f"gradients differ in size: {g1.numel()} vs {g2.numel()}")
    one = torch.ones((), dtype=torch.float32, device=g1.device)
    if mode == "none":
        return one, one.clone()
    dot, sq1, sq2 = torch.dot(g1, g2), torch.dot(g1, g1), torch.dot(g2, g2)
    conflict = (dot < 0) & (sq1 > 0) & (sq2 > 0)
    if mode == "gh":
        tau1 = 1 - dot / torch.where(conflict, sq1, torch.ones_like(sq1))
        tau2 = 1 - dot / torch.where(conflict, sq2, torch.ones_like(sq2))
    else:
        cos = dot / (sq1.sqrt() * sq2.sqrt()).clamp_min(1e-300)
        excess = torch.arccos(cos.clamp(-1.0, 1.0)) - math.pi / 2
        tau1 = 1 + 2 * torch.sin(lam * excess / 2)
        tau2 = 1 + 2 * torch.sin((lam - 1) * excess / 2)
    return torch.where(conflict, tau1, 1.0).float(), torch.where(conflict, tau2, 1.0).float()


def _flat_grad(loss: torch.Tensor, params: list[nn.Parameter], retain_graph: bool) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    # plain tensors: a MONAI MetaTensor loss would make the flat gradient a "batch" of millions of items
    grads = [None if g is None else g.as_subclass(torch.Tensor) for g in grads]
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
    )


class GradientHarmonizedLoss(nn.Module):
    """``loss = tau1·L1 + tau2·L2`` with (tau1, tau2) from the gradients of L1 and L2 over shared parameters.

    Each call takes one ``torch.autograd.grad`` per loss over ``params`` (graphs retained), computes
    :func:`gh_weights`, and returns the reweighted sum with the taus detached (Algorithm 1: they are
    constants), ready for the caller's ``backward()``. The last ``cos``, ``tau1``, ``tau2`` and ``conflict``
    (⟨g1, g2⟩ < 0) are kept as 0-dim tensors for logging, and ``last_dot`` for the inner-product histogram.

    Two-task example (any two scalar losses)::

        harmonized = GradientHarmonizedLoss(shared.parameters(), mode="gh")
        loss = harmonized(depth_loss, normal_loss)
        loss.backward()

    AMP: the taus do not change when both losses are scaled by the same factor, so the gradients may be taken on
    autocast losses; pass ``loss_scale`` (e.g. ``scaler.get_scale()``) to take them on scaled losses, avoiding
    fp16 underflow. DDP: by default each rank computes the taus of its own mini-batch gradients (``autograd.grad``
    does not trigger DDP's all-reduce) and the final ``backward()`` is all-reduced as usual; with
    ``sync_distributed=True`` g1 and g2 are all-reduced (averaged) first, so every rank uses the same taus,
    those of the global batch, at the cost of two all-reduces of the shared parameters' size.

    Args:
        params: the shared parameters (e.g. all trainable parameters of the segmentation network).
        mode: ``"gh"``, ``"gh++"`` or ``"none"`` (plain sum; no gradient is taken).
        lam: λ of GH++.
        sync_distributed: average g1 and g2 over ranks before computing the taus.
        loss_scale: a constant that multiplies both losses before the gradients are taken (AMP).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        mode: str = "gh",
        lam: float = 0.5,
        sync_distributed: bool = False,
        loss_scale: float | None = None,
    ) -> None:
        super().__init__()
        if mode not in GH_MODES:
            raise ValueError(f"mode must be one of {GH_MODES}, got {mode!r}")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable shared parameters to harmonize over")
        self.mode, self.lam, self.sync_distributed, self.loss_scale = mode, lam, sync_distributed, loss_scale
        nan = torch.tensor(float("nan"))
        self.last_stats: dict[str, torch.Tensor] = {
            "tau1": torch.ones(()),
            "tau2": torch.ones(()),
            "cos": nan,
            "dot": nan,
            "conflict": torch.zeros(()),
        }

    def _gradients(
        self, loss1: torch.Tensor, loss2: torch.Tensor, retain_graph: bool, sync: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = 1.0 if self.loss_scale is None else float(self.loss_scale)
        # loss2's graph may share nodes with loss1's (one forward for two tasks): keep it for the second call
        g1 = _flat_grad(loss1 * scale, self.params, retain_graph=True)
        g2 = _flat_grad(loss2 * scale, self.params, retain_graph=retain_graph)
        if (sync or self.sync_distributed) and dist.is_available() and dist.is_initialized():
            for g in (g1, g2):
                dist.all_reduce(g)
                g /= dist.get_world_size()
        return g1, g2

    def forward(self, loss1: torch.Tensor, loss2: torch.Tensor) -> torch.Tensor:
        """
        Args:
            loss1: the first scalar loss (in UDA: the target alignment loss).
            loss2: the second scalar loss (in UDA: the source segmentation loss).

        Returns:
            ``tau1·loss1 + tau2·loss2``, taus detached.
        """
        if loss1.ndim or loss2.ndim:
            raise ValueError(f"expected two scalar losses, got shapes {tuple(loss1.shape)} and {tuple(loss2.shape)}")
        if self.mode == "none":
            return loss1 + loss2
        tau1, tau2 = self._weights(*self._gradients(loss1, loss2, retain_graph=True))
        return tau1.detach() * loss1 + tau2.detach() * loss2

    def backward(self, loss1: torch.Tensor, loss2: torch.Tensor) -> torch.Tensor:
        """Like ``forward(loss1, loss2).backward()`` for ``params``, but without the third backward pass: the
        gradients g1 and g2 already taken are combined into ``tau1·g1 + tau2·g2`` and added to each parameter's
        ``.grad``. When L1 and L2 come from separate forward passes (UDA: target and source batches), the two
        ``autograd.grad`` calls together cost one ordinary backward. In mode ``"none"`` the gradients are still
        taken, so that ``last_stats`` reports cos and conflict for plain training too (taus stay 1). Parameters
        outside ``params`` (e.g. a discriminator) receive no gradient. Under DDP, g1 and g2 are always averaged
        over ranks here (``autograd.grad`` bypasses DDP's gradient hooks), so all ranks apply the same update.
        With AMP, pass ``loss_scale=scaler.get_scale()`` and step with ``scaler.step(optimizer)``.

        Args:
            loss1: the first scalar loss (in UDA: the target alignment loss).
            loss2: the second scalar loss (in UDA: the source segmentation loss).

        Returns:
            ``tau1·loss1 + tau2·loss2``, detached (for logging).
        """
        if loss1.ndim or loss2.ndim:
            raise ValueError(f"expected two scalar losses, got shapes {tuple(loss1.shape)} and {tuple(loss2.shape)}")
        g1, g2 = self._gradients(loss1, loss2, retain_graph=False, sync=True)
        tau1, tau2 = self._weights(g1, g2)
        combined = tau1.to(g1.dtype) * g1 + tau2.to(g2.dtype) * g2
        with torch.no_grad():
            for p, grad in zip(self.params, combined.split([p.numel() for p in self.params]), strict=True):
                grad = grad.view_as(p)
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.add_(grad)
        return (tau1 * loss1 + tau2 * loss2).detach()

    def _weights(self, g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The taus of this mode; records ``last_stats``."""
        tau1, tau2 = gh_weights(g1, g2, self.mode, self.lam)
        dot = torch.dot(g1.double(), g2.double())
        norms = g1.double().norm() * g2.double().norm()
        self.last_stats = {
            "tau1": tau1,
            "tau2": tau2,
            "cos": (dot / norms.clamp_min(1e-300)).float(),
            "dot": dot.float(),
            "conflict": (dot < 0).float(),
        }
        return tau1, tau2
