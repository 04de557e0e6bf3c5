"""Optimizers and learning-rate schedules of source training, selectable by name from a bundle config."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["LR_SCHEDULES", "OPTIMIZERS", "build_lr_scheduler", "build_optimizer"]

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("cosine", "poly", "constant")


def build_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.99, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """An optimizer by name.

    Args:
        name: ``"adam"`` (Adam, betas 0.9/0.999) or ``"sgd"`` (SGD with Nesterov momentum, the recipe of the
            authors' source models: lr 1e-3, momentum 0.99, weight decay 5e-4 on every parameter).
        params: the parameters to optimise (weight decay applies to all of them, BatchNorm included).
        lr: the initial learning rate.
        momentum: SGD's momentum (ignored by Adam).
        weight_decay: L2 penalty added to every gradient.

    Raises:
        ValueError: an unknown name.
    """
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def build_lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, epochs: int, power: float = 0.9
) -> torch.optim.lr_scheduler.LRScheduler:
    """An epoch-level learning-rate schedule by name.

    Args:
        name: ``"cosine"`` (cosine decay to 0 over ``epochs``), ``"poly"`` (lr · (1 − epoch/epochs)^power, the
            authors' schedule) or ``"constant"``.
        optimizer: the optimizer whose lr is scheduled.
        epochs: the length of the schedule.
        power: the exponent of ``"poly"``.

    Raises:
        ValueError: an unknown name.
    """
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "poly":
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=epochs, power=power)
    if name == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {name!r}")
