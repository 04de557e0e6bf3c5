"""Calibrate the shift gate of a source model: measure its own in-domain images and write ``<ckpt stem>.shift.json``
beside the weights (:mod:`monai_grata.tta.calibration`).

    python -m monai_grata.utils.calibrate_shift --ckpt_path bundles/grata/models/source_refuge_train.pt \\
        --dataset_dir $DATA_DIR/fundus --source refuge_train
    python -m monai_grata.utils.calibrate_shift --ckpt_path bundles/spinalcord_gm/models/source.pt \\
        --dataset_dir $DATA_DIR/spinalcord --source ucl nwu juntendo --split all

The in-domain images are the source domain's held-out validation split, the 20 % ``train.json`` keeps out
(``split_train_val``, seed 0; ``--split val``), or, for a model trained on all of its images, those images
(``--split all``). No label is read. The network and the preprocessing are the bundle config's ``network_def`` and
``preprocessing`` (default: ``configs/inference.json`` of the bundle whose ``models/`` folder holds the checkpoint);
further ``--key value`` options override the config's values as ``monai.bundle run`` does (``--decoder authors``,
``--image_size 512``). Each image is measured as the gate sees it: one image at a time, or, when the config's
``inferer`` is a ``SlidingWindowInferer``, the patches :class:`~monai_grata.tta.PatchAdaptation` adapts on.
``--dry_run`` measures and prints without writing: with ``--source TARGET --split all --max_images 50`` it shows where
a target domain's images fall against the threshold.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
from monai.utils import convert_to_tensor

from monai_grata.data import BadInputError, MissingInputError, domain_datalist, split_train_val
from monai_grata.networks import load_weights
from monai_grata.tta import PRESETS, patch_positions, sample_patches
from monai_grata.tta.calibration import (
    first_layer_calibration,
    first_layer_divergences,
    per_batch_shifts,
    save_shift_calibration,
    shift_calibration,
)

__all__ = [
    "SPLITS",
    "add_calibration_arguments",
    "calibrate_checkpoint",
    "calibration_items",
    "config_overrides",
    "default_config_path",
    "main",
]

#: which in-domain images: the held-out validation split, or all of them (a model trained on every image)
SPLITS = ("val", "all", "train")
#: the prior strength the gate of `grata_calibrated` measures with
DEFAULT_BN_PRIOR = float(PRESETS["grata_calibrated"]["options"]["bn_prior"])


def default_config_path(ckpt_path: str) -> str:
    """The inference config of the bundle the checkpoint belongs to: ``<bundle>/models/x.pt`` →
    ``<bundle>/configs/inference.json``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path))), "configs", "inference.json")


def calibration_items(
    dataset_dir: str,
    sources: Sequence[str],
    datalist: str | None = None,
    split: str = "val",
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[dict], str]:
    """The in-domain images (``{"image": path}``, labels dropped) and a description of them for the calibration file.

    Args:
        dataset_dir: the dataset root (as the bundles take it).
        sources: the source domain(s) the model was trained on.
        datalist: a decathlon-style datalist (default: ``dataset_dir/datalist.json`` when it exists).
        split: ``"val"``: each source's held-out validation split (``split_train_val``); ``"train"``: the rest,
            the images the model was trained on; ``"all"``: every image.
        val_fraction: the validation share ``train.json`` held out.
        seed: the seed of that split.

    Raises:
        BadInputError: an unknown split or no source.
    """
    if split not in SPLITS:
        raise BadInputError(f"--split must be one of {SPLITS}, got {split!r}")
    if not sources:
        raise BadInputError("name the source domain(s) the model was trained on: --source DOMAIN [DOMAIN ...]")
    items = []
    for source in sources:
        domain = domain_datalist(dataset_dir, source, datalist)
        items += domain if split == "all" else split_train_val(domain, val_fraction, seed)[split == "val"]
    which = {
        "val": f"held-out validation split (val_fraction {val_fraction:g}, seed {seed})",
        "train": f"training split (val_fraction {val_fraction:g} held out, seed {seed})",
        "all": "all images",
    }[split]
    return [{"image": i["image"]} for i in items], f"{', '.join(sources)}: {which}"


def _bundle_parts(
    config_path: str, overrides: Mapping
) -> tuple[torch.nn.Module, object, tuple[tuple[int, ...], int, float] | None]:
    """The config's network (untrained), preprocessing and, with a sliding-window inferer, the patch protocol
    (roi size, patches per volume, overlap)."""
    if not os.path.isfile(config_path):
        raise MissingInputError(f"bundle config not found: {config_path!r} (name one with --config)")
    parser = ConfigParser()
    parser.read_config(config_path)
    unknown = [f"--{key}" for key in overrides if key not in parser]
    if unknown:
        raise BadInputError(f"{', '.join(unknown)}: not a key of config {config_path!r}")
    parser.update(dict(overrides))
    missing = [k for k in ("network_def", "preprocessing") if k not in parser]
    if missing:
        raise BadInputError(f"config {config_path!r} has no {' or '.join(missing)}: pass an inference config")
    network = parser.get_parsed_content("network_def")
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer") if "inferer" in parser else None
    if not isinstance(inferer, SlidingWindowInferer):
        return network, preprocessing, None
    num_patches = parser.get_parsed_content("tta_handler#num_patches") if "tta_handler#num_patches" in parser else 4
    return network, preprocessing, (tuple(inferer.roi_size), int(num_patches), float(inferer.overlap))


def _batches(
    items: Sequence[dict], preprocessing, patches: tuple[tuple[int, ...], int, float] | None, device: torch.device
) -> Iterator[torch.Tensor]:
    """Each item preprocessed into the batch the adapter receives: the image (1, C, ...) or its stacked patches."""
    for item in items:
        x = convert_to_tensor(preprocessing(dict(item))["image"], track_meta=False)[None].to(device)
        if patches is not None:
            roi_size, num_patches, overlap = patches
            x = sample_patches(x, patch_positions(x.shape[2:], roi_size, num_patches, overlap))
        yield x


def calibrate_checkpoint(
    ckpt_path: str,
    dataset_dir: str,
    sources: Sequence[str],
    datalist: str | None = None,
    config: str | None = None,
    overrides: Mapping | None = None,
    split: str = "val",
    val_fraction: float = 0.2,
    seed: int = 0,
    bn_prior: float = DEFAULT_BN_PRIOR,
    device: str = "cpu",
    max_images: int | None = None,
    write: bool = True,
) -> dict:
    """Measure the source model's in-domain shifts, write the calibration beside ``ckpt_path`` and return it (with
    ``"path"``, the file written, or None, and ``"shifts"``, each image's path and shift in the order measured).
    The first-layer gate's threshold (its ``"first_layer"`` entry) is measured on the training split (``"all"``
    for ``split="all"``), the images whose statistics the source ones are.

    Args:
        ckpt_path: the source checkpoint.
        dataset_dir: the dataset root.
        sources: the source domain(s).
        datalist: a decathlon-style datalist (default: ``dataset_dir/datalist.json`` when it exists).
        config: a bundle config with ``network_def`` and ``preprocessing`` (default: :func:`default_config_path`).
        overrides: config values to replace (e.g. ``{"decoder": "authors"}``).
        split: ``"val"`` or ``"all"`` (:func:`calibration_items`).
        val_fraction: the validation share ``train.json`` held out.
        seed: the seed of that split.
        bn_prior: the prior strength the gate measures with (default: ``grata_calibrated``'s).
        device: where to run the forwards.
        max_images: measure only the first ``max_images`` of those images (None: all).
        write: write the calibration file (False: only measure, e.g. to see where a target domain's images fall).

    Raises:
        MissingInputError: a missing checkpoint, config, dataset or image.
        BadInputError: a checkpoint that does not fit the config's network, a config without a network or
            preprocessing, fewer than two in-domain images.
    """
    if not os.path.isfile(ckpt_path):
        raise MissingInputError(f"checkpoint not found: {ckpt_path!r}")
    items, description = calibration_items(dataset_dir, sources, datalist, split, val_fraction, seed)
    if max_images is not None and len(items) > max_images:
        items, description = items[:max_images], f"{description}, first {max_images}"
    network, preprocessing, patches = _bundle_parts(config or default_config_path(ckpt_path), overrides or {})
    model = load_weights(network, ckpt_path).to(torch.device(device))
    shifts = per_batch_shifts(model, _batches(items, preprocessing, patches, torch.device(device)), bn_prior)
    calibration = shift_calibration(shifts, bn_prior, description)
    first_items, first_description = calibration_items(
        dataset_dir, sources, datalist, "all" if split == "all" else "train", val_fraction, seed
    )
    if max_images is not None and len(first_items) > max_images:
        first_items, first_description = first_items[:max_images], f"{first_description}, first {max_images}"
    first = first_layer_divergences(model, _batches(first_items, preprocessing, patches, torch.device(device)))
    calibration["first_layer"] = first_layer_calibration(first, first_description)
    path = save_shift_calibration(ckpt_path, calibration) if write else None
    measured = [{"image": str(item["image"]), "shift": shift} for item, shift in zip(items, shifts, strict=True)]
    return {**calibration, "path": path, "shifts": measured}


def config_overrides(extra: Sequence[str]) -> dict:
    """``--key value`` pairs as config overrides (values parsed as JSON when they are, else kept as text)."""
    if len(extra) % 2 or not all(k.startswith("--") for k in extra[::2]):
        raise BadInputError(f"config overrides come as --key value pairs, got: {' '.join(extra)}")
    overrides = {}
    for key, text in zip(extra[::2], extra[1::2], strict=True):
        try:
            overrides[key[2:]] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key[2:]] = text
    return overrides


def add_calibration_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The data and config options of the calibration (shared with ``monai_grata.utils.export_source``).

    Args:
        parser: the parser to add them to.
        required: whether ``--dataset_dir`` and ``--source`` must be given.
    """
    parser.add_argument("--dataset_dir", required=required, help="the dataset root (as the bundles take it)")
    parser.add_argument("--source", nargs="+", required=required, help="the source domain(s) the model was trained on")
    parser.add_argument("--datalist", default=None, help="a datalist JSON (default: DATASET_DIR/datalist.json)")
    parser.add_argument("--config", default=None, help="bundle config (default: the bundle's configs/inference.json)")
    parser.add_argument(
        "--split", choices=SPLITS, default="val", help="held-out validation split, training split, or all images"
    )
    parser.add_argument("--val_fraction", type=float, default=0.2, help="the validation share train.json held out")
    parser.add_argument("--seed", type=int, default=0, help="the seed of train.json's split")
    parser.add_argument("--bn_prior", type=float, default=DEFAULT_BN_PRIOR, help="the gate's BatchNorm prior")
    parser.add_argument("--device", default="cpu")


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the command (``argv``: the arguments, default ``sys.argv[1:]``); print and return the calibration."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--ckpt_path", required=True, help="the source checkpoint")
    add_calibration_arguments(parser)
    parser.add_argument("--max_images", type=int, default=None, help="only the first N of those images")
    parser.add_argument("--dry_run", action="store_true", help="measure and print, write no file (e.g. a target)")
    args, extra = parser.parse_known_args(argv)
    calibration = calibrate_checkpoint(
        args.ckpt_path, args.dataset_dir, args.source, args.datalist, args.config, config_overrides(extra),
        args.split, args.val_fraction, args.seed, args.bn_prior, args.device, args.max_images, not args.dry_run,
    )  # fmt: skip
    summary = calibration["per_image"]
    print(
        f"min_shift {calibration['min_shift']:.4f} from {calibration['images']} images ({calibration['split']}; "
        f"mean {summary['mean']:.4f}, std {summary['std']:.4f}, 90th pct {summary['q90']:.4f}) -> "
        f"{calibration['path'] or 'not written (--dry_run)'}"
    )
    first = calibration["first_layer"]
    print(
        f"first-layer min_shift {first['min_shift']:.4f}, site_min_shift {first['site_min_shift']:.4f} from "
        f"{first['images']} images ({first['split']}; median {first['per_image']['q50']:.4f}, 90th pct "
        f"{first['per_image']['q90']:.4f})"
    )
    if args.dry_run:  # where each image falls
        for measured in calibration["shifts"]:
            print(f"  {measured['shift']:.4f}  {measured['image']}")
    return calibration


if __name__ == "__main__":
    from monai_grata.data import exit_on_bad_input

    with exit_on_bad_input():  # a bad input ends the command with one line, no traceback
        main()
