"""docs/results_uda.md: source-only, UDA, UDA+GH and UDA+GH++ for both alignment losses on source -> target pairs.

    python scripts/uda_results.py --dataset_dir $DATA_DIR/fundus --out outputs/uda_results

Each target domain is split once (by `--seed`) into an unlabelled adaptation half and a held-out evaluation half that
training never sees (`train_uda.json`'s `target_eval_fraction`). Source-only is the shipped source model scored
on the held-out half (`train_uda.json --run_id evaluate_source`); every other cell is one `train_uda.json` run
from that source model, scored on the same held-out half after its last iteration. The control row "BN running
statistics only (lr 0)" is the entropy run with learning rate 0: no weight moves, only BatchNorm's running
statistics see the source and target batches. Finished cells
(metrics.json present) are reused, so the script can be stopped and restarted. Prints a markdown table with
Dice (OD / OC / mean), the fraction of iterations whose two gradients conflicted, and wall time per cell.
"""

from __future__ import annotations

import argparse
import json
import os

from monai_grata.utils import run_bundle_once

CONFIG = "bundles/grata/configs/train_uda.json"
HARMONIZATIONS = {"none": "UDA", "gh": "UDA + GH", "gh++": "UDA + GH++"}


def cell_dir(out: str, source: str, target: str, name: str) -> str:
    """The output folder of one cell."""
    return os.path.join(out, f"{source}_to_{target}", name)


def run_cell(cell: str, **overrides) -> dict:
    """Run (or reuse) one cell; its metrics plus ``minutes`` (wall time, when this script ran it; else None)."""
    metrics = run_bundle_once(CONFIG, cell, **overrides)
    path = os.path.join(cell, "wall_time.json")
    if os.path.isfile(path):
        with open(path) as f:
            return {**metrics, "minutes": json.load(f)["wall_s"] / 60}
    return {**metrics, "minutes": None}


def run_pair(args: argparse.Namespace, source: str, target: str) -> dict[str, dict]:
    """Run (or reuse) every cell of one pair; return ``{row name: metrics}``."""
    common = {
        "dataset_dir": args.dataset_dir, "datalist": args.datalist, "source": source, "target": target,
        "device": args.device, "seed": args.seed, "batch_size": args.batch_size,
    }  # fmt: skip
    rows = {"source only": run_cell(cell_dir(args.out, source, target, "source_only"),
                                    run_id="evaluate_source", **common)}  # fmt: skip
    # control: the same training loop with lr 0 changes only BatchNorm running statistics (they see source and
    # target batches), so it separates what those statistics give from what the alignment gradients give
    rows["BN running statistics only (lr 0)"] = run_cell(
        cell_dir(args.out, source, target, "bn_statistics_lr0"), alignment="entropy", harmonization="none",
        learning_rate=0.0, epochs=args.epochs, max_iterations=args.iterations, **common,
    )  # fmt: skip
    for alignment in args.alignments:
        for harmonization in args.harmonizations:
            name = f"{alignment}_{harmonization.replace('+', 'p')}"
            rows[f"{HARMONIZATIONS[harmonization]} ({alignment})"] = run_cell(
                cell_dir(args.out, source, target, name), alignment=alignment, harmonization=harmonization,
                lam=args.lam, epochs=args.epochs, max_iterations=args.iterations, **common,
            )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--datalist", default=None, help="default: DATASET_DIR/datalist.json")
    parser.add_argument("--out", default="outputs/uda_results")
    parser.add_argument("--pairs", nargs="*", default=["refuge_train:drishti_gs", "drishti_gs:refuge_val"])
    parser.add_argument("--alignments", nargs="*", default=["adversarial", "entropy"])
    parser.add_argument("--harmonizations", nargs="*", default=list(HARMONIZATIONS))
    parser.add_argument("--iterations", type=int, default=50, help="iterations per epoch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=2, help="source and target images per iteration")
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.datalist = args.datalist or os.path.join(args.dataset_dir, "datalist.json")
    pairs = [tuple(pair.split(":")) for pair in args.pairs]
    results = {pair: run_pair(args, *pair) for pair in pairs}
    header = " | ".join(f"{s}→{t} Dice OD / OC / **mean** | conflict | min" for s, t in pairs)
    print(f"| method | {header} |\n|---|" + "---|---|---|" * len(pairs))
    for row in results[pairs[0]]:
        cells = []
        for pair in pairs:
            m = results[pair][row]
            conflict = "–" if m.get("conflict_fraction") is None else f"{100 * m['conflict_fraction']:.0f} %"
            cells.append(
                f"{m['dice_od']:.3f} / {m['dice_oc']:.3f} / **{m['dice_mean']:.3f}** | {conflict} | "
                + ("–" if m["minutes"] is None else f"{m['minutes']:.1f}")
            )
        print(f"| {row} | " + " | ".join(cells) + " |")
    first = results[pairs[0]]
    n_eval = {f"{s}→{t}": results[(s, t)]["source only"]["n_images"] for s, t in pairs}
    iterations = {row: m.get("iterations") for row, m in first.items() if row != "source only"}
    print(f"\nheld-out target images: {n_eval}; iterations per run: {iterations}")


if __name__ == "__main__":
    main()
