"""DLTTA (Yang et al., IEEE TMI 2022, "Dynamic Learning Rate for Test-Time Adaptation"): entropy minimisation
whose learning rate grows with the disagreement between the current prediction and those of similar past images."""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

from .base import TTAdapter, register_adapter
from .features import FeatureTap
from .losses import entropy_loss

__all__ = ["DLTTA", "symmetric_kl"]


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Mean over pixels of KL(p||q) + KL(q||p), summed over the classes (softmax) or over the channels' Bernoulli
    distributions (sigmoid)."""
    if multilabel:
        log_p = torch.stack([F.logsigmoid(-p_logits), F.logsigmoid(p_logits)])
        log_q = torch.stack([F.logsigmoid(-q_logits), F.logsigmoid(q_logits)])
        dim = (0, 2)
    else:
        log_p, log_q, dim = F.log_softmax(p_logits, dim=1), F.log_softmax(q_logits, dim=1), 1
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=dim).mean()


@register_adapter("dltta")
class DLTTA(TTAdapter):
    """DLTTA baseline: TENT (entropy of the prediction, normalisation affine parameters, BatchNorm on batch
    statistics) stepped by SGD with a learning rate set per image from a memory bank:

    - the bank keeps the last ``memory_size`` (20) pairs (feature key, prediction logits) of past images, each pushed
      after its update (a no-grad forward of the adapted model); the key is the feature map (the input of the last
      convolution, :class:`~monai_grata.tta.FeatureTap`) average-pooled to ``key_size`` per side (2D and 3D);
    - with more than ``k`` (8) entries: the ``k`` most cosine-similar keys are retrieved, their logits averaged with
      weights softmax(cos / 0.2), and the discrepancy D = symmetric KL between the probabilities of that average and
      of the current logits / ``temperature`` (4), summed over classes and averaged over pixels;
      lr = ``lr`` · exp(D);
    - before that (the authors' warm-up): lr = ``lr`` · (entries in the bank), so the first image takes no step.

    Defaults from the authors' segmentation code: bank 20, k 8, base lr 1e-3, SGD without momentum, temperature 4.
    The authors' ensemble keeps only the first neighbour's weighted logits (a typo, ``nsemble_prediction``); here
    all ``k`` weighted logits are summed, as their text describes.

    After each call ``last_stats`` holds ``loss_aux`` (the entropy), ``lr`` and ``discrepancy`` (0 in the warm-up).

    Args:
        model: the source network (adapted in place; a hook added).
        lr: the base learning rate.
        memory_size: the entries the bank keeps.
        k: the neighbours retrieved.
        temperature: the temperature of the current logits in the discrepancy.
        attention_temperature: the temperature of the neighbours' cosine weights.
        key_size: the side of the pooled feature key.
        feature_layer: the layer whose input is the feature map (default: the last convolution).
        episodic: reset weights and bank before every batch.
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs.
        bn_prior: BatchNorm statistics, as :class:`~monai_grata.tta.TTAdapter` takes them (0: test batch only).
        bn_momentum: how fast that prior follows the test stream (:class:`~monai_grata.tta.TTAdapter`).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        memory_size: int = 20,
        k: int = 8,
        temperature: float = 4.0,
        attention_temperature: float = 0.2,
        key_size: int = 16,
        feature_layer: str | None = None,
        episodic: bool = False,
        multilabel: bool = True,
        bn_prior: float = 0.0,
        bn_momentum: float = 0.0,
    ) -> None:
        if not 1 <= k < memory_size:
            raise ValueError(f"need 1 <= k < memory_size, got k={k}, memory_size={memory_size}")
        self.lr, self.k, self.temperature = float(lr), int(k), float(temperature)
        self.attention_temperature, self.key_size, self.multilabel = float(attention_temperature), key_size, multilabel
        super().__init__(model, episodic=episodic, bn_prior=bn_prior, bn_momentum=bn_momentum)
        self.memory: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=int(memory_size))
        self.tap = FeatureTap(self.model, feature_layer)

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr)

    def _key(self) -> torch.Tensor:
        features = self.tap.features.detach()
        pool = {4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}.get(features.ndim)
        pooled = pool(features, self.key_size) if pool is not None else features
        return pooled.flatten(1)

    @torch.no_grad()
    def discrepancy(self, key: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """D for one image (key (F,), logits (C, *spatial)) against its neighbours in the bank (None: too few of
        its shape)."""
        entries = [(k, v) for k, v in self.memory if v.shape == logits.shape]
        if len(entries) <= self.k:
            return None
        keys = torch.stack([k for k, _ in entries])
        cos = F.cosine_similarity(keys, key[None], dim=1)
        top = cos.topk(self.k)
        weights = torch.softmax(top.values / self.attention_temperature, dim=0)
        past = torch.einsum("n,n...->...", weights, torch.stack([entries[i][1] for i in top.indices.tolist()]))
        return symmetric_kl(past[None], logits[None] / self.temperature, self.multilabel)

    def adapt(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(x)
        keys = self._key()
        found = [self.discrepancy(key, z) for key, z in zip(keys, logits.detach(), strict=True)]
        if all(d is not None for d in found):
            discrepancy = torch.stack(found).mean()
            lr = self.lr * math.exp(float(discrepancy))
        else:
            discrepancy = torch.zeros(())
            lr = self.lr * len(self.memory)
        loss = entropy_loss(logits, self.multilabel)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            adapted = self.model(x)
            if bool(torch.isfinite(adapted).all()):
                self.memory.extend(zip(self._key(), adapted, strict=True))
        return {"loss_aux": loss.detach(), "lr": torch.tensor(lr), "discrepancy": discrepancy.detach()}

    def reset(self) -> None:
        super().reset()
        self.memory.clear()
