"""Test-time normalisation (Schneider et al., NeurIPS 2020; TENT's "BN" baseline): batch statistics, no update."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from monai_grata.transforms import WeakViews

from .base import VOLUME_AXES_HINT, TTAdapter, register_adapter, require_multilabel
from .losses import entropy_loss, probabilities
from .normalization import BatchNormPolicy, convert_to_adaptive_batch_norm, per_group_batch_norm
from .steps import AdaptationStep

__all__ = ["BatchNormStatistics", "NormStep", "SelectedBatchNormStatistics"]


@dataclasses.dataclass(kw_only=True)
class NormStep(AdaptationStep):
    """A step of the BatchNorm statistics baselines, which keep nothing from one batch to the next.

    Args:
        prior: the prior strength chosen for the batch (:class:`SelectedBatchNormStatistics`).
        loss_aux: the chosen prior's criterion value (:class:`SelectedBatchNormStatistics`).
    """

    changes = None

    updated: bool = False
    prior: torch.Tensor | None = None
    loss_aux: torch.Tensor | None = None


@register_adapter("norm")
class BatchNormStatistics(TTAdapter):
    """Baseline that only normalises with the test batch's statistics in every BatchNorm; no weight changes.

    It separates what TENT and GraTa gain from their gradient steps from what batch statistics alone give.
    With a ``prior`` N > 0 (``bn_prior``) the test statistics are mixed with the source statistics, the source
    counted as N samples (Schneider et al. 2020's prior).

    Args:
        model: the source network (configured in place).
        episodic: put the source prior back before every batch; it matters only for a prior that follows the
            stream (``momentum`` > 0), the one state this method keeps.
        normalization: the :class:`~monai_grata.tta.BatchNormPolicy`: ``prior`` 0 (test statistics only), N > 0
            (source prior of strength N), ``math.inf`` (source statistics).
    """

    def adapt(self, x: torch.Tensor) -> NormStep:
        return NormStep()


@register_adapter("norm_select")
class SelectedBatchNormStatistics(TTAdapter):
    """Backward-free: per test batch, normalise with the source prior strength whose prediction is the most
    confident (lowest mean entropy) among ``priors``; no weight changes.

    Each candidate N mixes the batch's statistics with the source statistics as in
    :class:`~monai_grata.tta.BatchNormPolicy` (``inf``: the source statistics, i.e. No Adapt; 0: the
    batch's own statistics). A source-like test image keeps the source statistics; a shifted one, whose
    source-statistics prediction is uncertain, takes as much of its own statistics as makes it confident.
    Costs one forward per candidate plus the prediction.

    With ``criterion="consistency"`` the candidate whose weak views (GraTa's flips and rotations, each with its
    own statistics, mapped back; ``views`` for volumes) agree best is chosen
    instead: the mean over pixels of the variance of the views' probabilities; one forward per view and candidate.

    After each call ``last_step`` (a :class:`NormStep`) holds ``prior`` (the chosen N) and ``loss_aux`` (its criterion
    value).

    Args:
        model: the source network (configured in place).
        priors: the candidate prior strengths N (≥ 0; ``math.inf`` allowed).
        criterion: ``"entropy"`` (the most confident prediction) or ``"consistency"`` (the most view-consistent).
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs; no default (``build_adapter``'s
            ``task`` fills it).
        views: the weak views of the consistency criterion (:class:`~monai_grata.transforms.WeakViews`); ``None``:
            GraTa's six views for images. A volume needs views in its plane (``build_adapter``'s ``task`` gives them).
    """

    def __init__(
        self,
        model: nn.Module,
        priors: Sequence[float] = (math.inf, 64.0, 16.0, 4.0, 0.0),
        criterion: str = "entropy",
        multilabel: bool | None = None,
        views: Sequence | None = None,
    ) -> None:
        multilabel = require_multilabel(multilabel, type(self).__name__)
        priors = [float(p) for p in priors]
        if not priors or any(not p >= 0 for p in priors):
            raise ValueError(f"priors must be a non-empty list of numbers >= 0 (inf allowed), got {priors}")
        if criterion not in ("entropy", "consistency"):
            raise ValueError(f"criterion must be 'entropy' or 'consistency', got {criterion!r}")
        self.priors, self.criterion, self.multilabel = priors, criterion, multilabel
        self.views, self.views_given = WeakViews() if views is None else WeakViews(views), views is not None
        super().__init__(model, normalization=BatchNormPolicy(prior=math.inf))  # no state kept: never episodic

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """The criterion of the current prior on ``x`` (lower is better)."""
        if self.criterion == "entropy":
            return entropy_loss(self.model(x), self.multilabel)
        if x.ndim == 5 and not self.views_given:
            raise ValueError(f"norm_select's consistency on a volume {tuple(x.shape)}: {VOLUME_AXES_HINT}")
        views = self.views
        with per_group_batch_norm(self.model, views.num_views):
            logits = self.model(views(x))
        return views.inverse(probabilities(logits, self.multilabel)).var(dim=0, correction=0).mean()

    @torch.no_grad()
    def adapt(self, x: torch.Tensor) -> NormStep:
        scores = []
        for prior in self.priors:
            convert_to_adaptive_batch_norm(self.model, BatchNormPolicy(prior=prior))
            scores.append(self.score(x))
        best = int(torch.stack(scores).argmin())
        convert_to_adaptive_batch_norm(self.model, BatchNormPolicy(prior=self.priors[best]))
        return NormStep(prior=torch.tensor(self.priors[best]), loss_aux=scores[best].detach())
