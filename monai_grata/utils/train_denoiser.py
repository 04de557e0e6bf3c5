"""Train DeTTA's denoising decoder on a frozen source model's encoder features (blind-spot L1 loss).

python -m monai_grata.utils.train_denoiser --ckpt_path bundles/grata/models/source_drishti_gs.pt \\
    --dataset_dir $DATA_DIR/fundus --source drishti_gs --epochs 10 \\
    --out_path bundles/grata/models/denoiser_drishti_gs.pt

The denoiser is trained after the source model, on the same training split of the source domain (``split_train_val``,
seed 0, as ``train.json`` makes it), not jointly with it as in the DeTTA paper: the shipped source models stay as they
are. The encoder is frozen and normalises with each batch's statistics (as in training); the denoiser's file is
rewritten after every epoch.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from monai_grata.networks.denoiser import DenoisingDecoder, build_denoiser, save_denoiser, tap_features
from monai_grata.tta.detta import blind_spot, denoising_loss
from monai_grata.tta.normalization import convert_to_adaptive_batch_norm

__all__ = ["train_denoiser"]


def _batches(images: torch.Tensor, batch_size: int, generator: torch.Generator, shuffle: bool):
    order = torch.randperm(len(images), generator=generator) if shuffle else torch.arange(len(images))
    for start in range(0, len(images), batch_size):
        yield images[order[start : start + batch_size]]


def _flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random left-right and up-down flips, per image."""
    out = batch.clone()
    for axis in (-1, -2):
        flip = torch.rand(len(batch), generator=generator) < 0.5
        out[flip] = out[flip].flip(axis)
    return out


def train_denoiser(
    model: nn.Module,
    train_images: torch.Tensor,
    val_images: torch.Tensor | None = None,
    epochs: int = 10,
    batch_size: int = 8,
    lr: float = 1e-3,
    mask_ratio: float = 0.1,
    window: int = 5,
    seed: int = 0,
    denoiser: DenoisingDecoder | None = None,
    max_iterations: int | None = None,
    on_epoch: Callable[[DenoisingDecoder, dict], None] | None = None,
) -> tuple[DenoisingDecoder, list[dict]]:
    """Train a denoising decoder on ``model``'s frozen encoder: per batch, :func:`~monai_grata.tta.detta.blind_spot`
    masking, the encoder on the masked images (batch statistics, no gradient), the decoder's reconstruction scored
    by :func:`~monai_grata.tta.detta.denoising_loss`; Adam (betas 0.9, 0.99, DeTTA's) with cosine decay to 0.

    Args:
        model: the source network (not changed: a copy normalises with batch statistics).
        train_images: (N, C, *spatial) images, scaled as the model's inputs are.
        val_images: held-out images; their loss (fixed masks) is reported after every epoch.
        epochs: passes over ``train_images``.
        batch_size: images per step.
        lr: the initial learning rate.
        mask_ratio: share of positions masked (DeTTA: 0.1).
        window: neighbourhood of the masking (DeTTA: 5).
        seed: seed of the initial weights, the order, the flips and the masks.
        denoiser: a decoder to go on training (default: a new one, :func:`~monai_grata.networks.build_denoiser`).
        max_iterations: steps per epoch at most (short runs).
        on_epoch: called with the decoder and the epoch's record after every epoch (e.g. to save it).

    Returns:
        The trained decoder (train mode off) and one record per epoch: ``epoch``, ``train_loss``, ``val_loss``
        (``None`` without validation images), ``seconds``.
    """
    encoder = convert_to_adaptive_batch_norm(copy.deepcopy(model).eval()).requires_grad_(False)
    denoiser = denoiser if denoiser is not None else build_denoiser(model, seed=seed)
    device = next(encoder.parameters()).device
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr, betas=(0.9, 0.99))
    per_epoch = math.ceil(len(train_images) / batch_size)
    per_epoch = min(per_epoch, max_iterations) if max_iterations else per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * per_epoch))
    generator = torch.Generator().manual_seed(seed)
    history = []

    def loss_of(batch: torch.Tensor, masks: torch.Generator) -> torch.Tensor:
        masked, mask = blind_spot(batch, mask_ratio, window, masks)
        with torch.no_grad():
            features = tap_features(encoder, masked, denoiser.layer, denoiser.tap)
        return denoising_loss(denoiser(features), batch, mask)

    for epoch in range(1, epochs + 1):
        start, losses = time.perf_counter(), []
        denoiser.train()
        for step, batch in enumerate(_batches(train_images, batch_size, generator, shuffle=True)):
            if step == per_epoch:
                break
            loss = loss_of(_flip(batch, generator).to(device), generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        val_loss = None
        if val_images is not None and len(val_images):
            denoiser.eval()
            fixed, val = torch.Generator().manual_seed(seed + 1), []
            with torch.no_grad():
                for batch in _batches(val_images, batch_size, fixed, shuffle=False):
                    val.append(float(loss_of(batch.to(device), fixed)) * len(batch))
            val_loss = sum(val) / len(val_images)
        record = {
            "epoch": epoch,
            "train_loss": sum(losses) / len(losses),
            "val_loss": val_loss,
            "seconds": time.perf_counter() - start,
        }
        history.append(record)
        if on_epoch is not None:
            on_epoch(denoiser, record)
    return denoiser.eval(), history


def _load_images(items: Sequence[dict], image_size: int) -> torch.Tensor:
    from monai_grata.data import fundus_preprocessing

    transform = fundus_preprocessing(image_size=image_size)
    return torch.stack([transform({"image": item["image"]})["image"].as_tensor() for item in items])


def main(argv: Sequence[str] | None = None) -> None:
    from monai_grata.data import domain_datalist, split_train_val
    from monai_grata.networks import checkpoint_decoder, load_weights, resunet

    parser = argparse.ArgumentParser(description="Train DeTTA's denoising decoder on a frozen source model.")
    parser.add_argument("--ckpt_path", required=True, help="the source model (e.g. models/source_drishti_gs.pt)")
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--datalist", default=None)
    parser.add_argument("--source", required=True, help="the source domain (its training split is used)")
    parser.add_argument("--out_path", required=True, help="the denoiser file (rewritten after every epoch)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max_iterations", type=int, default=None, help="steps per epoch at most")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--history", default=None, help="a JSON file for the per-epoch record")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    model = load_weights(resunet(decoder=checkpoint_decoder(args.ckpt_path)), args.ckpt_path).to(args.device)
    train_items, val_items = split_train_val(domain_datalist(args.dataset_dir, args.source, args.datalist))
    train_images, val_images = _load_images(train_items, args.image_size), _load_images(val_items, args.image_size)
    print(f"denoiser for {args.ckpt_path}: {len(train_images)} training / {len(val_images)} validation images")
    history: list[dict] = []

    def on_epoch(denoiser: DenoisingDecoder, record: dict) -> None:
        save_denoiser(denoiser, args.out_path)
        history.append(record)
        if args.history:
            with open(args.history, "w") as f:
                json.dump(history, f, indent=1)
        print(json.dumps(record), flush=True)

    train_denoiser(
        model,
        train_images,
        val_images,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_iterations=args.max_iterations,
        on_epoch=on_epoch,
    )
    print(f"saved {args.out_path}")


if __name__ == "__main__":
    main()
