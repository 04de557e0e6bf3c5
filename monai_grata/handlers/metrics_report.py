"""Per-image CSV and a ``metrics.json`` summary of the Dice/ASSD metric handlers of an evaluator."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from monai_grata.data.task import TaskSpec, resolve_task
from monai_grata.utils.files import atomic_write
from monai_grata.utils.per_image import finite_mean

__all__ = ["MetricsReport"]


def _batch_values(batch, key: str) -> list[str]:
    """Per-item values of ``key`` (a file name from tensor metadata, or a plain entry such as a domain name)
    in a collated batch (a dict) or a decollated one (a list of dicts)."""
    items = batch if isinstance(batch, (list, tuple)) else [batch]
    values: list[str] = []
    for item in items:
        value = item.get(key)
        if isinstance(value, torch.Tensor):
            value = (getattr(value, "meta", None) or {}).get("filename_or_obj", "")
        values += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return values


class MetricsReport:
    """Summarise per-channel Dice and ASSD of an evaluator into ``metrics.json`` and a per-image CSV.

    It reads the per-image details that MONAI's ``MeanDice`` and ``SurfaceDistance`` handlers keep
    (``save_details=True``), so attach it after them. At the end of the epoch it writes
    ``{output_dir}/{json_name}`` with ``dice_<c>``, ``assd_<c>`` for every channel name, ``dice_mean``,
    ``assd_mean`` and ``n_images`` (ASSD means are over the images where it is defined; ``n_assd_undefined``
    counts the others, e.g. an empty prediction), the same per group as ``<group>/dice_mean`` etc. when
    ``group_key`` is set, writes ``{output_dir}/{csv_name}`` with one row per image, and puts the summary
    into ``engine.state.metrics`` so that ``MLFlowHandler``/``StatsHandler`` attached after it log it.
    Inputs left out before the run (see :func:`monai_grata.data.check_inputs`) are listed in the JSON as
    ``skipped`` (``[{"image", "reason"}, ...]``) and counted as ``n_skipped``.

    Distributed (each rank evaluating its ``DistributedSampler`` share): MONAI's metric handlers gather the
    per-image details of all ranks, rank after rank; the report gathers the file names in the same order, so the
    summary covers every image on every rank, and only rank 0 writes the files. Attach it on every rank.

    Args:
        output_dir: the folder to write into (created if missing).
        channel_names: names of the output channels, e.g. ``("cord", "gm")``; default: the ``task``'s.
        dice_name: the name of the Dice metric handler.
        assd_name: the name of the ASSD (symmetric SurfaceDistance) metric handler; ``None`` for none.
        image_key: the batch key whose metadata names the images.
        group_key: an optional batch key (e.g. ``"domain"``) to summarise per group as well.
        json_name: the summary file name.
        csv_name: the per-image file name.
        extra: a callable returning more summary entries (e.g. the no-adapt scores of the same run).
        skipped: the inputs left out of the run, ``[{"image": path, "reason": text}, ...]``.
        task: the task (a :class:`~monai_grata.data.TaskSpec` or a registered name such as ``"fundus"``) whose
            channels these are, when ``channel_names`` is not given. One of the two is needed: no task is assumed.

    Raises:
        ValueError: neither ``channel_names`` nor ``task``.
        KeyError: an unknown task name.
    """

    def __init__(
        self,
        output_dir: str,
        channel_names: Sequence[str] | None = None,
        dice_name: str = "dice",
        assd_name: str | None = "assd",
        image_key: str = "image",
        group_key: str | None = None,
        json_name: str = "metrics.json",
        csv_name: str = "per_image.csv",
        extra: Callable[[], dict[str, float]] | None = None,
        skipped: Sequence[dict] | None = None,
        task: TaskSpec | str | None = None,
    ) -> None:
        task = resolve_task(task)
        if channel_names is None and task is None:
            raise ValueError(
                "MetricsReport needs the names of the scored channels: pass task= (a TaskSpec or a registered name, "
                'e.g. "task": "fundus" in a bundle config) or channel_names= (e.g. ["cord", "gm"])'
            )
        self.output_dir = output_dir
        self.channel_names = tuple(channel_names) if channel_names is not None else task.channels
        self.dice_name, self.assd_name, self.image_key, self.group_key = dice_name, assd_name, image_key, group_key
        self.json_name, self.csv_name, self.extra = json_name, csv_name, extra
        self.skipped = list(skipped or [])
        self.filenames: list[str] = []
        self.groups: list[str] = []
        self.summary: dict[str, float] = {}
        self.per_image: dict[str, torch.Tensor] = {}
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self.filenames, self.groups = [], []

    def _collect(self, engine: Engine) -> None:
        names = _batch_values(engine.state.batch, self.image_key)
        self.filenames += names
        self.groups += _batch_values(engine.state.batch, self.group_key) if self.group_key else [""] * len(names)

    def _details(self, engine: Engine, name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        details = engine.state.metric_details.get(name)
        if details is None:
            raise RuntimeError(f"no per-image details for metric {name!r}: attach its handler with save_details=True")
        return torch.as_tensor(details).float().reshape(len(self.filenames), -1).cpu()

    def _summarise(self, rows: torch.Tensor) -> dict[str, float]:
        summary: dict[str, float] = {}
        for c, name in enumerate(self.channel_names):
            summary[f"dice_{name}"] = finite_mean(self.per_image["dice"][rows, c])[0]
        summary["dice_mean"] = sum(summary[f"dice_{n}"] for n in self.channel_names) / len(self.channel_names)
        if "assd" in self.per_image:
            undefined = 0
            for c, name in enumerate(self.channel_names):
                summary[f"assd_{name}"], left_out = finite_mean(self.per_image["assd"][rows, c])
                undefined += left_out
            summary["assd_mean"] = sum(summary[f"assd_{n}"] for n in self.channel_names) / len(self.channel_names)
            summary["n_assd_undefined"] = undefined
        summary["n_images"] = int(rows.numel())
        return summary

    def _gather(self) -> None:
        """The names and groups of every rank, rank after rank (the order of MONAI's gathered details)."""
        if idist.get_world_size() > 1:
            self.filenames = [name for part in idist.all_gather(self.filenames) for name in part]
            self.groups = [group for part in idist.all_gather(self.groups) for group in part]

    def __call__(self, engine: Engine) -> None:
        self._gather()
        self.per_image = {"dice": self._details(engine, self.dice_name)}
        if self.assd_name is not None:
            self.per_image["assd"] = self._details(engine, self.assd_name)
        summary = self._summarise(torch.arange(len(self.filenames)))
        if self.group_key:
            for group in dict.fromkeys(self.groups):
                rows = torch.tensor([i for i, g in enumerate(self.groups) if g == group])
                summary.update({f"{group}/{k}": v for k, v in self._summarise(rows).items()})
        if self.extra is not None:
            summary.update(self.extra())
        if self.skipped:
            summary["n_skipped"] = len(self.skipped)
        self.summary = summary
        if idist.get_rank() == 0:
            self._write()
        engine.state.metrics.update({k: v for k, v in summary.items() if math.isfinite(v)})
        if self.assd_name in engine.state.metrics and "assd_mean" in summary:
            engine.state.metrics[self.assd_name] = summary["assd_mean"]
        self.logger.debug("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in summary.items()))

    def _write(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        with atomic_write(os.path.join(self.output_dir, self.json_name)) as f:
            written = {k: (v if math.isfinite(v) else None) for k, v in self.summary.items()}
            json.dump({**written, "skipped": self.skipped} if self.skipped else written, f, indent=2)
        header = ["filename"] + (["group"] if self.group_key else [])
        header += [f"{m}_{n}" for m in self.per_image for n in self.channel_names]
        with atomic_write(os.path.join(self.output_dir, self.csv_name), newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for i, name in enumerate(self.filenames):
                values = [f"{v:.6f}" for m in self.per_image for v in self.per_image[m][i].tolist()]
                writer.writerow([name] + ([self.groups[i]] if self.group_key else []) + values)
