"""Which BatchNorm layers gain from the test image's own statistics? The first k layers on a prior N, the rest on the
source's, per source → target pair of the development split (the first 50 images of each target).

    python scripts/stem_statistics_search.py --dataset_dir $DATA_DIR/fundus

For every shipped fundus source model and every other domain, the mean Dice (optic disc and cup, as the benchmark
scores it) of the source weights with ``BatchNormPolicy(prior=inf, first_layers=k, first_prior=N)`` for each k of
``--first_layers`` (0: No Adapt; ``all``: every layer, i.e. ``norm`` with the prior N) and each N of
``--first_priors``. Forward passes only, one image at a time, no state carried from one image to the next. Prints a
markdown table, one row per setting, one column per pair, and the average.
"""

from __future__ import annotations

import argparse
import math

import torch

from monai_grata.benchmark.cells import _score, default_setup, load_target, target_items
from monai_grata.networks import checkpoint_decoder, load_weights, resunet
from monai_grata.tta import BatchNormPolicy, convert_to_adaptive_batch_norm
from monai_grata.tta.normalization import batch_norm_layers

DOMAINS = ("drishti_gs", "refuge_train", "refuge_val")


@torch.no_grad()
def mean_dice(model: torch.nn.Module, images: list[dict]) -> float:
    """The benchmark's mean Dice: per channel the mean over images (empty labels left out), then over channels."""
    setup = default_setup()
    dice = torch.stack([_score(model(item["image"][None]), item, setup.task)[0] for item in images])
    return float(dice.nanmean(dim=0).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--models_dir", default="bundles/grata/models")
    parser.add_argument("--first_layers", nargs="+", default=["0", "1", "3", "all"], help="k values, or 'all'")
    parser.add_argument("--first_priors", nargs="+", type=float, default=[0.0])
    parser.add_argument("--max_images", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs = [(s, t) for t in DOMAINS for s in DOMAINS if s != t]
    targets = {
        t: load_target(target_items(args.dataset_dir, t)[: args.max_images], 256, default_setup()) for t in DOMAINS
    }
    results: dict[tuple[str, float], list[float]] = {}
    for source, target in pairs:
        ckpt = f"{args.models_dir}/source_{source}.pt"
        network = load_weights(resunet(decoder=checkpoint_decoder(ckpt)), ckpt).eval()
        n_layers = len(batch_norm_layers(network))
        for k in args.first_layers:
            for prior in args.first_priors if k != "0" else [math.inf]:
                first = n_layers if k == "all" else int(k)
                policy = BatchNormPolicy(prior=math.inf, first_layers=first, first_prior=prior)
                results.setdefault((k, prior), []).append(
                    mean_dice(convert_to_adaptive_batch_norm(network, policy), targets[target])
                )
    print("| first layers | their prior | " + " | ".join(f"{s}→{t}" for s, t in pairs) + " | average |")
    print("|---|---:|" + "---:|" * (len(pairs) + 1))
    for (k, prior), dice in results.items():
        label = "none (No Adapt)" if k == "0" else k
        cells = " | ".join(f"{d:.4f}" for d in dice)
        print(f"| {label} | {prior:g} | {cells} | {sum(dice) / len(dice):.4f} |", flush=True)


if __name__ == "__main__":
    main()
