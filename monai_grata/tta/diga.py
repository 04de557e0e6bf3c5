"""DIGA (Wang et al., CVPR 2023, "Dynamically Instance-Guided Adaptation"): backward-free; BatchNorm statistics
mixed with the source's, and a prototype classifier on the network's features fused with its prediction."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .base import TTAdapter, register_adapter, require_multilabel
from .features import FeatureTap
from .losses import probabilities
from .normalization import BatchNormPolicy
from .steps import AdaptationStep

__all__ = ["DIGA", "DIGAStep"]

_EPS = 1e-6


def _class_probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """(B, G, K, *spatial): per group G the probabilities of its K classes. Softmax: one group of C classes;
    sigmoid: C groups of two classes (absent, present)."""
    p = probabilities(logits, multilabel)
    return torch.stack([1 - p, p], dim=2) if multilabel else p[:, None]


def _prototypes(features: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature of each (group, class) over the pixels labelled with it (label -1: none), and whether it had any.

    Args:
        features: (B, F, *spatial).
        labels: (B, G, *spatial), values in -1..k-1.
        k: the classes per group.

    Returns:
        prototypes (G, K, F) and a flag (G, K), True where the class had pixels.
    """
    f = features.movedim(1, -1).reshape(-1, features.shape[1])  # (P, F)
    onehot = F.one_hot((labels + 1).movedim(1, -1).reshape(-1, labels.shape[1]), k + 1)[..., 1:].to(f.dtype)
    counts = onehot.sum(dim=0)  # (G, K)
    sums = torch.einsum("pgk,pf->gkf", onehot, f)
    return sums / counts.clamp_min(1)[..., None], counts > 0


def _prototype_probabilities(
    features: torch.Tensor, prototypes: torch.Tensor, exists: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """(B, G, K, *spatial): per pixel and group, softmax over the existing classes of -distance/tau to their
    prototypes (DIGA's ``exp(-d / tau)`` normalised over the classes that have one); NaN where a group has none."""
    b, _, *spatial = features.shape
    g, k, _ = prototypes.shape
    f = features.movedim(1, -1).reshape(-1, features.shape[1])
    dist = torch.cdist(f, prototypes.reshape(g * k, -1).to(f.dtype)).reshape(b, *spatial, g, k)
    scores = (-dist / tau).masked_fill(~exists, float("-inf"))
    return torch.softmax(scores, dim=-1).movedim((-2, -1), (1, 2))


@dataclasses.dataclass(kw_only=True)
class DIGAStep(AdaptationStep):
    """A DIGA step.

    Args:
        confident: the fraction of pseudo-labelled pixels.
    """

    changes = "the prototypes"

    confident: torch.Tensor


@register_adapter("diga")
class DIGA(TTAdapter):
    """DIGA baseline, backward-free; no weight changes. Per test image:

    1. Distribution adaptation: every BatchNorm normalises with its source statistics mixed with the image's,
       0.8 · source + 0.2 · instance (``bn_prior`` N = 4: the source counted as 4 images at batch size 1).
    2. Semantic adaptation: pixels whose class probability exceeds ``confidence`` (0.9) are pseudo-labelled; the
       mean feature of each class over them is the instance prototype; the running prototype of each class is set
       from its first instance prototype and then moves by :attr:`PROTO_RHO` (0.1) towards each new one. The features
       are the input of the network's last convolution (:class:`~monai_grata.tta.FeatureTap`).
    3. Prediction: per pixel, a softmax over the classes that have a prototype of minus the distance to it, for
       the running (:attr:`PROTO_LAMBDA` 0.8) and the instance (0.2) prototypes, fused with the network's
       probabilities: ``p = FUSION_LAMBDA · p_proto + (1 - FUSION_LAMBDA) · p_net`` (0.8). The adapter returns
       logits of p (log-odds for sigmoid, log p for softmax). Where no class of a group has a prototype, p is the
       network's.

    Sigmoid multi-label outputs are C binary problems: each channel has an absent and a present prototype
    (pseudo-labels p > confidence: present, p < 1 - confidence: absent).

    Deviation from the authors' code, which updates the running prototypes with the ground-truth label map (a label
    leak): here they are updated with the same confident pseudo-labels as the instance prototypes.

    The fusion is :meth:`predict`, which :class:`~monai_grata.handlers.TTAHandler` makes a MONAI evaluator's inferer
    call in place of the network (per window under a sliding window, as for every method); :meth:`adapt` (one
    extra forward) updates the running prototypes.

    After each call ``last_step`` (a :class:`DIGAStep`) holds ``confident`` (the fraction of pseudo-labelled pixels).

    Args:
        model: the source network (its BatchNorm configured in place; a hook on the feature layer added).
        confidence: the pseudo-label threshold.
        tau: the temperature of the distance softmax.
        feature_layer: the layer whose input is the feature map (default: the last convolution).
        episodic: clear the running prototypes before every batch.
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs; no default (``build_adapter``'s
            ``task`` fills it).
        normalization: how BatchNorm normalises (:class:`~monai_grata.tta.BatchNormPolicy`; the flat options
            ``bn_prior``/``bn_momentum`` of :func:`~monai_grata.tta.build_adapter`). None: DIGA's mixture, ``prior`` 4.
    """

    default_normalization = BatchNormPolicy(prior=4.0)
    #: the running prototypes' step towards each instance prototype (DIGA: 0.1)
    PROTO_RHO: float = 0.1
    #: the weight of the running prototypes' prediction against the instance's (DIGA: 0.8)
    PROTO_LAMBDA: float = 0.8
    #: the weight of the prototype prediction against the network's (DIGA: 0.8)
    FUSION_LAMBDA: float = 0.8

    def __init__(
        self,
        model: nn.Module,
        confidence: float = 0.9,
        tau: float = 1.0,
        feature_layer: str | None = None,
        episodic: bool = False,
        multilabel: bool | None = None,
        normalization: BatchNormPolicy | None = None,
    ) -> None:
        multilabel = require_multilabel(multilabel, type(self).__name__)
        if not 0.5 <= confidence < 1 or not tau > 0:
            raise ValueError(f"need 0.5 <= confidence < 1 and tau > 0, got {confidence}, {tau}")
        self.confidence, self.tau, self.multilabel = float(confidence), float(tau), multilabel
        super().__init__(model, episodic=episodic, normalization=normalization)
        self.feature_layer = feature_layer
        self.prototypes: torch.Tensor | None = None  # (G, K, F)
        self.exists: torch.Tensor | None = None  # (G, K)

    def setup(self) -> None:
        self.tap = FeatureTap(self.model, self.feature_layer)

    def _features(self, logits: torch.Tensor) -> torch.Tensor:
        features = self.tap.features
        if features.shape[2:] != logits.shape[2:]:
            mode = "trilinear" if features.ndim == 5 else "bilinear"
            features = F.interpolate(features, size=logits.shape[2:], mode=mode, align_corners=False)
        return features.detach()

    def pseudo_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, G, *spatial): the confident class of each pixel per group, -1 where none is confident."""
        p = _class_probabilities(logits, self.multilabel)
        top, label = p.max(dim=2)
        return torch.where(top > self.confidence, label, -1)

    def instance_prototypes(self, features: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prototypes (G, K, F) of this batch from its confident pixels, and their flags (G, K)."""
        k = logits.shape[1] if not self.multilabel else 2
        return _prototypes(features, self.pseudo_labels(logits), k)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The network's prediction of ``x`` fused with the prototypes' (the network's alone before the first
        :meth:`adapt`)."""
        logits = self.model(x)
        return logits if self.prototypes is None else self.fuse(logits)

    def fuse(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of the fused prediction, from the network's ``logits`` and the features of the same forward."""
        features = self._features(logits)
        instance, exists = self.instance_prototypes(features, logits)
        p_mean = _prototype_probabilities(features, self.prototypes, self.exists, self.tau)
        p_instance = _prototype_probabilities(features, instance, exists, self.tau)
        p_proto = self.PROTO_LAMBDA * p_mean + (1 - self.PROTO_LAMBDA) * p_instance
        p_net = _class_probabilities(logits, self.multilabel)
        p_proto = torch.where(torch.isfinite(p_proto), p_proto, p_net)  # a group without prototypes
        p = self.FUSION_LAMBDA * p_proto + (1 - self.FUSION_LAMBDA) * p_net
        if self.multilabel:
            p = p[:, :, 1].clamp(_EPS, 1 - _EPS)
            return torch.log(p) - torch.log1p(-p)
        return torch.log(p[:, 0].clamp_min(_EPS))

    @torch.no_grad()
    def adapt(self, x: torch.Tensor) -> DIGAStep:
        logits = self.model(x)
        features = self._features(logits)
        instance, exists = self.instance_prototypes(features, logits)
        if self.prototypes is None:
            self.prototypes, self.exists = torch.zeros_like(instance), torch.zeros_like(exists)
        first = exists & ~self.exists
        moved = torch.where(exists[..., None], torch.lerp(self.prototypes, instance, self.PROTO_RHO), self.prototypes)
        self.prototypes = torch.where(first[..., None], instance, moved)
        self.exists = self.exists | exists
        return DIGAStep(confident=(self.pseudo_labels(logits) >= 0).float().mean())

    def reset(self) -> None:
        super().reset()
        self.prototypes, self.exists = None, None
