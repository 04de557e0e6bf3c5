"""Dice and adaptation statistics along a test stream: MLflow step metrics and a PNG plot."""

from __future__ import annotations

import logging
import os
import time

import torch
from ignite.engine import Engine, Events

from monai_grata.utils.files import atomic_write

from .metrics_report import MetricsReport, _batch_values
from .tta import TTAHandler

__all__ = ["StreamReport"]

logger = logging.getLogger(__name__)


class StreamReport:
    """At the end of an evaluation, log per-image Dice as step metrics ``stream/dice_<channel>`` in the MLflow
    run of ``mlflow_handler``, and plot Dice and cos along the stream to ``{output_dir}/{plot_name}``.

    The plot marks every change of domain (where the adapter is reset to the source model, with the domain's
    name), and draws the running mean of the unadapted model's Dice on the same images (``reference``) as a
    dashed line. The adapter's cos and lr are plotted but not logged here: ``MLFlowHandler`` with
    ``tta_output_transform`` logs them per iteration already.

    Attach it after ``report`` (whose per-image values it reads) and before ``mlflow_handler`` logs its
    artifacts at ``COMPLETED``.

    Args:
        report: the :class:`MetricsReport` of the same evaluator (``None`` when there are no labels).
        output_dir: where to write the plot.
        tta_handler: the :class:`TTAHandler` of the same evaluator, for cos and lr (``None`` without adaptation).
        mlflow_handler: a MONAI ``MLFlowHandler`` attached to the same evaluator; ``None`` to skip MLflow.
        plot_name: the plot's file name.
        window: the window of the running mean drawn over the per-image Dice.
        reference: the :class:`MetricsReport` of the unadapted model on the same stream (No Adapt), or ``None``.
        group_key: the batch key naming each image's domain (the plot marks where it changes), or ``None``.
    """

    def __init__(
        self,
        report: MetricsReport | None,
        output_dir: str,
        tta_handler: TTAHandler | None = None,
        mlflow_handler=None,
        plot_name: str = "stream.png",
        window: int = 20,
        reference: MetricsReport | None = None,
        group_key: str | None = "domain",
    ) -> None:
        self.report, self.output_dir, self.tta_handler = report, output_dir, tta_handler
        self.mlflow_handler, self.plot_name, self.window = mlflow_handler, plot_name, window
        self.reference, self.group_key = reference, group_key
        self.groups: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self.groups = []

    def _collect(self, engine: Engine) -> None:
        if self.group_key is not None:
            self.groups += _batch_values(engine.state.batch, self.group_key)

    def series(self) -> dict[str, list[float]]:
        """The per-image values along the stream: ``dice_<channel>`` and ``no_adapt_dice_<channel>`` for the report's
        channels (e.g. ``dice_od`` for fundus), ``cos``, ``lr`` (those available)."""
        out: dict[str, list[float]] = {}
        for prefix, report in (("", self.report), ("no_adapt_", self.reference)):
            if report is not None and "dice" in report.per_image:
                dice = report.per_image["dice"]
                for c, name in enumerate(report.channel_names):
                    out[f"{prefix}dice_{name}"] = dice[:, c].tolist()
        history = self.tta_handler.history if self.tta_handler is not None else []
        for key in ("cos", "lr"):
            values = [getattr(step, key, None) for step in history]
            if any(v is not None for v in values):
                nan = torch.tensor(float("nan"))
                out[key] = torch.stack([(nan if v is None else v).detach().cpu().float() for v in values]).tolist()
        return out

    def __call__(self, engine: Engine) -> None:
        series = self.series()
        if not series:
            return
        run = getattr(self.mlflow_handler, "cur_run", None)
        if run is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [
                Metric(f"stream/{key}", value, now, step)
                for key, values in series.items()
                if key.startswith("dice_")
                for step, value in enumerate(values, start=1)
                if value == value  # NaN (undefined Dice) is not logged
            ]
            for start in range(0, len(metrics), 1000):
                self.mlflow_handler.client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
        self.plot(series)

    def _running_mean(self, values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The mean of the last ``window`` finite values at every step, and the window used."""
        finite, counts = torch.nan_to_num(values, nan=0.0), torch.isfinite(values).float()
        k = max(1, min(self.window, len(values)))
        kernel = torch.ones(1, 1, k)
        num = torch.nn.functional.conv1d(finite[None, None], kernel, padding=k - 1)[0, 0, : len(values)]
        den = torch.nn.functional.conv1d(counts[None, None], kernel, padding=k - 1)[0, 0, : len(values)]
        return num / den.clamp_min(1), k

    def domain_starts(self) -> list[tuple[int, str]]:
        """``(first step, domain)`` of every domain along the stream (steps count from 1)."""
        return [(i + 1, g) for i, g in enumerate(self.groups) if i == 0 or g != self.groups[i - 1]]

    def plot(self, series: dict[str, list[float]]) -> str:
        """Draw Dice (with a running mean, and the No-Adapt running mean dashed) and cos along the stream, with
        the domain changes marked; return the file path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        dice_keys = [k for k in series if k.startswith("dice_")]
        panels = [p for p in (dice_keys, [k for k in ("cos",) if k in series]) if p]
        fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), sharex=True, squeeze=False)
        for ax, keys in zip(axes[:, 0], panels, strict=True):
            for i, key in enumerate(keys):
                values = torch.tensor(series[key])
                steps = torch.arange(1, len(values) + 1)
                ax.plot(steps, values, ".", color=f"C{i}", alpha=0.35, label=key)
                mean, k = self._running_mean(values)
                ax.plot(steps, mean, "-", color=f"C{i}", label=f"{key} (running mean, {k})")
                if f"no_adapt_{key}" in series:
                    reference, _ = self._running_mean(torch.tensor(series[f"no_adapt_{key}"]))
                    ax.plot(steps, reference, "--", color=f"C{i}", alpha=0.8, label=f"No Adapt {key} (running mean)")
            for n, (step, domain) in enumerate(self.domain_starts()):
                if n:  # the adapter is reset to the source model here
                    ax.axvline(step - 0.5, color="k", linestyle=":", linewidth=1)
                ax.annotate(domain, (step - 0.5, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -10),
                            textcoords="offset points", fontsize=8)  # fmt: skip
            ax.set_ylabel("Dice" if keys[0].startswith("dice") else "cos(g_aux, g_pseudo)")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower left", fontsize=7)
        axes[-1, 0].set_xlabel("test image (stream order; dotted line: new domain, model reset to the source)")
        fig.tight_layout()
        path = os.path.join(self.output_dir, self.plot_name)
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        return path
