"""Does gating deeper BatchNorm layers add to the gated stem? The first ``K`` BatchNorm layers (in module order) each
take the test image's own statistics when their input's divergence from the layer's source statistics exceeds that
layer's threshold, ``factor × quantile`` of the per-image divergences the layer sees over the model's training split
(the rule of ``bn_first_min_shift``, per layer); the other layers keep the source's. ``K`` = 1 is the shipped default.
On the development split (the first 50 images of each target) and each source's held-out validation split.

    python scripts/layer_gate_search.py --dataset_dir $DATA_DIR/fundus

Forward passes only, one per image and ``K``, no state carried from one image to the next. Prints a markdown table:
one row per ``K``, the pairs' mean Dice, the development average and its change over No Adapt, the worst development
pair's change, and the change on each no-shift split.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

from monai_grata.benchmark.cells import _score, default_setup, load_target, target_items
from monai_grata.data import domain_datalist, split_train_val
from monai_grata.networks import checkpoint_decoder, load_weights, resunet
from monai_grata.tta import BatchNormPolicy, convert_to_adaptive_batch_norm
from monai_grata.tta.calibration import batch_norm_divergences
from monai_grata.tta.normalization import adaptive_batch_norms

DOMAINS = ("drishti_gs", "refuge_train", "refuge_val")


def gated_layers(network: torch.nn.Module, thresholds: list[float], n_layers: int) -> torch.nn.Module:
    """A copy of ``network`` whose first ``n_layers`` BatchNorms are gated by their ``thresholds``, the rest source."""
    model = convert_to_adaptive_batch_norm(copy.deepcopy(network), BatchNormPolicy(prior=math.inf))
    for layer, threshold in zip(adaptive_batch_norms(model)[:n_layers], thresholds, strict=False):
        layer.configure(BatchNormPolicy(prior=0.0, min_shift=threshold))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--models_dir", default="bundles/grata/models")
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 3, 7, 16])
    parser.add_argument("--quantile", type=float, default=0.9)
    parser.add_argument("--factor", type=float, default=1.5)
    parser.add_argument("--max_images", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    setup = default_setup()
    pairs = [(s, t) for t in DOMAINS for s in DOMAINS if s != t] + [(d, f"{d}:val") for d in DOMAINS]
    table: dict[str, dict[tuple[str, str], float]] = {}
    for source in DOMAINS:
        ckpt = f"{args.models_dir}/source_{source}.pt"
        network = load_weights(resunet(decoder=checkpoint_decoder(ckpt)), ckpt).eval()
        train = load_target(split_train_val(domain_datalist(args.dataset_dir, source))[0], 256, setup)
        divergences = torch.tensor(batch_norm_divergences(network, [i["image"][None] for i in train]))
        thresholds = (args.factor * torch.quantile(divergences.double(), args.quantile, dim=0)).tolist()
        models = {"none (No Adapt)": network} | {
            f"first {k} gated": gated_layers(network, thresholds, k) for k in args.layers
        }
        for target in [t for s, t in pairs if s == source]:
            items = target_items(args.dataset_dir, target)
            items = load_target(items if target.endswith(":val") else items[: args.max_images], 256, setup)
            for label, model in models.items():
                with torch.no_grad():
                    dice = torch.stack([_score(model(i["image"][None]), i, setup.task)[0] for i in items])
                table.setdefault(label, {})[source, target] = float(dice.nanmean(dim=0).mean())
    n_dev = len(pairs) - len(DOMAINS)
    print("| rule | " + " | ".join(f"{s}→{t}" for s, t in pairs) + " | dev average | Δ | worst Δ | no-shift Δ |")
    print("|---|" + "---:|" * (len(pairs) + 4))
    none = [table["none (No Adapt)"][p] for p in pairs]
    for label, cells in table.items():
        dice = [cells[p] for p in pairs]
        delta = [d - n for d, n in zip(dice, none, strict=True)]
        shifts = " / ".join(f"{d:+.4f}" for d in delta[n_dev:])
        print(
            f"| {label} | {' | '.join(f'{d:.4f}' for d in dice)} | {sum(dice[:n_dev]) / n_dev:.4f} | "
            f"{sum(delta[:n_dev]) / n_dev:+.4f} | {min(delta[:n_dev]):+.4f} | {shifts} |"
        )


if __name__ == "__main__":
    main()
