"""docs/results.md: No Adapt, TENT and GraTa (with the Table 2 ablations) for every source -> target pair.

    python scripts/tta_results.py --dataset_dir ../shared/data/fundus --out outputs/tta_results

Each cell is one `python -m monai.bundle run --config_file bundles/grata/configs/inference.json` run on all
images of the target domain, or its first `--max_images` in datalist order (continual within the domain, model
rebuilt from the source checkpoint), seed 0.
No Adapt is the source model scored in the same run as GraTa. Finished cells (metrics.json present) are
reused, so the script can be stopped and restarted; with `--max_images N`, a finished run of the same cell on
more images is summarised over its first N images instead of run again. Prints markdown tables (OD, OC, mean Dice).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

from monai_grata.utils import mean_dice_of_rows, read_per_image_csv, run_bundle_once

DOMAINS = ("drishti_gs", "refuge_train", "refuge_val")
# name -> inference.json overrides (Table 2 of the paper: objective at theta or theta', fixed or dynamic lr)
METHODS = {
    "BN statistics only": {"method": "norm"},
    "TENT": {"method": "tent", "tent_lr": 0.0001},
    "L_con(θ), lr β": {"method": "grata", "align": False, "dynamic_lr": False},
    "L_con(θ'), lr β": {"method": "grata", "align": True, "dynamic_lr": False},
    "GraTa (L_con(θ'), lr η)": {"method": "grata"},
}


def summarise_first(cell: str, n: int) -> dict:
    """Dice means over the first ``n`` images of a finished cell, adapted and No Adapt, from its per-image CSVs.

    Adaptation is continual and causal, so the first ``n`` images of a longer run score exactly as a run of
    ``n`` images would.
    """
    metrics = {}
    for prefix, name in (("", "per_image.csv"), ("no_adapt_", "no_adapt_per_image.csv")):
        rows = read_per_image_csv(os.path.join(cell, name))[:n]
        metrics.update({prefix + key: value for key, value in mean_dice_of_rows(rows).items()})
    metrics["n_images"] = len(rows)
    return metrics


def run_cell(args: argparse.Namespace, source: str, target: str, name: str, overrides: dict) -> dict:
    """Run (or reuse) one cell in ``OUT/first{N}`` (``OUT/all`` without ``--max_images``); a finished run on
    more images of the same pair and method is reused through :func:`summarise_first` instead."""
    slug = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
    pair = f"{source}_to_{target}"
    for folder in sorted(glob.glob(os.path.join(args.out, "*", pair, slug, "metrics.json"))):
        cell = os.path.dirname(folder)
        with open(folder) as f:
            n_images = json.load(f)["n_images"]
        if args.max_images and n_images > args.max_images:
            return summarise_first(cell, args.max_images)
    subset = f"first{args.max_images}" if args.max_images else "all"
    return run_bundle_once(
        "bundles/grata/configs/inference.json", os.path.join(args.out, subset, pair, slug),
        dataset_dir=args.dataset_dir, datalist=args.datalist, source=source, target=target, device=args.device,
        seed=args.seed, **({"max_images": args.max_images} if args.max_images else {}), **overrides,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default="../shared/data/fundus")
    parser.add_argument("--datalist", default=None, help="default: DATASET_DIR/datalist.json")
    parser.add_argument("--out", default="outputs/tta_results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--max_images", type=int, default=None, help="first N images of each target (default: all)")
    args = parser.parse_args()
    args.datalist = args.datalist or os.path.join(args.dataset_dir, "datalist.json")
    pairs = [
        (s, t) for s in DOMAINS for t in DOMAINS if s != t and os.path.isfile(f"bundles/grata/models/source_{s}.pt")
    ]
    rows: dict[str, list[dict]] = {"No Adapt": []}
    for source, target in pairs:
        for name in args.methods:
            metrics = run_cell(args, source, target, name, METHODS[name])
            rows.setdefault(name, []).append(metrics)
            if name == args.methods[-1] and "no_adapt_dice_mean" in metrics:
                rows["No Adapt"].append(
                    {k[len("no_adapt_") :]: v for k, v in metrics.items() if k.startswith("no_adapt_")}
                )
    header = " | ".join(f"{s}→{t}" for s, t in pairs)
    print(f"| method | {header} | average |\n|---|" + "---|" * (len(pairs) + 1))
    for name, results in rows.items():
        if len(results) != len(pairs):
            continue
        cells = [f"{m['dice_od']:.3f} / {m['dice_oc']:.3f} / **{m['dice_mean']:.3f}**" for m in results]
        average = sum(m["dice_mean"] for m in results) / len(results)
        print(f"| {name} | " + " | ".join(cells) + f" | {average:.4f} |")


if __name__ == "__main__":
    main()
