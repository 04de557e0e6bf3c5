"""A MONAI trainer for unsupervised domain adaptation: labelled source batches, unlabelled target batches,
and the two losses combined with gradient harmonization."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from monai_grata.losses import AdversarialAlignmentLoss, GradientHarmonizedLoss, discriminator_loss

__all__ = ["UDATrainer"]


def _cycle(loader: Iterable) -> Iterator:
    while True:
        yield from loader


class UDATrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration also draws an unlabelled target batch and trains with
    ``tau1·L1 + tau2·L2``: L1 the target alignment loss, L2 the source segmentation loss (``loss_function``),
    the taus from :class:`~monai_grata.losses.GradientHarmonizedLoss` over all trainable network parameters.
    Its ``backward`` writes ``tau1·g1 + tau2·g2`` into the gradients from the two gradients it takes anyway, so an
    iteration costs one ordinary backward pass in every mode, and ``"none"`` (plain UDA) logs cos and conflict
    as well.

    With an :class:`~monai_grata.losses.AdversarialAlignmentLoss`, the discriminator takes one step per iteration
    after the network (``discriminator_optimizer`` is then required). The iteration output holds, besides
    image/label/pred/loss: ``loss_align``, ``loss_seg``, ``loss_disc`` (adversarial only) and the harmonization
    statistics ``tau1``, ``tau2``, ``cos``, ``dot`` and ``conflict`` as floats-to-be (0-dim tensors).

    Args:
        target_data_loader: batches of target images (labels, if any, are ignored); cycled for as long as needed.
        alignment_loss: L1, a callable on the target logits.
        harmonization: ``"none"``, ``"gh"`` or ``"gh++"``.
        lam: λ of GH++.
        discriminator_optimizer: the optimizer of the discriminator for adversarial alignment.
        target_image_key: the key of the target images in the target batches.
        kwargs: the arguments of ``monai.engines.SupervisedTrainer`` (``train_data_loader`` yields source batches).
    """

    def __init__(
        self,
        target_data_loader: Iterable,
        alignment_loss: nn.Module,
        harmonization: str = "gh",
        lam: float = 0.5,
        discriminator_optimizer: torch.optim.Optimizer | None = None,
        target_image_key: str = Keys.IMAGE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(alignment_loss, AdversarialAlignmentLoss) and discriminator_optimizer is None:
            raise ValueError("adversarial alignment needs a discriminator_optimizer")
        self.target_data_loader, self.alignment_loss = target_data_loader, alignment_loss
        self.discriminator_optimizer, self.target_image_key = discriminator_optimizer, target_image_key
        self.harmonizer = GradientHarmonizedLoss(self.network.parameters(), mode=harmonization, lam=lam)
        self._target_batches: Iterator | None = None

    def _next_target(self) -> torch.Tensor:
        if self._target_batches is None:
            self._target_batches = _cycle(self.target_data_loader)
        batch = next(self._target_batches)
        images = batch[self.target_image_key] if isinstance(batch, dict) else batch[0]
        return images.to(self.state.device, non_blocking=self.non_blocking)

    def _iteration(self, engine: UDATrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        target_images = engine._next_target()
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)

        source_logits = engine.inferer(inputs, engine.network)
        target_logits = engine.inferer(target_images, engine.network)
        engine.state.output[Keys.PRED] = source_logits
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss_seg = engine.loss_function(source_logits, targets).mean()
        loss_align = engine.alignment_loss(target_logits)
        # the two gradients GH needs, combined into .grad: no third backward pass
        engine.state.output[Keys.LOSS] = engine.harmonizer.backward(loss_align, loss_seg)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()

        stats = {"loss_align": loss_align.detach(), "loss_seg": loss_seg.detach(), **engine.harmonizer.last_stats}
        if engine.discriminator_optimizer is not None:
            engine.discriminator_optimizer.zero_grad(set_to_none=True)
            loss_disc = discriminator_loss(engine.alignment_loss, source_logits, target_logits)
            loss_disc.backward()
            engine.discriminator_optimizer.step()
            stats["loss_disc"] = loss_disc.detach()
        engine.state.output.update(stats)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
