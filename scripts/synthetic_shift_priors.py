"""Does a model's own held-out split, under synthetic appearance shifts, say how much test statistics it should take?

    python scripts/synthetic_shift_priors.py --dataset_dir $DATA_DIR/fundus --sources drishti_gs refuge_train refuge_val

For every shipped source model, its held-out validation split (the 20 % ``train.json`` keeps out, seed 0; labelled,
so usable at calibration time) is predicted as it is and under ``--draws`` draws of GraTa's strong intensity view
(:class:`~monai_grata.transforms.StrongIntensityAug`, seed 0: brightness, contrast, gamma, noise, blur, per sample and
channel) with BatchNorm on each source prior N of ``--priors`` (0: the image's own statistics; inf: the source's).
Prints, per model, the mean Dice (optic disc and cup, at the network's input size) per prior on the clean and the
shifted images, and the mean ``batch_norm_shift`` (the gate's gauge, prior 256) of each. Forward passes only.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from monai.metrics import DiceMetric

from monai_grata.data import domain_datalist, fundus_preprocessing, split_train_val
from monai_grata.networks import checkpoint_decoder, load_weights, resunet
from monai_grata.transforms import StrongIntensityAug
from monai_grata.tta import BatchNormPolicy, batch_norm_shift, convert_to_adaptive_batch_norm

GAUGE_PRIOR = 256.0


def dice(logits: torch.Tensor, label: torch.Tensor) -> float:
    """Mean Dice over the channels of the thresholded sigmoid output."""
    prediction = (torch.sigmoid(logits) > 0.5).float()
    return float(DiceMetric(include_background=True, reduction="none")(prediction, label).nanmean())


@torch.no_grad()
def evaluate(source: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Mean Dice per prior and mean gauge on the clean and the shifted images of ``source``'s held-out split."""
    ckpt = f"{args.models_dir}/source_{source}.pt"
    network = load_weights(resunet(decoder=checkpoint_decoder(ckpt)), ckpt).eval()
    models = {p: convert_to_adaptive_batch_norm(copy.deepcopy(network), BatchNormPolicy(prior=p)) for p in args.priors}
    gauge = models[GAUGE_PRIOR] if GAUGE_PRIOR in models else None
    items = split_train_val(domain_datalist(args.dataset_dir, source), 0.2, seed=0)[1]
    preprocessing, strong = fundus_preprocessing(image_size=args.image_size), StrongIntensityAug(seed=0)
    sums = {kind: {str(p): 0.0 for p in args.priors} | {"shift": 0.0, "n": 0} for kind in ("clean", "shifted")}
    for item in items:
        data = preprocessing(dict(item))
        image, label = data["image"].as_tensor()[None], data["label"].as_tensor()[None]
        for draw in range(args.draws + 1):
            x, kind = (image, "clean") if draw == 0 else (strong(image), "shifted")
            row = sums[kind]
            row["n"] += 1
            row["shift"] += float(batch_norm_shift(gauge, x)) if gauge is not None else math.nan
            for prior, model in models.items():
                row[str(prior)] += dice(model(x), label)
    return {kind: {k: v / row["n"] for k, v in row.items() if k != "n"} for kind, row in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--sources", nargs="+", default=["drishti_gs", "refuge_train", "refuge_val"])
    parser.add_argument("--models_dir", default="bundles/grata/models")
    parser.add_argument("--priors", nargs="+", type=float, default=[0, 4, 16, 64, 256, math.inf])
    parser.add_argument("--draws", type=int, default=2, help="shifted draws per image")
    parser.add_argument("--image_size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| source model | images | mean shift | " + " | ".join(f"prior {p:g}" for p in args.priors) + " |")
    print("|---|---|---:|" + "---:|" * len(args.priors))
    for source in args.sources:
        for kind, row in evaluate(source, args).items():
            dices = " | ".join(f"{row[str(p)]:.4f}" for p in args.priors)
            print(f"| {source} | {kind} | {row['shift']:.3f} | {dices} |", flush=True)


if __name__ == "__main__":
    main()
