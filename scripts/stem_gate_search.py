"""Which threshold rule should gate the stem statistics? The per-image gate of ``stem_gated`` with thresholds of
the form ``factor × quantile`` of the source model's own training images, on the development split (the first 50
images of each target) and on each source's held-out validation split (no shift).

    python scripts/stem_gate_search.py --dataset_dir $DATA_DIR/fundus

For every shipped fundus source model: the divergence of the first BatchNorm's input from its source statistics
(:func:`~monai_grata.tta.calibration.first_layer_divergences`) on the model's training split, then for every test
image the source model's prediction, the stem-statistics prediction (``default``) and the image's divergence. A rule
takes the stem prediction where the divergence exceeds ``factor × quantile`` of the training divergences, the source
prediction elsewhere (what ``bn_first_min_shift`` does in one forward). Forward passes only, no state carried from
one image to the next, except in the site rules: ``… + site > q`` also opens the gate for every image once the median
divergence of the stream's images so far (at least ``--site_min_images`` of them, in datalist order) exceeds the
``q`` quantile of the training divergences — a site judged shifted as a whole. Prints a markdown table: one row per
rule, the pairs' mean Dice, the development average and its change over No Adapt, the worst development pair's
change, and the change on each no-shift split.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

from monai_grata.benchmark.cells import _score, default_setup, load_target, target_items
from monai_grata.data import domain_datalist, split_train_val
from monai_grata.networks import checkpoint_decoder, load_weights, resunet
from monai_grata.tta import BatchNormPolicy, convert_to_adaptive_batch_norm, record_batch_norm_shift
from monai_grata.tta.calibration import first_layer_divergences

DOMAINS = ("drishti_gs", "refuge_train", "refuge_val")


@torch.no_grad()
def predictions(source: str, target: str, models_dir: str, images: list[dict]) -> list[tuple]:
    """Per image: (source model's Dice, stem statistics' Dice, the image's first-layer divergence)."""
    setup = default_setup()
    ckpt = f"{models_dir}/source_{source}.pt"
    network = load_weights(resunet(decoder=checkpoint_decoder(ckpt)), ckpt).eval()
    stem = convert_to_adaptive_batch_norm(copy.deepcopy(network), BatchNormPolicy(prior=math.inf, first_layers=1))
    rows = []
    for item in images:
        x = item["image"][None]
        with record_batch_norm_shift(network) as record:  # the divergence from the source model's own forward
            plain = network(x)
        divergence = float(record.divergences[0])
        rows.append((_score(plain, item, setup.task)[0], _score(stem(x), item, setup.task)[0], divergence))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--models_dir", default="bundles/grata/models")
    parser.add_argument("--quantiles", nargs="+", type=float, default=[0.75, 0.9, 0.95])
    parser.add_argument("--factors", nargs="+", type=float, default=[1.5, 2.0, 2.5, 3.0])
    parser.add_argument("--max_images", type=int, default=50)
    parser.add_argument("--skip_images", type=int, default=0, help="50: the report split (images 51 on), a check")
    parser.add_argument("--site_quantiles", nargs="+", type=float, default=[0.75, 0.9])
    parser.add_argument("--site_min_images", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    setup = default_setup()
    pairs = [(s, t) for t in DOMAINS for s in DOMAINS if s != t] + [(d, f"{d}:val") for d in DOMAINS]
    measured, training = {}, {}
    for source in DOMAINS:
        ckpt = f"{args.models_dir}/source_{source}.pt"
        network = load_weights(resunet(decoder=checkpoint_decoder(ckpt)), ckpt).eval()
        train = load_target(split_train_val(domain_datalist(args.dataset_dir, source))[0], 256, setup)
        training[source] = torch.tensor(first_layer_divergences(network, [i["image"][None] for i in train]))
    for source, target in pairs:
        items = target_items(args.dataset_dir, target)
        items = items if target.endswith(":val") else items[args.skip_images : args.skip_images + args.max_images]
        measured[source, target] = predictions(source, target, args.models_dir, load_target(items, 256, setup))
    rules = [("none (No Adapt)", None, math.inf, None), ("the stem ungated (stem_statistics)", None, 0.0, None)]
    rules += [(f"{f:g} × q{q:g}", q, f, None) for q in args.quantiles for f in args.factors]
    rules += [(f"1.5 × q0.9 + site > q{s:g}", 0.9, 1.5, s) for s in args.site_quantiles]
    table = {}
    for label, q, factor, site_q in rules:
        for source, target in pairs:
            threshold = factor if q is None else factor * float(torch.quantile(training[source].double(), q))
            rows = measured[source, target]
            site = [False] * len(rows)
            if site_q is not None:
                site_threshold = float(torch.quantile(training[source].double(), site_q))
                seen = torch.tensor([d for _, _, d in rows]).double()
                site = [
                    i + 1 >= args.site_min_images and float(seen[: i + 1].median()) > site_threshold
                    for i in range(len(rows))
                ]
            dice = [stem if d > threshold or s else plain for (plain, stem, d), s in zip(rows, site, strict=True)]
            table.setdefault(label, []).append(float(torch.stack(dice).nanmean(dim=0).mean()))
    n_dev = len(pairs) - len(DOMAINS)
    print("| rule | " + " | ".join(f"{s}→{t}" for s, t in pairs) + " | dev average | Δ | worst Δ | no-shift Δ |")
    print("|---|" + "---:|" * (len(pairs) + 4))
    none = table["none (No Adapt)"]
    for label, dice in table.items():
        delta = [d - n for d, n in zip(dice, none, strict=True)]
        cells = " | ".join(f"{d:.4f}" for d in dice)
        shifts = " / ".join(f"{d:+.4f}" for d in delta[n_dev:])
        print(
            f"| {label} | {cells} | {sum(dice[:n_dev]) / n_dev:.4f} | {sum(delta[:n_dev]) / n_dev:+.4f} | "
            f"{min(delta[:n_dev]):+.4f} | {shifts} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
