"""The shift gate's threshold, calibrated from the source model itself and stored beside its weights.

GraTa's ``min_shift`` gate updates only while the stream's mean :func:`~monai_grata.tta.batch_norm_shift` exceeds a
threshold, and the gauge's scale belongs to the network: the same images score differently under another model. So
the threshold is read off the model's own in-domain images, measured as the gate measures them (BatchNorm on the
source prior of the gate's ``bn_prior``, the source weights, one test batch at a time), by one rule:

    threshold = mean + z · std / sqrt(n_stream)      (z = 2, n_stream = 10)

where mean and std are those of the in-domain per-batch shifts (the source domain's held-out validation split). The
gate compares the mean over the stream seen so far, and the mean of ``n_stream`` in-domain batches scatters around
the in-domain mean with a standard error of std / sqrt(n_stream): so once an in-domain stream has run about ten
batches, its mean stays below the threshold unless it is two standard errors high. The other domains average 1.4-3.3
times the threshold of the shipped fundus models (``docs/results.md``, "Calibrating the gate from the model").

The first-layer gate (``bn_first_min_shift``: the stem on the test image's statistics only when the image is far
from the source, :class:`~monai_grata.tta.BatchNormPolicy`) is calibrated by a rule of its own, on the divergence
it gates by (:func:`~monai_grata.tta.normalization.source_divergence` of the first BatchNorm's input, one image at a
time, the source weights) over the model's own training images:

    first_min_shift = 1.5 · (90th percentile of the in-domain per-image divergences)

so about one in-domain image in ten comes near it and very few pass it (the rule was chosen among others on the
fundus development split: ``docs/results.md``, "Gating the stem by the model's own images"). Its site gate
(``bn_first_site_min_shift``: every image of a stream takes its own statistics once the median divergence of the
stream's images exceeds it) is the 90th percentile itself: an in-domain stream's median lies near the in-domain
median, far below it.

The calibration is a JSON file beside the checkpoint, ``<checkpoint stem>.shift.json`` (:func:`shift_calibration_path`),
with the threshold, the rule, the prior, the split, summary quantiles of the per-batch shifts and the sha256 of the
weights it was measured on (the weights' own file and hash stay as they are). ``python -m
monai_grata.utils.calibrate_shift`` writes it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from monai_grata.data.checks import BadInputError, MissingInputError

from .normalization import BatchNormPolicy, convert_to_adaptive_batch_norm
from .shift import batch_norm_shift, record_batch_norm_shift

__all__ = [
    "FIRST_SHIFT_RULE",
    "SHIFT_CALIBRATION_SUFFIX",
    "SHIFT_RULE",
    "batch_norm_divergences",
    "first_layer_calibration",
    "first_layer_divergences",
    "first_shift_threshold",
    "read_first_shift_threshold",
    "load_shift_calibration",
    "per_batch_shifts",
    "read_shift_threshold",
    "save_shift_calibration",
    "shift_calibration",
    "shift_calibration_path",
    "shift_threshold",
]

SHIFT_CALIBRATION_SUFFIX = ".shift.json"
#: z and n_stream of the rule (module docstring)
RULE_Z, RULE_STREAM = 2.0, 10
SHIFT_RULE = (
    f"mean + {RULE_Z:g} * std / sqrt({RULE_STREAM}) of the in-domain per-batch batch_norm_shift "
    f"(the mean of a {RULE_STREAM}-batch in-domain stream stays below it unless {RULE_Z:g} standard errors high)"
)

#: quantile and factor of the first-layer gate's rule (module docstring)
FIRST_RULE_QUANTILE, FIRST_RULE_FACTOR = 0.9, 1.5
FIRST_SHIFT_RULE = (
    f"{FIRST_RULE_FACTOR:g} * the {FIRST_RULE_QUANTILE:.0%} quantile of the in-domain per-batch divergence of the "
    f"first BatchNorm's input from its source statistics (source_divergence, mean over channels)"
)
#: quantile of the first layer's site gate (module docstring)
FIRST_SITE_RULE_QUANTILE = 0.9
FIRST_SITE_RULE = (
    f"the {FIRST_SITE_RULE_QUANTILE:.0%} quantile of the same divergences, against the median over the stream's images"
)


@torch.no_grad()
def per_batch_shifts(model: nn.Module, batches: Iterable[torch.Tensor], bn_prior: float) -> list[float]:
    """The :func:`~monai_grata.tta.batch_norm_shift` of each batch, measured as the gate measures it: the source
    weights, every BatchNorm on the source prior of strength ``bn_prior``
    (:class:`~monai_grata.tta.BatchNormPolicy`). ``model`` itself is left as it is (a copy is measured).

    Args:
        model: the source network (BatchNorm layers with running statistics).
        batches: the test batches as the adapter receives them, e.g. one image (1, C, H, W) at a time, or the stacked
            patches of one volume.
        bn_prior: the prior strength N of the gate's adapter (``bn_prior``), > 0.

    Raises:
        ValueError: ``bn_prior`` not positive, or a model without BatchNorm running statistics.
    """
    if not bn_prior > 0:
        raise ValueError(f"the shift is measured on a source prior: bn_prior must be positive, got {bn_prior}")
    gauged = convert_to_adaptive_batch_norm(copy.deepcopy(model).eval(), BatchNormPolicy(prior=bn_prior))
    return [float(batch_norm_shift(gauged, x)) for x in batches]


def shift_threshold(shifts: Sequence[float], z: float = RULE_Z, n_stream: int = RULE_STREAM) -> float:
    """The gate's threshold from in-domain per-batch shifts: ``mean + z · std / sqrt(n_stream)`` (``std`` with
    Bessel's correction).

    Args:
        shifts: the in-domain per-batch shifts (at least 2).
        z: how many standard errors of an ``n_stream``-batch stream mean above the in-domain mean.
        n_stream: the stream length whose mean's standard error sets the margin.

    Raises:
        BadInputError: fewer than 2 shifts, or a non-finite one.
    """
    values = _in_domain_values(shifts, "the shift threshold", "batch_norm_shift")
    return float(values.mean() + z * values.std() / math.sqrt(n_stream))


def _in_domain_values(values: Sequence[float], what: str, gauge: str) -> torch.Tensor:
    """``values`` as a float64 tensor; fewer than 2 or a non-finite one is a :class:`BadInputError` naming ``what``
    needs them and which ``gauge`` was not finite."""
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if tensor.numel() < 2:
        raise BadInputError(f"{what} needs at least 2 in-domain images, got {tensor.numel()}")
    if not bool(torch.isfinite(tensor).all()):
        raise BadInputError(f"an in-domain image has a non-finite {gauge}: check the images and the model")
    return tensor


@torch.no_grad()
def batch_norm_divergences(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[list[float]]:
    """Per batch, the divergence of each BatchNorm layer's input from that layer's source statistics
    (:func:`~monai_grata.tta.normalization.source_divergence`, mean over channels; layers in the order the forward
    passes them), as a layer's gate measures it; ``model`` (the source weights) is run in eval mode on a copy.

    Args:
        model: the source network (its BatchNorm layers keep running statistics).
        batches: the batches as the adapter receives them (one image (1, C, H, W) at a time, or a volume's patches).

    Raises:
        ValueError: a model without BatchNorm running statistics (from
            :func:`~monai_grata.tta.record_batch_norm_shift`).
    """
    gauged = copy.deepcopy(model).eval()
    divergences = []
    with record_batch_norm_shift(gauged) as record:
        for x in batches:
            record.divergences.clear()
            gauged(x)
            divergences.append([float(d) for d in record.divergences])
    return divergences


def first_layer_divergences(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[float]:
    """Per batch, the first BatchNorm's entry of :func:`batch_norm_divergences`: what the first-layer gate
    (``bn_first_min_shift``) measures.

    Args:
        model: the source network (its first BatchNorm keeps running statistics).
        batches: the batches as the adapter receives them.
    """
    return [layers[0] for layers in batch_norm_divergences(model, batches)]


def first_shift_threshold(divergences: Sequence[float], site: bool = False) -> float:
    """The first-layer gate's threshold from in-domain per-batch divergences: ``FIRST_RULE_FACTOR`` times their
    ``FIRST_RULE_QUANTILE`` quantile; with ``site`` its site gate (``bn_first_site_min_shift``), their
    ``FIRST_SITE_RULE_QUANTILE`` quantile (linear interpolation).

    Args:
        divergences: the in-domain per-batch divergences (:func:`first_layer_divergences`, at least 2).
        site: the site gate's threshold instead of the per-image one.

    Raises:
        BadInputError: fewer than 2 values, or a non-finite one.
    """
    what = "the first layer's site gate" if site else "the first-layer threshold"
    values = _in_domain_values(divergences, what, "first-layer divergence")
    if site:
        return float(torch.quantile(values, FIRST_SITE_RULE_QUANTILE))
    return float(FIRST_RULE_FACTOR * torch.quantile(values, FIRST_RULE_QUANTILE))


def first_layer_calibration(divergences: Sequence[float], split: str) -> dict:
    """The calibration file's ``"first_layer"`` entry: the threshold (``min_shift``, the value of
    ``bn_first_min_shift``) by :func:`first_shift_threshold`, the site gate (``site_min_shift``, the value of
    ``bn_first_site_min_shift``) by the same with ``site``, their rules, the number of images, which they were,
    and a summary of their divergences.

    Args:
        divergences: the in-domain per-batch divergences (:func:`first_layer_divergences`).
        split: a short description of the images.
    """
    return {
        "min_shift": round(first_shift_threshold(divergences), 6),
        "rule": FIRST_SHIFT_RULE,
        "site_min_shift": round(first_shift_threshold(divergences, site=True), 6),
        "site_rule": FIRST_SITE_RULE,
        "images": len(divergences),
        "split": split,
        "per_image": _summary(divergences),
    }


def _summary(shifts: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation and quantiles of the per-batch shifts, rounded for the JSON file."""
    values = torch.tensor([float(s) for s in shifts], dtype=torch.float64)
    quantiles = torch.quantile(values, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)).tolist()
    summary = {"mean": float(values.mean()), "std": float(values.std())}
    summary.update(zip(("min", "q10", "q50", "q90", "max"), quantiles, strict=True))
    return {k: round(v, 6) for k, v in summary.items()}


def shift_calibration(shifts: Sequence[float], bn_prior: float, split: str) -> dict:
    """What the calibration file holds: the threshold (``min_shift``) by :func:`shift_threshold`, the rule, the prior
    it was measured with, the number of batches, which images they were, and a summary of their shifts.

    Args:
        shifts: the in-domain per-batch shifts (:func:`per_batch_shifts`).
        bn_prior: the prior strength they were measured with.
        split: a short description of the images (e.g. ``"refuge_train held-out validation split (20 %, seed 0)"``).
    """
    return {
        "min_shift": round(shift_threshold(shifts), 6),
        "rule": SHIFT_RULE,
        "bn_prior": float(bn_prior),
        "images": len(shifts),
        "split": split,
        "per_image": _summary(shifts),
    }


def shift_calibration_path(ckpt_path: str) -> str:
    """The calibration file beside a checkpoint: ``models/source_x.pt`` → ``models/source_x.shift.json``."""
    return os.path.splitext(ckpt_path)[0] + SHIFT_CALIBRATION_SUFFIX


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _how_to_calibrate(ckpt_path: str) -> str:
    return f"run python -m monai_grata.utils.calibrate_shift --ckpt_path {ckpt_path} --dataset_dir DIR --source DOMAIN"


def save_shift_calibration(ckpt_path: str, calibration: dict) -> str:
    """Write ``calibration`` (:func:`shift_calibration`) beside the checkpoint, with the weights' sha256; return the
    file's path.

    Args:
        ckpt_path: the checkpoint the shifts were measured with.
        calibration: the calibration to store.

    Raises:
        MissingInputError: no checkpoint at ``ckpt_path``.
    """
    if not os.path.isfile(ckpt_path):
        raise MissingInputError(f"checkpoint not found: {ckpt_path!r}")
    path = shift_calibration_path(ckpt_path)
    content = {**calibration, "weights_sha256": _sha256(ckpt_path)}
    with open(path, "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
    return path


def load_shift_calibration(ckpt_path: str) -> dict:
    """The calibration stored beside the checkpoint ``ckpt_path``.

    Args:
        ckpt_path: the source checkpoint.

    Raises:
        MissingInputError: no calibration file beside it (the one-line message says how to make one).
        BadInputError: a file that is not a calibration, or one measured on other weights than the checkpoint's.
    """
    path = shift_calibration_path(ckpt_path)
    if not os.path.isfile(path):
        raise MissingInputError(f"no shift calibration beside {ckpt_path}: {_how_to_calibrate(ckpt_path)}")
    try:
        with open(path) as f:
            calibration = json.load(f)
        float(calibration["min_shift"])
    except (ValueError, KeyError, TypeError) as err:
        raise BadInputError(f"{path} is not a shift calibration ({err}): {_how_to_calibrate(ckpt_path)}") from err
    expected = calibration.get("weights_sha256")
    if expected is not None and os.path.isfile(ckpt_path) and _sha256(ckpt_path) != expected:
        raise BadInputError(f"{path} was measured on other weights than {ckpt_path}: {_how_to_calibrate(ckpt_path)}")
    return calibration


def read_shift_threshold(ckpt_path: str, bn_prior: float | None = None) -> float:
    """The gate's threshold (``min_shift``) calibrated for the checkpoint ``ckpt_path``.

    Args:
        ckpt_path: the source checkpoint.
        bn_prior: the gate's prior strength, to check against the one the calibration was measured with
            (None: no check).

    Raises:
        MissingInputError: no calibration beside the checkpoint (the message says how to make one).
        BadInputError: an unreadable or stale calibration, or one measured with another ``bn_prior``.
    """
    calibration = load_shift_calibration(ckpt_path)
    measured_with = float(calibration.get("bn_prior", math.nan))
    if bn_prior is not None and measured_with != float(bn_prior):
        raise BadInputError(
            f"the shift calibration beside {ckpt_path} was measured with bn_prior {measured_with:g}, the gate runs "
            f"with {float(bn_prior):g}: {_how_to_calibrate(ckpt_path)} --bn_prior {float(bn_prior):g}"
        )
    return float(calibration["min_shift"])


def read_first_shift_threshold(ckpt_path: str, site: bool = False) -> float:
    """The first-layer gate's threshold (``bn_first_min_shift``) calibrated for the checkpoint ``ckpt_path``, or
    with ``site`` its site gate (``bn_first_site_min_shift``).

    Args:
        ckpt_path: the source checkpoint.
        site: read the site gate's threshold instead of the per-image one.

    Raises:
        MissingInputError: no calibration beside the checkpoint, or one without the first-layer entry or its site
            gate (the message says how to make one).
        BadInputError: an unreadable or stale calibration.
    """
    calibration = load_shift_calibration(ckpt_path)
    key, what = ("site_min_shift", "site gate") if site else ("min_shift", "threshold")
    try:
        return float(calibration["first_layer"][key])
    except (KeyError, TypeError, ValueError) as err:
        raise MissingInputError(
            f"the shift calibration beside {ckpt_path} has no first-layer {what}: {_how_to_calibrate(ckpt_path)}"
        ) from err
