"""The tables and the figure of docs/results_spinalcord.md: the spinal-cord bundle's source models (one per training
seed) adapted to the held-out sites' volumes by each method, per volume.

    python scripts/spinalcord_results.py --dataset_dir $DATA_DIR/spinalcord --out outputs/spinalcord_results

The cells run in-process through the benchmark (``python -m monai_grata.benchmark --bundle bundles/spinalcord_gm``:
the bundle's network, preprocessing, sliding-window inferer with patch adaptation, and scoring on each volume's own
grid), one experiment per source model in the store ``--out/mlflow.db``; finished cells are reused. A method is a
benchmark method spec (``dua:n_augmentations=16`` is what the bundle's ``adapter_kwargs`` run). The source models
are ``--models DIR/train_spinalcord_seed<S>/source.pt``, written by train.json with ``--seed S``. The figure runs
evaluate.json (No Adapt) and inference.json (GraTa) of the first seed's model on every site's volumes, for their
mask files.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics

import nibabel as nib
import numpy as np

from monai_grata.benchmark import parse_method
from monai_grata.benchmark.__main__ import main as benchmark_main
from monai_grata.benchmark.store import BenchmarkStore, tracking_uri_of
from monai_grata.utils import run_bundle_once

BUNDLE = "bundles/spinalcord_gm"
CONFIGS = f"{BUNDLE}/configs"
HELD_OUT = ("philips", "milan", "ceitec")
SOURCES = ("ucl", "nwu", "juntendo")
METRICS = ("dice_gm", "dice_cord", "assd_gm", "assd_cord")

Rows = dict[str, dict[str, float]]


def volume_name(target: str, filename: str) -> str:
    return f"{target} {os.path.basename(filename).replace('_T2starw.nii.gz', '')}"


def read_cells(store: BenchmarkStore) -> tuple[dict[str, Rows], dict[str, float]]:
    """``{method: {"site volume": {metric: value}}}`` and ``{method: seconds adapting and predicting}`` of every
    finished cell in ``store`` (one experiment: one source model)."""
    cells: dict[str, Rows] = {}
    seconds: dict[str, float] = {}
    for record in store.finished().values():
        method, target = record["method"], record["target"]
        per_image = store.per_image_rows(record["run_id"])
        rows = {volume_name(target, r["filename"]): {m: float(r[m]) for m in METRICS} for r in per_image}
        cells.setdefault(method, {}).update(rows)
        seconds[method] = seconds.get(method, 0.0) + float(record["n_images"]) / float(record["images_per_s"])
    return cells, seconds


def run_cells(args: argparse.Namespace) -> tuple[dict[tuple[int, str], Rows], dict[tuple[int, str], float]]:
    """Run (or reuse) every (seed, method) cell; return their per-volume rows and seconds, ``"none"`` for No Adapt."""
    cells, seconds = {}, {}
    for seed in args.seeds:
        methods = ["none", *args.methods, *(args.extra_methods if seed == args.seeds[0] else [])]
        experiment = f"seed{seed}"
        benchmark_main(
            ["--bundle", BUNDLE, "--dataset_dir", args.dataset_dir, "--sources", "+".join(SOURCES),
             "--targets", *HELD_OUT, "--methods", *methods, "--device", args.device, "--output_dir", args.out,
             "--models_dir", os.path.join(args.models, f"train_spinalcord_seed{seed}"),
             "--checkpoint_name", "source.pt", "--experiment", experiment]
        )  # fmt: skip
        by_method, times = read_cells(BenchmarkStore(tracking_uri_of(args.out), experiment))
        cells.update({(seed, m): rows for m, rows in by_method.items()})
        seconds.update({(seed, m): t for m, t in times.items()})
    return cells, seconds


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def per_volume_table(cells: dict[tuple[int, str], Rows], methods: list[str], seeds: list[int]) -> str:
    """Markdown: one row per held-out volume and metric, one column per method (mean ± std over seeds)."""
    columns = {"No Adapt": "none", **{m: m for m in methods}}
    values: dict[tuple[str, str, str], list[float]] = {}
    for seed in seeds:
        for column, method in columns.items():
            for volume, row in cells[seed, method].items():
                for metric in METRICS:
                    values.setdefault((volume, metric, column), []).append(row[metric])
    volumes = sorted({v for v, _, _ in values})
    lines = ["| volume | metric | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for metric in METRICS:
        for volume in volumes + ["mean"]:
            row = []
            for column in columns:
                if volume == "mean":  # per seed the mean over volumes, then mean ± std over seeds
                    per_seed = [
                        statistics.mean(values[(v, metric, column)][i] for v in volumes)
                        for i in range(len(values[(volumes[0], metric, column)]))
                    ]
                    row.append(cell(per_seed))
                else:
                    row.append(cell(values[(volume, metric, column)]))
            lines.append(f"| {volume} | {metric} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def wall_times(seconds: dict[tuple[int, str], float]) -> str:
    lines = ["| seed | method | adapting and predicting (s) |", "|---|---|---|"]
    for (seed, method), value in sorted(seconds.items()):
        lines.append(f"| {seed} | {method} | {value:.0f} |")
    return "\n".join(lines)


def figure(args: argparse.Namespace, path: str) -> None:
    """One slice per site (the slice with the most gray matter): image, label, No Adapt, GraTa."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    ckpt = os.path.join(args.models, f"train_spinalcord_seed{args.seeds[0]}", "source.pt")
    no_adapt = os.path.join(args.out, "figure", "no_adapt")
    adapted = os.path.join(args.out, "figure", "grata")
    run_bundle_once(f"{CONFIGS}/evaluate.json", no_adapt, dataset_dir=args.dataset_dir, ckpt_path=ckpt,
                    device=args.device)  # fmt: skip
    run_bundle_once(f"{CONFIGS}/inference.json", adapted, dataset_dir=args.dataset_dir, ckpt_path=ckpt,
                    method="grata", sources="[]", source="+".join(SOURCES), device=args.device)  # fmt: skip
    sites = SOURCES + HELD_OUT
    colours = ListedColormap([(0, 0, 0, 0), (0.1, 0.8, 0.2, 0.55), (0.2, 0.4, 1.0, 0.8)])
    fig, axes = plt.subplots(len(sites), 4, figsize=(8, 2.1 * len(sites)))
    for row, site in zip(axes, sites, strict=True):
        image_path = sorted(glob.glob(os.path.join(args.dataset_dir, site, "images", "*.nii.gz")))[0]
        stem = os.path.basename(image_path).replace("_T2starw.nii.gz", "")
        image = np.asarray(nib.load(image_path).dataobj, dtype=np.float32)
        cord = np.asarray(nib.load(os.path.join(args.dataset_dir, site, "labels", f"{stem}_cord.nii.gz")).dataobj)
        gm = np.asarray(nib.load(os.path.join(args.dataset_dir, site, "labels", f"{stem}_gm.nii.gz")).dataobj)
        label = (cord > 0).astype(np.uint8) + (gm > 0)
        z = int(np.argmax((gm > 0).sum(axis=(0, 1))))
        cx, cy = np.argwhere(cord[..., z] > 0).mean(axis=0).astype(int)
        half = int(round(12 / nib.load(image_path).header.get_zooms()[0]))  # 24 mm around the cord
        window = (slice(max(cx - half, 0), cx + half), slice(max(cy - half, 0), cy + half), z)
        masks = [label]
        for folder in (no_adapt, adapted):
            masks.append(np.asarray(nib.load(os.path.join(folder, "masks", f"{stem}_T2starw_mask.nii.gz")).dataobj))
        shown = image[window]
        low, high = np.percentile(shown, (1, 99))
        for ax, mask, title in zip(row, [None, *masks], ["image", "label", "No Adapt", "GraTa"], strict=True):
            ax.imshow(shown.T, cmap="gray", vmin=low, vmax=high, origin="lower")
            if mask is not None:
                ax.imshow(mask[window].T, cmap=colours, vmin=0, vmax=2, origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if site == sites[0]:
                ax.set_title(title)
        kind = "source" if site in SOURCES else "held out"
        row[0].set_ylabel(f"{site}\n({kind}, z={z})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--models", default="outputs")
    parser.add_argument("--out", default="outputs/spinalcord_results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["norm", "tent", "grata"], help="benchmark method specs")
    parser.add_argument("--extra_methods", nargs="*", default=[], help="run for the first seed only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--figure", default="docs/images/spinalcord_slices.png")
    args = parser.parse_args()
    args.methods = [parse_method(m).label for m in args.methods]  # as the store names them
    args.extra_methods = [parse_method(m).label for m in args.extra_methods]
    cells, seconds = run_cells(args)
    print("## all seeds\n")
    print(per_volume_table(cells, args.methods, args.seeds))
    if args.extra_methods:
        print(f"\n## seed {args.seeds[0]}, every method\n")
        print(per_volume_table(cells, args.methods + args.extra_methods, args.seeds[:1]))
    print("\n## wall times\n")
    print(wall_times(seconds))
    if args.figure:
        figure(args, args.figure)
        print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
