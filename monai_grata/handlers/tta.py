"""Ignite glue: run a test-time adapter inside any MONAI evaluator, before its own forward pass."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.inferers import SlidingWindowInferer
from torch import nn

from monai_grata.data.task import TaskSpec
from monai_grata.tta import (
    AdaptationStep,
    PatchAdaptation,
    TTAdapter,
    build_adapter,
    resolve_method,
    track_test_statistics,
)

__all__ = ["GraTaHandler", "TTAHandler", "tta_output_transform"]

STATS_KEY = "tta"
logger = logging.getLogger(__name__)


class TTAHandler:
    """Adapt the evaluator's network on every batch, so its own forward, postprocessing and metrics see the
    adapted weights.

    At ``ITERATION_STARTED`` the handler prepares the batch with the evaluator's ``prepare_batch`` and runs
    one adaptation step; the evaluator's forward then predicts with the updated weights, which is the
    prediction step of the algorithm (no extra forward pass): for that iteration the evaluator's inferer calls the
    adapter's :meth:`~monai_grata.tta.TTAdapter.predict` in place of the network (the model's forward, or e.g.
    DIGA's fusion with its prototypes). The step (an :class:`~monai_grata.tta.AdaptationStep`) is published as
    ``engine.state.tta`` and, after the forward, its :meth:`~monai_grata.tta.AdaptationStep.scalars` (0-dim tensors,
    plus ``n_patches`` in patch adaptation) under ``"tta"`` in every decollated output item, so
    ``StatsHandler``/``MLFlowHandler`` log them with ``output_transform=tta_output_transform``; ``history`` keeps
    the steps for the whole stream. Attach it before the logging handlers.

    Volumes: when the evaluator's inferer is a ``SlidingWindowInferer``, the handler adapts on ``num_patches``
    windows of each volume, never the whole volume at once, and the evaluator's sliding-window forward then predicts
    every window with the adapted weights and the BatchNorm statistics of those patches
    (:class:`~monai_grata.tta.PatchAdaptation`; the design and its cost are in ``docs/volumes.md``).

    Methods that predict before their update (``adapter.prediction_order == "before"``: TENT, SAR, MedBN as their
    authors run them): for that iteration the evaluator's inferer returns the logits the update was computed from, so
    postprocessing and metrics see them and no second forward runs. Patch adaptation has no whole-volume logits before
    the update, so there the evaluator's prediction after the update stands (a warning says so).

    Args:
        adapter: a ready adapter whose ``model`` is the evaluator's network; or ``None`` to build one with
            ``method`` and ``adapter_kwargs`` around ``network`` (default: the evaluator's network).
        method: a registered adapter name or a preset (:data:`~monai_grata.tta.PRESETS`: ``"default"``,
            ``"paper"``, ...), used when ``adapter`` is ``None``; options given here win over a preset's
            (:func:`~monai_grata.tta.resolve_method`; ``None`` means "not set").
        network: the network to adapt when building the adapter.
        reset_key: a batch key (e.g. ``"domain"``): the adapter is reset to the source weights whenever its
            value changes, so each target domain starts from the source model (continual within a domain).
        patch_adaptation: adapt on patches (True), on the whole input (False), or on patches exactly when the
            evaluator's inferer is a ``SlidingWindowInferer`` (None, the default), with its roi_size and overlap.
        num_patches: patches per volume in patch adaptation.
        task: the segmentation task (a :class:`~monai_grata.data.TaskSpec` or a registered name), which fills the
            built adapter's ``multilabel`` and a volume's in-plane views (:func:`~monai_grata.tta.resolve_method`).
        ckpt_path: the source checkpoint the network was loaded from, whose calibration file gives a method's
            ``min_shift="calibrated"`` (the ``grata_calibrated`` preset's gate) its threshold.
        adapter_kwargs: the adapter's constructor arguments.
    """

    def __init__(
        self,
        adapter: TTAdapter | None = None,
        method: str = "grata",
        network: nn.Module | None = None,
        reset_key: str | None = None,
        patch_adaptation: bool | None = None,
        num_patches: int = 4,
        task: TaskSpec | str | None = None,
        ckpt_path: str | None = None,
        **adapter_kwargs: Any,
    ) -> None:
        self.adapter, self.method, self.network, self.adapter_kwargs = adapter, method, network, adapter_kwargs
        self.task, self.ckpt_path = task, ckpt_path
        self.reset_key, self.patch_adaptation, self.num_patches = reset_key, patch_adaptation, num_patches
        self.patches: PatchAdaptation | None = None
        self.history: list[AdaptationStep] = []
        self._last_group: Any = None
        self._frozen = contextlib.ExitStack()
        self._before = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._setup)
        engine.add_event_handler(Events.ITERATION_STARTED, self.adapt)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.publish)
        engine.add_event_handler(Events.COMPLETED, self._release)

    def _setup(self, engine: Engine) -> None:
        """Build the adapter on the evaluator's network (MONAI sets it after attaching handlers)."""
        network = getattr(engine, "network", None)
        if self.adapter is None:
            target = self.network if self.network is not None else network
            if target is None:
                raise ValueError("no network to adapt: pass `adapter` or `network`, or attach to a SupervisedEvaluator")
            name, options = resolve_method(
                self.method, overrides=self.adapter_kwargs, task=self.task, ckpt_path=self.ckpt_path
            )
            self.adapter = build_adapter(name, target, **options)
        if network is not None and network is not self.adapter.model:
            raise ValueError("the adapter must wrap the evaluator's own network object, or its forward sees no update")
        inferer = getattr(engine, "inferer", None)
        sliding = isinstance(inferer, SlidingWindowInferer)
        if self.patch_adaptation and not sliding:
            raise ValueError("patch_adaptation=True needs an evaluator with a SlidingWindowInferer (its roi_size)")
        use_patches = sliding if self.patch_adaptation is None else self.patch_adaptation
        self.patches = (
            PatchAdaptation(self.adapter, inferer.roi_size, self.num_patches, inferer.overlap) if use_patches else None
        )
        before = self.adapter.prediction_order == "before"
        self._before = before and self.patches is None and hasattr(engine, "inferer")
        if before and not self._before:
            logger.warning(
                "%s predicts before its update, but %s: the evaluator's prediction after the update is used",
                type(self.adapter).__name__,
                "patch adaptation has no whole-volume logits before it" if use_patches else "the engine has no "
                "inferer",
            )
        if not hasattr(engine, "inferer") and type(self.adapter).predict is not TTAdapter.predict:
            logger.warning(
                "%s predicts with its own predict(), but the engine has no inferer to run it: the engine's forward "
                "gives the network's prediction",
                type(self.adapter).__name__,
            )
        self.history = []
        self._last_group = None

    def _maybe_reset(self, batch: Any) -> None:
        group = batch.get(self.reset_key) if isinstance(batch, dict) else None
        group = group[0] if isinstance(group, (list, tuple)) else group
        if self._last_group is not None and group != self._last_group:
            self.adapter.reset()
        self._last_group = group

    def adapt(self, engine: Engine) -> None:
        """Prepare the batch as the evaluator will, and run one adaptation step on its images."""
        if self.reset_key is not None:
            self._maybe_reset(engine.state.batch)
        prepared = engine.prepare_batch(
            engine.state.batch, engine.state.device, engine.non_blocking, **getattr(engine, "to_kwargs", {})
        )
        self._release()
        if self._before:  # adapts; the evaluator's forward, next, returns the logits the update started from
            self._frozen.enter_context(_inferer_returning(engine, self.adapter(prepared[0])))
            step = self.adapter.last_step
        elif self.patches is None:
            step = self.adapter.adapt_batch(prepared[0])
        else:  # the evaluator's forward, next, runs under the patches' statistics until ITERATION_COMPLETED
            step = self.patches.adapt(prepared[0])
            self._frozen.enter_context(self.patches.frozen())
        if not self._before and hasattr(engine, "inferer"):
            self._frozen.enter_context(_inferer_predicting(engine, self.adapter.predict))
        if not self._before:  # the evaluator's forward is the batch's prediction: a following prior moves in it, and
            # a site gate records it, as in the adapter's own forward (each window of a sliding window counts)
            self._frozen.enter_context(track_test_statistics(self.adapter.model))
        engine.state.tta = step
        self.history.append(step)

    def _release(self, engine: Engine | None = None) -> None:
        """Undo what an iteration set up for the evaluator's forward (the patches' BatchNorm statistics, or the
        inferer that returns the logits from before the update)."""
        self._frozen.close()

    def publish(self, engine: Engine) -> None:
        """Add the step's statistics, by name, to every output item of the iteration."""
        self._release()
        scalars = engine.state.tta.scalars()
        if self.patches is not None:
            scalars["n_patches"] = torch.tensor(float(len(self.patches.positions)))
        output = engine.state.output
        for item in output if isinstance(output, (list, tuple)) else [output]:
            if isinstance(item, dict):
                item[STATS_KEY] = scalars


@contextlib.contextmanager
def _inferer_returning(engine: Engine, logits: torch.Tensor):
    """Within the block, the engine's inferer returns ``logits`` instead of running the network."""
    inferer = engine.inferer
    engine.inferer = lambda inputs, network, *args, **kwargs: logits
    try:
        yield
    finally:
        engine.inferer = inferer


@contextlib.contextmanager
def _inferer_predicting(engine: Engine, predict: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, the engine's inferer runs ``predict`` where it would run the network."""
    inferer = engine.inferer
    engine.inferer = lambda inputs, network, *args, **kwargs: inferer(inputs, predict, *args, **kwargs)
    try:
        yield
    finally:
        engine.inferer = inferer


class GraTaHandler(TTAHandler):
    """:class:`TTAHandler` running :class:`~monai_grata.tta.GraTa`; keyword arguments go to ``GraTa``.

    Example, in a user's own pipeline::

        evaluator = SupervisedEvaluator(device, loader, network, postprocessing=post,
                                        key_val_metric={"dice": MeanDice()},
                                        val_handlers=[GraTaHandler(beta=1e-4), StatsHandler(
                                            iteration_log=True, output_transform=tta_output_transform)])
    """

    def __init__(
        self,
        adapter: TTAdapter | None = None,
        network: nn.Module | None = None,
        reset_key: str | None = None,
        **grata_kwargs: Any,
    ) -> None:
        super().__init__(adapter=adapter, method="grata", network=network, reset_key=reset_key, **grata_kwargs)


def tta_output_transform(output: Any, keys: Sequence[str] | None = None) -> dict[str, float] | None:
    """``output_transform`` for ``StatsHandler``/``MLFlowHandler``: the adaptation statistics as floats.

    Args:
        output: ``engine.state.output`` of an evaluator running a :class:`TTAHandler`.
        keys: the statistics to keep (default: all).
    """
    item = output[0] if isinstance(output, (list, tuple)) and output else output
    stats = item.get(STATS_KEY) if isinstance(item, dict) else None
    if not stats:
        return None
    return {k: float(v) for k, v in stats.items() if keys is None or k in keys}
