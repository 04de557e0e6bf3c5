"""How far test images are from each source domain by GraTa's ``min_shift`` gauge, and the threshold it implies.

    python scripts/bn_shift_scores.py --dataset_dir $DATA_DIR/fundus --max_images 50

For every source model, :func:`monai_grata.tta.batch_norm_shift` (the KL divergence of each BatchNorm layer's
input channels from the source running statistics, averaged) of single images, measured as GraTa measures it
(BatchNorm on the source prior ``--bn_prior``): on the source's own *training* split (in-domain, no shift; what a
user has at training time) and on the first ``--max_images`` images of every other domain (the development split
of issue 10). The held-out validation splits and the report split are not read: they are what the threshold is
judged on. Prints a markdown table of mean and 10th / 90th percentiles per (source, images), and the threshold
halfway between the largest in-domain mean and the smallest shifted mean.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from monai_grata.benchmark import load_target
from monai_grata.data import domain_datalist, split_train_val
from monai_grata.networks import checkpoint_decoder, load_weights, resunet
from monai_grata.tta import BatchNormPolicy, batch_norm_shift, convert_to_adaptive_batch_norm

DOMAINS = ["drishti_gs", "refuge_train", "refuge_val"]


def shifts(model: torch.nn.Module, items: list[dict], image_size: int) -> list[float]:
    """The shift of each image of ``items``, one at a time."""
    return [float(batch_norm_shift(model, item["image"][None])) for item in load_target(items, image_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--models_dir", default="bundles/grata/models")
    parser.add_argument("--max_images", type=int, default=50, help="first images of each other domain")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--bn_prior", type=float, default=256)
    args = parser.parse_args()
    rows, in_domain, shifted = [], [], []
    for source in DOMAINS:
        ckpt = f"{args.models_dir}/source_{source}.pt"
        network = load_weights(resunet(decoder=checkpoint_decoder(ckpt)), ckpt).eval()
        model = convert_to_adaptive_batch_norm(network, BatchNormPolicy(prior=args.bn_prior))
        sets = {f"{source} training split": split_train_val(domain_datalist(args.dataset_dir, source))[0]}
        for target in DOMAINS:
            if target != source:
                first = domain_datalist(args.dataset_dir, target)[: args.max_images]
                sets[f"{target}, first {args.max_images}"] = first
        for name, items in sets.items():
            values = shifts(model, items, args.image_size)
            mean = float(np.mean(values))
            (in_domain if "training" in name else shifted).append(mean)
            p10, p90 = np.percentile(values, [10, 90])
            rows.append(f"| {source} | {name} | {len(values)} | {mean:.3f} | {p10:.3f} | {p90:.3f} |")
            print(rows[-1], flush=True)
    print("\n| source model | images | n | mean shift | 10th pct | 90th pct |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    threshold = (max(in_domain) + min(shifted)) / 2
    print(f"\nlargest in-domain mean {max(in_domain):.3f}, smallest shifted mean {min(shifted):.3f}: "
          f"threshold (halfway) {threshold:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
