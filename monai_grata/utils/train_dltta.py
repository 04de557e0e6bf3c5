"""Fit DLTTA's autoencoders to a frozen source network's features on its source images (the authors' ``aenet`` stage:
20 epochs, batches of 2, Adam 1e-3; :func:`monai_grata.tta.dltta.train_autoencoders`).

python -m monai_grata.utils.train_dltta --bundle spinalcord_gm --ckpt_path bundles/spinalcord_gm/models/source.pt \\
    --dataset_dir $DATA_DIR/spinalcord --source ucl nwu juntendo
python -m monai_grata.utils.train_dltta --bundle grata --ckpt_path bundles/grata/models/source_refuge_train.pt \\
    --dataset_dir $DATA_DIR/fundus --source refuge_train

The file is written beside the checkpoint under the name :class:`~monai_grata.tta.dltta.DLTTA` looks for
(:func:`~monai_grata.tta.dltta.default_autoencoder_path`: ``source_<name>.pt`` → ``dltta_<name>.pt``), once, at the end.
After every epoch the state of the fit is kept in ``<out_path>.partial``; the same command run again continues from
it (a fundus source domain takes hours on a CPU) and deletes it once the file is written.

The images are those the source network was trained on, as the bundle's ``train.json`` takes them, preprocessed as
its ``inference.json`` does (no augmentation, as the authors' ``aenet`` stage, ``--aprob=0``):

- ``grata`` (fundus photographs): the training split of each source domain (``split_train_val``, 20 % held out, seed
  0), resized to ``image_size`` and min-max scaled (``fundus_preprocessing``); the network is the ResUNet the
  checkpoint holds.
- ``spinalcord_gm`` (volumes of axial slices): every volume of the source sites (``train.json`` trains on all of
  them), resampled, cropped and scaled by ``volume_preprocessing``; the network is the bundle's 2D U-Net run slice
  by slice, so its autoencoders are 2D and are fitted to single slices (the authors' 2D images), two per batch.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from monai_grata.tta.dltta import default_autoencoder_path, save_autoencoders, train_autoencoders

__all__ = ["BUNDLES", "source_images", "source_network"]

#: the bundles whose source networks and images this command knows
BUNDLES = ("grata", "spinalcord_gm")
#: the share of a fundus source domain ``train.json`` holds out for validation (seed 0)
FUNDUS_VAL_FRACTION = 0.2
#: the state of an unfinished fit is kept beside the output file under its name and this suffix
PARTIAL_SUFFIX = ".partial"


def _check_bundle(bundle: str) -> None:
    if bundle not in BUNDLES:
        raise ValueError(f"unknown bundle {bundle!r}; choose from {BUNDLES}")


def source_network(bundle: str, ckpt_path: str) -> nn.Module:
    """The bundle's source network with the weights of ``ckpt_path`` (its ``inference.json`` ``network_def``).

    Args:
        bundle: one of :data:`BUNDLES`.
        ckpt_path: the source checkpoint (kept as ``checkpoint_path`` on the network).

    Raises:
        ValueError: an unknown bundle, or a checkpoint of another network (``BadInputError``).
        FileNotFoundError: no such checkpoint.
    """
    from monai.networks.nets import UNet

    from monai_grata.networks import checkpoint_decoder, load_weights, resunet
    from monai_grata.networks.slicewise import SliceWise

    _check_bundle(bundle)
    if bundle == "grata":
        network = resunet(decoder=checkpoint_decoder(ckpt_path))
    else:
        unet = UNet(2, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="batch")
        network = SliceWise(unet)
    return load_weights(network, ckpt_path)


def _source_items(bundle: str, dataset_dir: str, sources: Sequence[str], datalist: str | None) -> list[dict]:
    from monai_grata.data import domain_datalist, split_train_val

    items = []
    for source in sources:
        domain = domain_datalist(dataset_dir, source, datalist)
        items += split_train_val(domain, FUNDUS_VAL_FRACTION, seed=0)[0] if bundle == "grata" else domain
    return [{"image": item["image"]} for item in items]  # no labels: the autoencoders never see them


def _preprocessed(items: Sequence[dict], transform: Callable[[dict], dict]) -> list[torch.Tensor]:
    return [transform(dict(item))["image"].as_tensor() for item in items]


def source_images(
    bundle: str, dataset_dir: str, sources: Sequence[str], datalist: str | None = None, image_size: int = 256
) -> torch.Tensor:
    """The source images the autoencoders are fitted to, as the network's inputs: (N, C, H, W).

    Args:
        bundle: one of :data:`BUNDLES` (see the module's description for what each takes).
        dataset_dir: the dataset root.
        sources: the source domains (sites).
        datalist: a decathlon-style datalist (default: ``dataset_dir/datalist.json`` when it exists).
        image_size: the side fundus photographs are resized to (``grata`` only; a multiple of 32).

    Returns:
        Fundus photographs, or the axial slices of every volume (slice ``d`` of a volume (C, H, W, D)).

    Raises:
        ValueError: an unknown bundle or domain, an image size the network cannot take, no sources.
        FileNotFoundError: a missing datalist or image.
    """
    from monai_grata.data import fundus_preprocessing, volume_preprocessing

    _check_bundle(bundle)
    if not sources:
        raise ValueError("no source domain given")
    items = _source_items(bundle, dataset_dir, sources, datalist)
    if bundle == "grata":
        return torch.stack(_preprocessed(items, fundus_preprocessing(image_size=image_size)))
    volumes = _preprocessed(items, volume_preprocessing(transform_label=False))
    return torch.cat([volume.movedim(-1, 0) for volume in volumes])  # (C, H, W, D) -> D slices (C, H, W)


def _domains(values: Sequence[str]) -> list[str]:
    """``--source a b`` or ``--source a+b`` (the bundles' ``source`` string)."""
    return [domain for value in values for domain in value.split("+") if domain]


def build_parser() -> argparse.ArgumentParser:
    """The command's options (see the module's description)."""
    parser = argparse.ArgumentParser(
        prog="python -m monai_grata.utils.train_dltta",
        description="Fit DLTTA's autoencoders to a frozen source network's features on its source images.",
    )
    parser.add_argument("--bundle", choices=BUNDLES, default="grata", help="whose network and images (default grata)")
    parser.add_argument("--ckpt_path", required=True, help="the source model, e.g. models/source_refuge_train.pt")
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--datalist", default=None)
    parser.add_argument("--source", nargs="+", required=True, help="the source domain(s): 'a b' or 'a+b'")
    parser.add_argument("--out_path", default=None, help="default: dltta_<name>.pt beside the checkpoint")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max_iterations", type=int, default=None, help="steps per epoch at most (short runs)")
    parser.add_argument("--image_size", type=int, default=256, help="fundus photographs only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    """Fit the autoencoders, log the mean loss of every epoch, and write them; return the path written.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError(f"need --epochs >= 1 and --batch_size >= 1, got {args.epochs} and {args.batch_size}")
    out_path = args.out_path or default_autoencoder_path(args.ckpt_path)
    partial_path = out_path + PARTIAL_SUFFIX
    network = source_network(args.bundle, args.ckpt_path).to(args.device)
    images = source_images(args.bundle, args.dataset_dir, _domains(args.source), args.datalist, args.image_size)
    print(f"DLTTA autoencoders for {args.ckpt_path}: {len(images)} source images {tuple(images.shape[1:])}", flush=True)
    if os.path.isfile(partial_path):
        print(f"continuing the fit kept in {partial_path}", flush=True)
    start = last = time.perf_counter()

    def log_epoch(epoch: int, loss: float) -> None:
        nonlocal last
        now = time.perf_counter()
        print(json.dumps({"epoch": epoch, "loss": loss, "seconds": round(now - last, 1)}), flush=True)
        last = now

    autoencoders = train_autoencoders(
        network,
        images,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_iterations=args.max_iterations,
        on_epoch=log_epoch,
        resume_path=partial_path,
    )
    save_autoencoders(autoencoders.cpu(), out_path)
    os.unlink(partial_path)
    print(f"saved {out_path} after {time.perf_counter() - start:.0f} s", flush=True)
    return out_path


if __name__ == "__main__":
    main()
