"""A MONAI trainer for unsupervised domain adaptation: labelled source batches, unlabelled target batches,
and the two losses combined with gradient harmonization."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from monai_grata.losses import AdversarialAlignmentLoss, GradientHarmonizedLoss, discriminator_loss

from .utils import average_gradients, mean_over_ranks

__all__ = ["UDATrainer"]


def _cycle(loader: Iterable) -> Iterator:
    """Pass over ``loader`` again and again; a ``DistributedSampler`` is told the pass, so that it shuffles anew
    (the trainer does this for the source loader once per epoch)."""
    for n in itertools.count():
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(n)
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

    Distributed (``network`` a ``DistributedDataParallel``, ``configs/multi_gpu_train_uda.json``): the forwards
    run under ``no_sync()`` because the two gradients are taken with ``autograd.grad``, which DDP does not
    all-reduce; the harmonizer averages g1 and g2 over the ranks instead, so the taus, cos, dot and conflict are
    those of the global batch and the same on every rank, as is the update. The logged losses are averaged over
    the ranks, and so are the discriminator's gradients.

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

        no_sync = getattr(engine.network, "no_sync", contextlib.nullcontext)  # the harmonizer all-reduces
        with no_sync():
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

        losses = {
            Keys.LOSS: engine.state.output[Keys.LOSS],
            "loss_align": loss_align.detach(),
            "loss_seg": loss_seg.detach(),
        }
        if engine.discriminator_optimizer is not None:
            engine.discriminator_optimizer.zero_grad(set_to_none=True)
            loss_disc = discriminator_loss(engine.alignment_loss, source_logits, target_logits)
            loss_disc.backward()
            average_gradients(engine.alignment_loss.parameters())
            engine.discriminator_optimizer.step()
            losses["loss_disc"] = loss_disc.detach()
        engine.state.output.update({**mean_over_ranks(losses), **engine.harmonizer.last_stats})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
