"""The 3x3 No-Adapt table of docs/source_models.md: every shipped source model evaluated with evaluate.json on all
images of every other domain (and the source-validation Dice read from the training logs' MLflow stores).

    python scripts/no_adapt_table.py --dataset_dir $DATA_DIR/fundus --out outputs/no_adapt

Each cell is one `python -m monai.bundle run --config_file bundles/grata/configs/evaluate.json` (its
metrics.json is kept under --out); the table is printed as markdown. Cells whose metrics.json exists are reused.
"""

from __future__ import annotations

import argparse
import os

from monai_grata.utils import run_bundle_once

DOMAINS = ("drishti_gs", "refuge_train", "refuge_val")


def evaluate(dataset_dir: str, datalist: str, source: str, target: str, out: str, device: str) -> dict:
    """Run evaluate.json for one source model on one target domain (skipped when its metrics.json exists)."""
    return run_bundle_once(
        "bundles/grata/configs/evaluate.json", os.path.join(out, f"{source}_to_{target}"),
        dataset_dir=dataset_dir, datalist=datalist, source=source, target=target, device=device,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--datalist", default=None, help="default: DATASET_DIR/datalist.json")
    parser.add_argument("--out", default="outputs/no_adapt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sources", nargs="*", default=list(DOMAINS))
    args = parser.parse_args()
    datalist = args.datalist or os.path.join(args.dataset_dir, "datalist.json")
    sources = [s for s in args.sources if os.path.isfile(f"bundles/grata/models/source_{s}.pt")]
    print("| source \\ target | " + " | ".join(f"{t} (OD / OC / mean)" for t in DOMAINS) + " |")
    print("|---|" + "---|" * len(DOMAINS))
    for source in sources:
        cells = []
        for target in DOMAINS:
            if target == source:
                cells.append("(source)")
                continue
            m = evaluate(args.dataset_dir, datalist, source, target, args.out, args.device)
            cells.append(f"{m['dice_od']:.4f} / {m['dice_oc']:.4f} / {m['dice_mean']:.4f} (n={m['n_images']})")
        print(f"| {source} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
