"""Mean Dice per segment of a continual stream (consecutive images of one domain), adapted vs No Adapt.

    python scripts/stream_segments.py outputs/stream1000

Reads OUTPUT_DIR/per_image.csv and OUTPUT_DIR/no_adapt_per_image.csv of an inference.json run (with labels) and
prints a markdown table: one row per segment of the stream, in order, so that a domain visited twice shows
whether continual adaptation drifted between its two visits.
"""

from __future__ import annotations

import argparse
import csv
import math
import os


def read_rows(path: str) -> list[dict[str, str]]:
    """The rows of a per-image CSV."""
    with open(path) as f:
        return list(csv.DictReader(f))


def mean_dice(rows: list[dict[str, str]]) -> tuple[float, float, float]:
    """Mean OD, OC and average Dice over the rows, ignoring undefined (non-finite) values."""
    means = []
    for channel in ("od", "oc"):
        values = [float(r[f"dice_{channel}"]) for r in rows if math.isfinite(float(r[f"dice_{channel}"]))]
        means.append(sum(values) / len(values) if values else float("nan"))
    return means[0], means[1], (means[0] + means[1]) / 2


def segments(rows: list[dict[str, str]]) -> list[tuple[str, int, int]]:
    """(group, first row, end row) of every run of consecutive rows with the same group."""
    found: list[tuple[str, int, int]] = []
    for i, row in enumerate(rows):
        if found and found[-1][0] == row["group"]:
            found[-1] = (row["group"], found[-1][1], i + 1)
        else:
            found.append((row["group"], i, i + 1))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="the output folder of an inference.json run")
    args = parser.parse_args()
    adapted = read_rows(os.path.join(args.output_dir, "per_image.csv"))
    source = read_rows(os.path.join(args.output_dir, "no_adapt_per_image.csv"))
    if [r["filename"] for r in adapted] != [r["filename"] for r in source]:
        raise ValueError("per_image.csv and no_adapt_per_image.csv list different images")
    print("| segment | images | adapted Dice OD / OC / **mean** | No Adapt Dice OD / OC / **mean** |")
    print("|---|---|---|---|")
    for k, (group, start, end) in enumerate(segments(adapted) + [("whole stream", 0, len(adapted))]):
        a, s = mean_dice(adapted[start:end]), mean_dice(source[start:end])
        label = group if group == "whole stream" else f"{k + 1}. {group}"
        print(
            f"| {label} | {start + 1}–{end} | {a[0]:.3f} / {a[1]:.3f} / **{a[2]:.3f}** "
            f"| {s[0]:.3f} / {s[1]:.3f} / **{s[2]:.3f}** |"
        )


if __name__ == "__main__":
    main()
