"""Where a gated GraTa's shift gate opened, per benchmark cell, from the per-image statistics the benchmark keeps.

    python scripts/gate_report.py outputs/report_gate --method grata_gated

For every finished cell of ``--method`` in the store (a folder holding ``mlflow.db``, a ``.db`` file or a tracking
URI), reads the ``per_image.csv`` artifact and prints a markdown table: source, target, seed, images, images on
which the weights were updated (``adapt_lr`` > 0), and the lowest and last value of the stream's mean BatchNorm
shift (``adapt_stream_shift``, what the gate compares with ``min_shift``). The lowest value against the threshold
is the gate's margin on that stream.
"""

from __future__ import annotations

import argparse
import os

from monai_grata.benchmark import parse_method
from monai_grata.benchmark.store import BenchmarkStore, tracking_uri_of


def gate_rows(location: str, method: str, experiment: str = "benchmark") -> list[dict]:
    """One row per finished cell of ``method``: images, updated images, lowest and last stream shift.

    Args:
        location: a tracking URI, a ``.db`` file or a folder holding ``mlflow.db``.
        method: the method as the benchmark's ``--methods`` takes it (a preset name or a spec).
        experiment: the benchmark's experiment name.

    A cell whose per-image CSV has no ``adapt_stream_shift`` column (not a gated run, or run before the benchmark
    kept the adapter's statistics) gets ``None`` for the three statistics.
    """
    store = BenchmarkStore(tracking_uri_of(location), experiment)
    label = parse_method(method).label
    rows = []
    for cell in store.finished().values():
        if cell.get("method") != label:
            continue
        images = store.per_image_rows(cell["run_id"])
        row = {"source": cell["source"], "target": cell["target"], "seed": cell["seed"], "images": len(images)}
        row.update(updated=None, lowest_shift=None, last_shift=None)
        if images and "adapt_stream_shift" in images[0]:
            shifts = [float(image["adapt_stream_shift"]) for image in images]
            updated = sum(float(image.get("adapt_lr") or 0.0) > 0 for image in images)
            row.update(updated=updated, lowest_shift=min(shifts), last_shift=shifts[-1])
        rows.append(row)
    return sorted(rows, key=lambda r: (r["target"], r["source"], r["seed"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("location", help="a folder holding mlflow.db, a .db file or a tracking URI")
    parser.add_argument("--method", default="grata_gated", help="the gated method, as the benchmark names it")
    parser.add_argument("--experiment", default="benchmark")
    args = parser.parse_args()
    rows = gate_rows(args.location, args.method, args.experiment)
    if not rows:
        parser.error(f"no finished cell of {args.method!r} in {args.location}")
    print("| source | target | seed | images | updated | lowest stream shift | last stream shift |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["updated"] is None:
            stats = "no statistics in per_image.csv | | "
        else:
            stats = f"{r['updated']} | {r['lowest_shift']:.3f} | {r['last_shift']:.3f} "
        print(f"| {r['source']} | {r['target']} | {r['seed']} | {r['images']} | {stats}|")


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    main()
