"""Read back the per-image CSV that :class:`~monai_grata.handlers.MetricsReport` writes, and summarise rows of it."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence

__all__ = ["mean_dice_of_rows", "read_per_image_csv"]


def read_per_image_csv(path: str) -> list[dict[str, str]]:
    """The rows of a per-image CSV (``per_image.csv``, ``no_adapt_per_image.csv``), in stream order."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mean_dice_of_rows(rows: Sequence[dict[str, str]], channel_names: Sequence[str] = ("od", "oc")) -> dict[str, float]:
    """``dice_<channel>`` (mean over the rows where it is finite) for every channel, and ``dice_mean``, their
    average, as :class:`~monai_grata.handlers.MetricsReport` computes them.

    Args:
        rows: rows of a per-image CSV, e.g. a slice of :func:`read_per_image_csv`.
        channel_names: the channels whose ``dice_<name>`` columns to average.

    Raises:
        KeyError: when a ``dice_<name>`` column is missing.
    """
    summary = {}
    for name in channel_names:
        values = [float(row[f"dice_{name}"]) for row in rows]
        finite = [v for v in values if math.isfinite(v)]
        summary[f"dice_{name}"] = sum(finite) / len(finite) if finite else float("nan")
    summary["dice_mean"] = sum(summary[f"dice_{name}"] for name in channel_names) / len(channel_names)
    return summary
