"""Mean Dice per segment of a continual stream (consecutive images of one domain), adapted vs No Adapt.

    python scripts/stream_segments.py outputs/stream1000

Reads OUTPUT_DIR/per_image.csv and OUTPUT_DIR/no_adapt_per_image.csv of an inference.json run (with labels) and
prints a markdown table: one row per segment of the stream, in order, so that a domain visited twice shows
whether continual adaptation drifted between its two visits.
"""

from __future__ import annotations

import argparse
import os

from monai_grata.utils import mean_dice_of_rows, read_per_image_csv


def _dice_cell(dice: dict[str, float]) -> str:
    return f"{dice['dice_od']:.3f} / {dice['dice_oc']:.3f} / **{dice['dice_mean']:.3f}**"


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
    adapted = read_per_image_csv(os.path.join(args.output_dir, "per_image.csv"))
    source = read_per_image_csv(os.path.join(args.output_dir, "no_adapt_per_image.csv"))
    if [r["filename"] for r in adapted] != [r["filename"] for r in source]:
        raise ValueError("per_image.csv and no_adapt_per_image.csv list different images")
    print("| segment | images | adapted Dice OD / OC / **mean** | No Adapt Dice OD / OC / **mean** |")
    print("|---|---|---|---|")
    for k, (group, start, end) in enumerate(segments(adapted) + [("whole stream", 0, len(adapted))]):
        adapted_dice, source_dice = (mean_dice_of_rows(rows[start:end]) for rows in (adapted, source))
        label = group if group == "whole stream" else f"{k + 1}. {group}"
        print(f"| {label} | {start + 1}–{end} | {_dice_cell(adapted_dice)} | {_dice_cell(source_dice)} |")


if __name__ == "__main__":
    main()
