"""Table 1 of the GraTa paper from benchmark records: rows are methods, columns source→target pairs and their
average, mean ± standard deviation over seeds; a CSV of every metric and a bar chart of mean Dice."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence

from .cells import VAL_SUFFIX

__all__ = [
    "channels_of",
    "format_mean_std",
    "mean_std",
    "method_colours",
    "metrics_of",
    "pair_label",
    "summarise",
    "write_chart",
    "write_csv",
    "write_markdown",
]


def metrics_of(channels: Sequence[str]) -> tuple[str, ...]:
    """The metrics a table keeps for a task's channels: ``dice_<c>``..., ``dice_mean``, ``assd_<c>``...,
    ``images_per_s``."""
    return (*[f"dice_{c}" for c in channels], "dice_mean", *[f"assd_{c}" for c in channels], "images_per_s")


def channels_of(records: Sequence[Mapping]) -> tuple[str, ...]:
    """The channel names of benchmark records: their ``channels`` param (``"od,oc"``) when the store has it, else
    the names of their ``dice_<c>`` metrics (records of stores written before cells logged their channels)."""
    for r in records:
        if r.get("channels"):
            return tuple(str(r["channels"]).split(","))
    names = dict.fromkeys(k[len("dice_") :] for r in records for k in r if k.startswith("dice_") and k != "dice_mean")
    return tuple(names)


def pair_label(source: str, target: str) -> str:
    return f"{source}→{target}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite ``values`` (NaN where there are too few)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else float("nan")


def summarise(records: Sequence[Mapping], channels: Sequence[str] | None = None) -> dict:
    """Aggregate records (``method``, ``source``, ``target``, ``seed`` and the metrics) over seeds.

    Args:
        records: one per cell and seed.
        channels: the task's channel names (default: read from the records, :func:`channels_of`).

    Returns:
        ``{"methods": [...], "pairs": [...], "shift_pairs": [...], "cells": {(method, pair): {metric: (mean, std,
        n_seeds)}}, "average": {method: (mean, std) of the per-seed mean Dice over the shift pairs},
        "speed": {method: mean images per second}, "metrics": the metrics kept}``. Pairs whose target is
        ``DOMAIN:val`` (no shift) are kept out of the average.
    """
    metrics = metrics_of(channels_of(records) if channels is None else channels)
    methods = list(dict.fromkeys(str(r["method"]) for r in records))
    pairs = list(dict.fromkeys(pair_label(str(r["source"]), str(r["target"])) for r in records))
    shift_pairs = [p for p in pairs if not p.endswith(VAL_SUFFIX)]
    grouped: dict[tuple[str, str], list[Mapping]] = defaultdict(list)
    for r in records:
        grouped[(str(r["method"]), pair_label(str(r["source"]), str(r["target"])))].append(r)
    cells = {}
    for key, rows in grouped.items():
        cells[key] = {m: (*mean_std([float(r[m]) for r in rows if m in r]), len(rows)) for m in metrics}
    average, speed = {}, {}
    for method in methods:
        per_seed: dict[str, list[float]] = defaultdict(list)
        for pair in shift_pairs:
            for r in grouped.get((method, pair), []):
                per_seed[str(r["seed"])].append(float(r["dice_mean"]))
        complete = [statistics.fmean(v) for v in per_seed.values() if len(v) == len(shift_pairs)]
        if complete:  # mean ± std over the seeds that ran every pair
            average[method] = mean_std(complete)
        rates = [float(r["images_per_s"]) for (m, _), rows in grouped.items() if m == method for r in rows]
        speed[method] = mean_std(rates)[0]
    return {"methods": methods, "pairs": pairs, "shift_pairs": shift_pairs, "cells": cells, "average": average,
            "speed": speed, "metrics": metrics}  # fmt: skip


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``mean ± std`` to ``digits`` decimals (``–`` for a missing mean, no ``±`` for a missing std)."""
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def write_markdown(summary: dict, path: str, baseline: str | None = "none") -> str:
    """Mean Dice (averaged over the channels) per method and pair, the average over the shifted pairs, the change
    against ``baseline`` (average and worst pair) and images per second; returns the text written."""
    pairs, cells = summary["pairs"], summary["cells"]
    has_baseline = baseline in summary["methods"]
    header = ["method", *pairs, "average"] + (["Δ avg", "worst Δ"] if has_baseline else []) + ["images/s"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for method in summary["methods"]:
        row = [method]
        row += [format_mean_std(*cells[(method, p)]["dice_mean"][:2]) if (method, p) in cells else "–" for p in pairs]
        row.append(format_mean_std(*summary["average"].get(method, (float("nan"), float("nan"))), digits=4))
        if has_baseline:
            deltas = [
                cells[(method, p)]["dice_mean"][0] - cells[(baseline, p)]["dice_mean"][0]
                for p in summary["shift_pairs"]
                if (method, p) in cells and (baseline, p) in cells
            ]
            avg, base = summary["average"].get(method), summary["average"].get(baseline)
            row.append(f"{avg[0] - base[0]:+.4f}" if avg and base else "–")
            row.append(f"{min(deltas):+.3f}" if deltas else "–")
        row.append(f"{summary['speed'].get(method, float('nan')):.2f}")
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def write_csv(summary: dict, path: str) -> None:
    """One row per (method, pair): mean, standard deviation and number of seeds of every metric."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        metrics = summary["metrics"]
        writer.writerow(["method", "pair", "n_seeds", *[f"{m}_{s}" for m in metrics for s in ("mean", "std")]])
        for (method, pair), stats in summary["cells"].items():
            n = stats["dice_mean"][2]
            writer.writerow([method, pair, n, *[f"{v:.6g}" for m in metrics for v in stats[m][:2]]])


def method_colours(n_methods: int) -> list[tuple[float, float, float]]:
    """One colour per method: matplotlib's tab10 up to ten methods, tab20 beyond (tab10 repeats its colours, so the
    benchmark's eleven methods would have two bars of one colour), cycling past twenty.

    Args:
        n_methods: the number of methods in the chart.
    """
    from matplotlib import colormaps

    palette = colormaps["tab10" if n_methods <= 10 else "tab20"].colors
    return [tuple(palette[i % len(palette)]) for i in range(n_methods)]


def write_chart(summary: dict, path: str) -> None:
    """A grouped bar chart of mean Dice: one group per pair, one bar per method (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, methods = summary["pairs"], summary["methods"]
    width = 0.8 / max(len(methods), 1)
    colours = method_colours(len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(pairs) + 2), 4))
    for i, method in enumerate(methods):
        stats = [summary["cells"].get((method, p), {}).get("dice_mean", (float("nan"), float("nan"), 0)) for p in pairs]
        ax.bar(
            [j + (i - (len(methods) - 1) / 2) * width for j in range(len(pairs))],
            [s[0] for s in stats],
            width,
            yerr=[s[1] if math.isfinite(s[1]) else 0.0 for s in stats],
            label=method,
            color=colours[i],
        )
    ax.set_xticks(range(len(pairs)), pairs, rotation=20, ha="right", fontsize=8)
    channels = [m[len("dice_") :] for m in summary["metrics"] if m.startswith("dice_") and m != "dice_mean"]
    ax.set_ylabel(f"mean Dice ({', '.join(channels)})")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside the axes: never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
