"""Per-image metrics: the finite-value mean that :class:`~monai_grata.handlers.MetricsReport` summarises with, and
reading back (and summarising rows of) the per-image CSV it writes."""

from __future__ import annotations

import csv
from collections.abc import Sequence

import torch

__all__ = ["channels_of_rows", "finite_mean", "mean_dice_of_rows", "read_per_image_csv"]


def finite_mean(values: torch.Tensor) -> tuple[float, int]:
    """Mean of the finite values (NaN when there is none) and the number left out (NaN Dice: empty label and
    prediction; Inf ASSD: an empty prediction)."""
    finite = values[torch.isfinite(values)]
    mean = float(finite.mean()) if finite.numel() else float("nan")
    return mean, int(values.numel() - finite.numel())


def read_per_image_csv(path: str) -> list[dict[str, str]]:
    """The rows of a per-image CSV (``per_image.csv``, ``no_adapt_per_image.csv``), in stream order."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def channels_of_rows(rows: Sequence[dict[str, str]]) -> tuple[str, ...]:
    """The channel names of a per-image CSV's rows: its ``dice_<name>`` columns in order (``dice_mean`` aside)."""
    return tuple(k[len("dice_") :] for k in (rows[0] if rows else {}) if k.startswith("dice_") and k != "dice_mean")


def mean_dice_of_rows(rows: Sequence[dict[str, str]], channel_names: Sequence[str] | None = None) -> dict[str, float]:
    """``dice_<channel>`` (mean over the rows where it is finite) for every channel, and ``dice_mean``, their
    average, with :func:`finite_mean` as :class:`~monai_grata.handlers.MetricsReport` computes them.

    Args:
        rows: rows of a per-image CSV, e.g. a slice of :func:`read_per_image_csv`.
        channel_names: the channels whose ``dice_<name>`` columns to average (default: every ``dice_<name>``
            column, :func:`channels_of_rows`).

    Raises:
        KeyError: when a ``dice_<name>`` column is missing.
        ValueError: no channel names given and no ``dice_<name>`` column to read them from.
    """
    channel_names = channels_of_rows(rows) if channel_names is None else tuple(channel_names)
    if not channel_names:
        raise ValueError("no dice_<name> columns in the rows: pass channel_names")
    summary = {}
    for name in channel_names:
        values = torch.tensor([float(row[f"dice_{name}"]) for row in rows], dtype=torch.float64)
        summary[f"dice_{name}"] = finite_mean(values)[0]
    summary["dice_mean"] = sum(summary[f"dice_{name}"] for name in channel_names) / len(channel_names)
    return summary
