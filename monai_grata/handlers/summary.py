"""The few lines a user reads at the end of a run: what ran, how well, where the outputs are."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ignite.engine import Engine, Events

from monai_grata.data.task import TaskSpec, resolve_task

from .metrics_report import MetricsReport

__all__ = ["RunSummary"]

OUTPUTS = {
    "masks": "masks/ (label maps{legend})",
    "overlays": "overlays/ (masks drawn over the images)",
    "metrics.json": "metrics.json",
    "per_image.csv": "per_image.csv",
    "stream.png": "stream.png",
    "config.json": "config.json",
}


class RunSummary:
    """Print a short summary when the evaluator completes: the method, the number of images and domains,
    Dice (mean over the structures) of the unadapted and the adapted model per domain and overall, how many
    images the adapter updated the weights on (and why not on the others), the files written, how to open the
    MLflow run, and the inputs left out.

    Args:
        output_dir: the run's output folder.
        method: the adaptation method (``"none"`` for none).
        source: the source domain of the model.
        report: the :class:`MetricsReport` of the evaluator (``None`` without labels).
        reference: the :class:`MetricsReport` of the unadapted model on the same images, or ``None``.
        tracking_uri: the MLflow tracking URI of the run.
        skipped: the inputs left out (``[{"image", "reason"}, ...]``).
        stream: where to print (default ``sys.stdout``).
        structures: the names of the segmented structures, for the Dice line (default: the ``task``'s, else the
            report's channel names).
        mask_legend: what the values of the written label maps mean (default: the ``task``'s, else none).
        tta_handler: the run's :class:`~monai_grata.handlers.TTAHandler`; its ``history`` of
            :class:`~monai_grata.tta.AdaptationStep` gives the count of updated batches (``updated`` and not rolled
            back) and of those a gated GraTa's shift gate held (``gate_open`` 0). Methods whose steps change nothing
            that persists (BatchNorm statistics alone) get no such line.
        task: the task (a :class:`~monai_grata.data.TaskSpec` or a registered name such as ``"fundus"``), for the
            default ``structures`` and ``mask_legend``.
    """

    def __init__(
        self,
        output_dir: str,
        method: str,
        source: str | None = None,
        report: MetricsReport | None = None,
        reference: MetricsReport | None = None,
        tracking_uri: str | None = None,
        skipped: Sequence[dict] = (),
        stream=None,
        structures: Sequence[str] | None = None,
        mask_legend: str | None = None,
        tta_handler=None,
        task: TaskSpec | str | None = None,
    ) -> None:
        task = resolve_task(task)
        if task is not None:
            structures = task.structures if structures is None else structures
            mask_legend = task.mask_legend if mask_legend is None else mask_legend
        self.output_dir, self.method, self.source = output_dir, method, source
        self.report, self.reference, self.tracking_uri = report, reference, tracking_uri
        self.skipped, self.stream = list(skipped), stream
        self.structures = None if structures is None else tuple(structures)
        self.mask_legend = mask_legend
        self.n_images, self.domains = 0, []
        self.tta_handler = tta_handler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def _dice_rows(self) -> list[str]:
        if self.report is None or not self.report.summary:
            return ["No labels: no Dice (the masks are the result)."]
        columns = (["No Adapt"] if self.reference is not None and self.reference.summary else []) + [self.method]
        structures = self.structures or self.report.channel_names
        title = f"Dice ({', '.join(structures)} mean)"
        widths = [max(10, len(c) + 2) for c in columns]  # a long method name keeps a gap to No Adapt
        lines = [f"  {title:<24}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))]
        domains = self.domains if len(self.domains) > 1 else []
        for name, key in [(d, f"{d}/dice_mean") for d in domains] + [("all", "dice_mean")]:
            values = [r.summary.get(key) for r in ([self.reference] if len(columns) == 2 else []) + [self.report]]
            cells = [f"{v:>{w}.3f}" if v is not None else f"{'-':>{w}}" for v, w in zip(values, widths, strict=True)]
            lines.append(f"  {name:<24}" + "".join(cells))
        return lines

    def _adaptation_rows(self) -> list[str]:
        history = getattr(self.tta_handler, "history", None) or []
        changes = next((step.changes for step in history if not step.skipped), None)
        if changes is None:
            return []
        updated = sum(step.updated and not step.rolled_back for step in history)
        line = f"Adaptation updated {changes} on {updated} of {len(history)} batches"
        # one host read per image, once the stream is done
        gates = [gate for step in history if (gate := getattr(step, "gate_open", None)) is not None]
        held = sum(not float(gate) for gate in gates)
        if held:
            line += f"; the shift gate (min_shift) held them on {held} (the stream looked like the source domain)"
        return [line + "."]

    def text(self) -> str:
        """The summary."""
        what = "no adaptation" if self.method == "none" else f"adapted with {self.method}"
        source = f"source model {self.source!r}, " if self.source else ""
        domains = f" in {len(self.domains)} domain{'s' if len(self.domains) != 1 else ''}" if self.domains else ""
        lines = ["", f"Done: {source}{what}, {self.n_images} images{domains}."]
        lines += self._dice_rows()
        lines += self._adaptation_rows()
        written = [
            text.format(legend=f": {self.mask_legend}" if self.mask_legend else "")
            for name, text in OUTPUTS.items()
            if os.path.exists(os.path.join(self.output_dir, name))
        ]
        lines.append(f"Outputs in {self.output_dir}: " + ", ".join(written))
        if self.tracking_uri:
            lines.append(
                f"MLflow: mlflow ui --backend-store-uri {self.tracking_uri}  (then open http://127.0.0.1:5000)"
            )
            lines.append(f"        python -m monai_grata.utils.compare_runs {self.output_dir}")
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} bad input(s) (listed in metrics.json when there are labels):")
            lines += [f"  {entry['reason']}" for entry in self.skipped[:5]]
            lines += [f"  ... and {len(self.skipped) - 5} more"] if len(self.skipped) > 5 else []
        return "\n".join(lines)

    def __call__(self, engine: Engine) -> None:
        self.n_images = engine.state.iteration * (getattr(engine.data_loader, "batch_size", None) or 1)
        data = getattr(getattr(engine.data_loader, "dataset", None), "data", None)
        if data is not None:
            self.n_images = len(data)
            self.domains = list(dict.fromkeys(str(item.get("domain")) for item in data if "domain" in item))
        print(self.text(), file=self.stream or sys.stdout, flush=True)
