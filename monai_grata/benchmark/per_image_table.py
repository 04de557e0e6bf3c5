"""One per-image metric of benchmark cells side by side: a row per (pair, image), a column per method (mean ± standard
deviation over seeds), and each method's worst per-image change against a baseline."""

from __future__ import annotations

import csv
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from .table import format_mean_std, mean_std, pair_label

__all__ = [
    "image_name",
    "per_image_values",
    "summarise_per_image",
    "worst_deltas",
    "write_per_image_csv",
    "write_per_image_markdown",
]

#: trailing extensions of an image file: ``.png``, ``.nii.gz`` (a part starting with a digit, ``.5``, is kept)
EXTENSIONS = re.compile(r"(\.[A-Za-z]\w{0,4})+$")
#: prefixes of the per-image metrics of which lower is better (a distance): their worst change is the highest
LOWER_IS_BETTER = ("assd_",)

PerImageValues = dict[tuple[str, str, str], list[float]]
"""``{(pair, image, method): the metric of that image in every seed's run}``."""


def image_name(filename: str) -> str:
    """An image's file name without its folders and extensions.

    Args:
        filename: the ``filename`` of a per-image row, e.g. ``philips/images/sub-9604_T2starw.nii.gz``
            (→ ``sub-9604_T2starw``).
    """
    base = os.path.basename(filename)
    return EXTENSIONS.sub("", base) or base


def _image_names(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """The :func:`image_name` of each row of one run; a name repeated within the run gets ``#2``, ``#3``, ... so
    that two images are never merged.

    Args:
        rows: one run's per-image rows, in stream order.
    """
    seen: Counter[str] = Counter()
    names = []
    for row in rows:
        name = image_name(row["filename"])
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


def per_image_values(
    records: Sequence[Mapping], rows_per_record: Sequence[Sequence[Mapping[str, str]]], metric: str
) -> PerImageValues:
    """Collect one per-image metric of every run by (pair, image, method).

    Args:
        records: benchmark records (``method``, ``source``, ``target``), one per run.
        rows_per_record: the rows of each record's ``per_image.csv``, in the order of ``records``.
        metric: the column to collect, e.g. ``dice_gm``; an image whose cell is empty (a column that only some
            images of the run reported) is left out of that run.

    Raises:
        ValueError: ``metric`` is a column of no run's ``per_image.csv``.
    """
    columns = list(dict.fromkeys(c for rows in rows_per_record for row in rows[:1] for c in row if c != "filename"))
    if metric not in columns:
        raise ValueError(f"no per-image column {metric!r} in the runs' per_image.csv; columns: {', '.join(columns)}")
    values: PerImageValues = defaultdict(list)
    for record, rows in zip(records, rows_per_record, strict=True):
        pair = pair_label(str(record["source"]), str(record["target"]))
        for name, row in zip(_image_names(rows), rows, strict=True):
            if row.get(metric):
                values[(pair, name, str(record["method"]))].append(float(row[metric]))
    return values


def summarise_per_image(values: PerImageValues, methods: Sequence[str], pairs: Sequence[str], metric: str) -> dict:
    """Mean and standard deviation over seeds of every (pair, image, method).

    Args:
        values: from :func:`per_image_values`.
        methods: the table's columns, in order (the main table's ``summary["methods"]``).
        pairs: the pairs, in order (the main table's ``summary["pairs"]``).
        metric: the metric's name.

    Returns:
        ``{"metric", "methods", "rows": [(pair, image)] (pairs in order, images in stream order), "cells":
        {(pair, image, method): (mean, std, n_seeds)}}``; an image a method has no value for has no cell.
    """
    rows = sorted(dict.fromkeys((pair, image) for pair, image, _ in values), key=lambda row: pairs.index(row[0]))
    cells = {key: (*mean_std(seeds), len(seeds)) for key, seeds in values.items()}
    return {"metric": metric, "methods": list(methods), "rows": rows, "cells": cells}


def worst_deltas(table: dict, baseline: str) -> dict[str, tuple[float, str, str]]:
    """Every method's worst change against ``baseline`` over the images both have a finite mean for: the lowest
    (the highest for a distance, :data:`LOWER_IS_BETTER`).

    Args:
        table: from :func:`summarise_per_image`.
        baseline: the method to compare with; no method is compared when it is not in the table.

    Returns:
        ``{method: (change of the seed means, pair, image)}``, without the baseline and methods with no such image.
    """
    cells, sign = table["cells"], -1.0 if table["metric"].startswith(LOWER_IS_BETTER) else 1.0
    worst = {}
    for method in table["methods"]:
        deltas = [
            (cells[(pair, image, method)][0] - cells[(pair, image, baseline)][0], pair, image)
            for pair, image in table["rows"]
            if method != baseline and (pair, image, method) in cells and (pair, image, baseline) in cells
        ]
        deltas = [d for d in deltas if math.isfinite(d[0])]
        if deltas:
            worst[method] = min(deltas, key=lambda d: sign * d[0])
    return worst


def write_per_image_markdown(table: dict, path: str, baseline: str | None = "none") -> str:
    """The table (a blank cell: the method has no value for that image) and a line per method with its worst
    per-image change against ``baseline``; returns the text written.

    Args:
        table: from :func:`summarise_per_image`.
        path: the file to write.
        baseline: the method the changes are taken against.
    """
    methods, cells = table["methods"], table["cells"]
    header = ["pair", "image", *methods]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for pair, image in table["rows"]:
        found = [cells.get((pair, image, m)) for m in methods]
        row = [format_mean_std(*cell[:2], digits=4) if cell else "" for cell in found]
        lines.append("| " + " | ".join([pair, image, *row]) + " |")
    worst = worst_deltas(table, baseline) if baseline else {}
    if worst:
        lines.append("")
    for method, (delta, pair, image) in worst.items():
        lines.append(f"- worst per-image Δ {table['metric']} vs {baseline}: {method}: {delta:+.4f} ({image}, {pair})")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def write_per_image_csv(table: dict, path: str) -> None:
    """One row per (pair, image): every method's mean and standard deviation over seeds (empty: no value).

    Args:
        table: from :func:`summarise_per_image`.
        path: the file to write.
    """
    methods, cells = table["methods"], table["cells"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["pair", "image", *[f"{m}_{s}" for m in methods for s in ("mean", "std")]])
        for pair, image in table["rows"]:
            stats = [cells[(pair, image, m)][:2] if (pair, image, m) in cells else ("", "") for m in methods]
            writer.writerow([pair, image, *[v if v == "" else f"{v:.6g}" for s in stats for v in s]])
