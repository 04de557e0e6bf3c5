"""Dice and adaptation statistics along a test stream: MLflow step metrics and a PNG plot."""

from __future__ import annotations

import logging
import os
import time

import torch
from ignite.engine import Engine, Events

from monai_grata.utils.files import atomic_write

from .metrics_report import MetricsReport
from .tta import TTAHandler

__all__ = ["StreamReport"]

logger = logging.getLogger(__name__)


class StreamReport:
    """At the end of an evaluation, log per-image Dice (and the adapter's cos and lr) as step metrics in the
    MLflow run of ``mlflow_handler``, and plot Dice and cos along the stream to ``{output_dir}/{plot_name}``.

    Attach it after ``report`` (whose per-image values it reads) and before ``mlflow_handler`` logs its
    artifacts at ``COMPLETED``.

    Args:
        report: the :class:`MetricsReport` of the same evaluator (``None`` when there are no labels).
        output_dir: where to write the plot.
        tta_handler: the :class:`TTAHandler` of the same evaluator, for cos and lr (``None`` without adaptation).
        mlflow_handler: a MONAI ``MLFlowHandler`` attached to the same evaluator; ``None`` to skip MLflow.
        plot_name: the plot's file name.
        window: the window of the running mean drawn over the per-image Dice.
    """

    def __init__(
        self,
        report: MetricsReport | None,
        output_dir: str,
        tta_handler: TTAHandler | None = None,
        mlflow_handler=None,
        plot_name: str = "stream.png",
        window: int = 20,
    ) -> None:
        self.report, self.output_dir, self.tta_handler = report, output_dir, tta_handler
        self.mlflow_handler, self.plot_name, self.window = mlflow_handler, plot_name, window

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def series(self) -> dict[str, list[float]]:
        """The per-image values along the stream: dice_od, dice_oc, cos, lr (those available)."""
        out: dict[str, list[float]] = {}
        if self.report is not None and "dice" in self.report.per_image:
            dice = self.report.per_image["dice"]
            for c, name in enumerate(self.report.channel_names):
                out[f"dice_{name}"] = dice[:, c].tolist()
        history = self.tta_handler.history if self.tta_handler is not None else []
        for key in ("cos", "lr"):
            if any(key in h for h in history):
                nan = torch.tensor(float("nan"))
                out[key] = torch.stack([h.get(key, nan).detach().cpu().float() for h in history]).tolist()
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
                for step, value in enumerate(values, start=1)
                if value == value  # NaN (undefined Dice, skipped step) is not logged
            ]
            for start in range(0, len(metrics), 1000):
                self.mlflow_handler.client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
        self.plot(series)

    def plot(self, series: dict[str, list[float]]) -> str:
        """Draw Dice (with a running mean) and cos along the stream; return the file path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        dice_keys = [k for k in series if k.startswith("dice_")]
        panels = [p for p in (dice_keys, [k for k in ("cos",) if k in series]) if p]
        fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), sharex=True, squeeze=False)
        for ax, keys in zip(axes[:, 0], panels, strict=True):
            for key in keys:
                values = torch.tensor(series[key])
                steps = torch.arange(1, len(values) + 1)
                ax.plot(steps, values, ".", alpha=0.35, label=key)
                finite = torch.nan_to_num(values, nan=0.0)
                counts = torch.isfinite(values).float()
                k = max(1, min(self.window, len(values)))
                kernel = torch.ones(1, 1, k)
                num = torch.nn.functional.conv1d(finite[None, None], kernel, padding=k - 1)[0, 0, : len(values)]
                den = torch.nn.functional.conv1d(counts[None, None], kernel, padding=k - 1)[0, 0, : len(values)]
                ax.plot(steps, num / den.clamp_min(1), "-", label=f"{key} (running mean, {k})")
            ax.set_ylabel("Dice" if keys[0].startswith("dice") else "cos(g_aux, g_pseudo)")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower left", fontsize=8)
        axes[-1, 0].set_xlabel("test image (stream order)")
        fig.tight_layout()
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, self.plot_name)
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        return path
