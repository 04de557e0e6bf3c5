"""Finding the checkpoints a training run left, and exporting the shipped source model."""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping

import torch

from monai_grata.networks import save_half_precision

__all__ = ["best_checkpoint", "export_source_model", "latest_checkpoint", "prune_checkpoints"]

logger = logging.getLogger(__name__)


def _scored(directory: str, pattern: str, score: str) -> list[tuple[float, str]]:
    found = []
    for path in glob.glob(os.path.join(directory, pattern)):
        match = re.search(rf"{score}=(-?[0-9.]+)\.pt$", os.path.basename(path))
        if match:
            found.append((float(match.group(1).rstrip(".")), path))
    return sorted(found)


def latest_checkpoint(directory: str, prefix: str = "last") -> str | None:
    """The interval checkpoint of the highest epoch (``{prefix}_checkpoint_epoch=N.pt``), or ``None``.

    Args:
        directory: the training output folder.
        prefix: the ``file_prefix`` of the interval ``CheckpointSaver``.
    """
    found = _scored(directory, f"{prefix}_*epoch=*.pt", "epoch")
    return found[-1][1] if found else None


def best_checkpoint(directory: str) -> str | None:
    """The key-metric checkpoint with the highest score in its name (``*key_metric=S.pt``), or ``None``.

    Scores are read from the file names, so checkpoints from several resumed runs compare correctly.

    Args:
        directory: the training output folder.
    """
    found = _scored(directory, "*key_metric=*.pt", "key_metric")
    return found[-1][1] if found else None


def prune_checkpoints(directory: str, prefix: str = "last") -> list[str]:
    """Delete what earlier runs left that a resumed run no longer needs: every interval checkpoint but the
    latest and every key-metric checkpoint but the best.

    ``CheckpointSaver`` prunes only the files of its own run, so without this each resume would leave one more
    interval checkpoint (network, optimizer and scheduler) and one more best-model file behind.

    Args:
        directory: the training output folder.
        prefix: the ``file_prefix`` of the interval ``CheckpointSaver``.

    Returns:
        The deleted paths.
    """
    stale = [path for _, path in _scored(directory, f"{prefix}_*epoch=*.pt", "epoch")[:-1]]
    stale += [path for _, path in _scored(directory, "*key_metric=*.pt", "key_metric")[:-1]]
    for path in stale:
        os.remove(path)
        logger.info(f"removed the superseded checkpoint {path}")
    return stale


def export_source_model(train_dir: str, out_path: str, which: str = "best", calibrate: Mapping | None = None) -> str:
    """Write the best (or the last) checkpoint of a training run as a half-precision state dict and, given the source
    data, the shift gate's calibration beside it (``<stem>.shift.json``, :mod:`monai_grata.tta.calibration`).

    Args:
        train_dir: the output folder of a ``train.json`` run.
        out_path: where to write, e.g. ``bundles/grata/models/source_refuge_train.pt``.
        which: ``"best"`` (the best source-validation Dice) or ``"last"`` (the last epoch, as the authors keep).
        calibrate: the arguments of :func:`~monai_grata.utils.calibrate_shift.calibrate_checkpoint` but the
            checkpoint (``dataset_dir``, ``sources``, optionally ``config``, ``split``, ...), to calibrate the exported
            weights; None: no calibration (a log line says how to make one).

    Returns:
        The checkpoint that was exported.
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    chosen = best_checkpoint(train_dir) if which == "best" else latest_checkpoint(train_dir)
    if chosen is None:
        raise FileNotFoundError(f"no {which} checkpoint in {train_dir!r}")
    save_half_precision(torch.load(chosen, map_location="cpu", weights_only=True), out_path)
    if calibrate is None:
        logger.info(f"no shift calibration written beside {out_path}: pass the source data to calibrate it")
        return chosen
    from monai_grata.utils.calibrate_shift import calibrate_checkpoint  # the bundle parser, only when calibrating

    calibration = calibrate_checkpoint(out_path, **calibrate)
    logger.info(f"shift gate calibrated: min_shift {calibration['min_shift']:.4f} -> {calibration['path']}")
    return chosen
