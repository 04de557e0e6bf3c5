"""The No-Adapt reference: the source model on the same stream, scored before the adapted run starts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose
from torch import nn

from monai_grata.data.task import TaskSpec
from monai_grata.engines.interrupt import stop_when_interrupted

from .metrics_report import MetricsReport

__all__ = ["NoAdaptReference"]


class NoAdaptReference:
    """When the evaluator it is attached to starts, run the unadapted source model over the same data loader (and
    inferer) with its own metrics, and keep their :class:`MetricsReport` (``no_adapt_metrics.json``,
    ``no_adapt_per_image.csv``): the reference the adapted run is compared with, image by image.

    Attach it before the handlers that start logging (MLflow), so the reference pass is not part of the run's
    timing, and before a :class:`~monai_grata.handlers.TTAHandler` changes anything. ``network`` must be a model
    of its own, not the one the adapter updates.

    Args:
        network: the source model (loaded with the source weights, evaluated as it is).
        postprocessing: the transforms from the network's output to the scored prediction (a list is composed).
        metrics: metric handlers by name: ``{"dice": MeanDice(...)}`` and optionally ``"assd"`` (symmetric
            surface distance), both with ``save_details=True`` (the default); the first is the key metric.
            Handlers of their own, not those of the adapted run's evaluator.
        output_dir: where the report writes.
        channel_names: names of the output channels, for the report (default: the task's).
        group_key: the batch key to summarise per group (e.g. ``"domain"``), or ``None``.
        extra_metrics: the summary entries, by substring, that :meth:`extra` offers the adapted run's report.
        json_name: the report's summary file.
        csv_name: the report's per-image file.
        progress: the progress bar's label for the reference pass, or ``None`` for no progress bar.
        task: the task (or its name, e.g. ``"fundus"``) whose channel names the report uses.
    """

    def __init__(
        self,
        network: nn.Module,
        postprocessing: Callable | Sequence[Callable],
        metrics: Mapping,
        output_dir: str,
        channel_names: Sequence[str] | None = None,
        group_key: str | None = "domain",
        extra_metrics: Sequence[str] = ("dice",),
        json_name: str = "no_adapt_metrics.json",
        csv_name: str = "no_adapt_per_image.csv",
        progress: str | None = "no adaptation",
        task: TaskSpec | str | None = None,
    ) -> None:
        if not metrics:
            raise ValueError("the No-Adapt reference needs at least one metric to score")
        self.network, self.metrics, self.extra_metrics = network, dict(metrics), tuple(extra_metrics)
        self.postprocessing = Compose(list(postprocessing)) if isinstance(postprocessing, Sequence) else postprocessing
        self.progress = progress
        self.report = MetricsReport(
            output_dir,
            channel_names,
            dice_name="dice",
            assd_name="assd" if "assd" in self.metrics else None,
            group_key=group_key,
            json_name=json_name,
            csv_name=csv_name,
            task=task,
        )

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.run)

    def run(self, engine: Engine) -> None:
        """Score the source model on ``engine``'s data loader, with ``engine``'s device and inferer. A Ctrl-C during
        this pass, in a job run by :func:`~monai_grata.engines.run_interruptibly`, stops it after the current image
        and ends the job (not only after the whole pass)."""
        names = list(self.metrics)
        handlers = ([ProgressBar(desc=self.progress)] if self.progress is not None else []) + [self.report]
        evaluator = SupervisedEvaluator(
            device=engine.state.device,
            val_data_loader=engine.data_loader,
            network=self.network,
            inferer=getattr(engine, "inferer", None),
            postprocessing=self.postprocessing,
            key_val_metric={names[0]: self.metrics[names[0]]},
            additional_metrics={name: self.metrics[name] for name in names[1:]} or None,
            val_handlers=handlers,
            amp=False,
        )
        stop_when_interrupted(evaluator)
        evaluator.run()

    def extra(self) -> dict[str, float]:
        """The reference's summary entries named by ``extra_metrics``, as ``no_adapt_<name>`` (for the adapted
        run's :class:`MetricsReport` ``extra``)."""
        summary = self.report.summary or {}
        return {f"no_adapt_{k}": v for k, v in summary.items() if any(m in k for m in self.extra_metrics)}
