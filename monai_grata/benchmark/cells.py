"""One benchmark cell: adapt a source model continually over a target's images at batch size 1 and score it."""

from __future__ import annotations

import inspect
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from monai.data import MetaTensor
from monai.metrics import compute_average_surface_distance, compute_dice
from monai.transforms import Invertd
from monai.utils import set_determinism
from torch import nn

from monai_grata.data import TaskSpec, domain_datalist, split_train_val
from monai_grata.handlers.surface_distance import voxel_spacing
from monai_grata.tta import (
    PRESETS,
    AdaptationStep,
    PatchAdaptation,
    adapter_class,
    build_adapter,
    calibrated_options,
)
from monai_grata.utils.per_image import finite_mean

from .bundle import DEFAULT_BUNDLE, BundleSetup, bundle_setup

__all__ = [
    "Cell",
    "default_setup",
    "MethodSpec",
    "load_target",
    "parse_method",
    "predict_stream",
    "run_cell",
    "target_items",
]

VAL_SUFFIX = ":val"


@dataclass(frozen=True)
class MethodSpec:
    """A registered method name with constructor options, written ``name`` or ``name:key=value,key=value``."""

    name: str
    options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def label(self) -> str:
        """The canonical text of the spec (options sorted), used as the table row and the MLflow param."""
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in sorted(self.options.items()))


def _format_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a preset's 256.0 labels its cells as the command line's 256 does
    return str(value)


def _parse_value(text: str):
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("inf", "+inf"):
        return math.inf
    try:
        return json.loads(re.sub(r"(?<![A-Za-z])inf(?![A-Za-z])", "Infinity", text))
    except json.JSONDecodeError:
        return text


def parse_method(text: str) -> MethodSpec:
    """Parse ``name`` or ``name:key=value,...`` (values: numbers, ``true``/``false``, ``inf``, lists such as
    ``[inf,16,0]``, or text). A preset name (:data:`~monai_grata.tta.PRESETS`: ``default``, ``paper``,
    ``source_prior``, ...) stands for its method and options, written options overriding the preset's, so its cells
    are those of the spelled-out spec (``source_prior`` is ``norm:bn_prior=256``).

    Raises:
        ValueError: an option without ``=``.
    """
    name, _, rest = text.partition(":")
    options = {}
    for part in filter(None, re.split(r",(?![^\[]*\])", rest)):  # commas inside [...] belong to a list
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"method option {part!r} in {text!r} is not key=value")
        options[key.strip()] = _parse_value(value)
    name = name.strip()
    if name in PRESETS:  # its options as the preset names them (min_shift="calibrated" is resolved per cell)
        name, options = PRESETS[name]["method"], {**PRESETS[name]["options"], **options}
    return MethodSpec(name, options)


@dataclass(frozen=True)
class Cell:
    """One (method, source, target, seed) run of the benchmark."""

    method: MethodSpec
    source: str
    target: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method.label}|{self.source}|{self.target}|{self.seed}"


def target_items(dataset_dir: str, target: str, datalist: str | None = None) -> list[dict]:
    """The labelled items of a target domain in datalist order; ``DOMAIN:val`` is the source model's own held-out
    validation split of ``DOMAIN`` (the 80/20 split of ``split_train_val``, seed 0, as train.json makes it)."""
    if target.endswith(VAL_SUFFIX):
        return split_train_val(domain_datalist(dataset_dir, target[: -len(VAL_SUFFIX)], datalist))[1]
    return domain_datalist(dataset_dir, target, datalist)


_DEFAULT_SETUP: list[BundleSetup] = []


def default_setup() -> BundleSetup:
    """The setup of the benchmark's default bundle (:data:`~monai_grata.benchmark.bundle.DEFAULT_BUNDLE`), read
    once: what the functions below run when no ``setup`` is given."""
    if not _DEFAULT_SETUP:
        _DEFAULT_SETUP.append(bundle_setup(DEFAULT_BUNDLE))
    return _DEFAULT_SETUP[0]


def load_target(
    items: Sequence[dict], image_size: int = 256, setup: BundleSetup | None = None
) -> list[dict[str, torch.Tensor]]:
    """Preprocess every item once (as the bundle's inference does), so that all cells of a target share the tensors.

    Args:
        items: datalist items with labels.
        image_size: the network's input side, for tasks whose preprocessing resizes to a square.
        setup: the bundle (default: :func:`default_setup`).

    Returns:
        ``{"image", "label", "name"}`` per item (plain tensors; the label as the task's channels on the input's
        grid); for a task whose predictions are inverted to the label's grid also ``"grid"`` (the preprocessed
        image with the spatial steps it went through) and ``"preprocessing"`` (the transform to invert).

    Raises:
        ValueError: an item without a label (the benchmark scores every prediction).
    """
    setup = setup or default_setup()
    transform = setup.preprocessing(image_size)
    loaded = []
    for item in items:
        data = transform(dict(item))
        if "label" not in data:
            raise ValueError(f"benchmark items need labels; {item['image']!r} has none")
        entry = {"image": data["image"].as_tensor(), "label": data["label"].as_tensor(), "name": item["image"]}
        if setup.task.to_label_grid == "invert":
            entry.update(grid=data["image"], preprocessing=transform)
        loaded.append(entry)
    return loaded


def _to_label_grid(probs: torch.Tensor, item: dict, task: TaskSpec) -> tuple[torch.Tensor, tuple[float, ...] | None]:
    """One image's probabilities (1, K, *spatial) on its label's grid (K, *label spatial), and the voxel spacing
    there when the prediction was inverted to the input's own grid (then ASSD is in the input's units)."""
    if "grid" not in item:
        return task.resize(probs, tuple(item["label"].shape[1:]))[0], None
    invert = Invertd(keys="pred", transform=item["preprocessing"], orig_keys="image", nearest_interp=False)
    inverted = invert({"pred": MetaTensor(probs[0].cpu()), "image": item["grid"]})["pred"]
    return inverted.as_tensor().to(probs.device), voxel_spacing(inverted)


def _score(logits: torch.Tensor, item: dict, task: TaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and symmetric ASSD per channel of one image, the prediction mapped to the label's grid, then decoded
    into the task's channels (thresholded, or argmax then the label codec)."""
    probs, spacing = _to_label_grid(task.probabilities(logits.float()), item, task)
    pred = task.discretise(probs)[None]
    label = item["label"][None].to(pred.device)
    dice = compute_dice(pred, label, include_background=True, ignore_empty=True)[0]
    assd = compute_average_surface_distance(pred, label, include_background=True, symmetric=True, spacing=spacing)[0]
    return dice.cpu(), assd.cpu()


def _build_adapter(cell: Cell, model: nn.Module, task: TaskSpec, ckpt_path: str):
    """The cell's adapter around ``model``: the method's options over the task's (``multilabel``, the volume's
    in-plane views, ...; ``min_shift="calibrated"``: the threshold calibrated for ``ckpt_path``); ``seed`` is the
    cell's unless the method sets one."""
    options = calibrated_options(cell.method.options, ckpt_path)
    if "seed" in inspect.signature(adapter_class(cell.method.name)).parameters:
        options.setdefault("seed", cell.seed)
    return build_adapter(cell.method.name, model, task=task, **options)


def predict_stream(
    cell: Cell,
    images: Sequence[dict[str, torch.Tensor]],
    ckpt_path: str,
    device: str | torch.device = "cpu",
    adapter_stats: list[AdaptationStep] | None = None,
    setup: BundleSetup | None = None,
) -> tuple[list[torch.Tensor], float, nn.Module | None]:
    """Adapt the source model continually over ``images`` (batch size 1, in order); only ``item["image"]`` is
    read, never the label.

    Under a bundle's sliding-window inferer every volume is adapted on patches and then predicted window by window
    with the adapted weights and the patches' BatchNorm statistics (:class:`~monai_grata.tta.PatchAdaptation`, as
    :class:`~monai_grata.handlers.TTAHandler` runs it inside the bundle's evaluator); otherwise the adapter takes
    the whole image.

    Args:
        cell: method, source, target, seed.
        images: preprocessed items from :func:`load_target`.
        ckpt_path: the source model's checkpoint.
        device: where the model runs.
        adapter_stats: when given, the adapter's ``last_step`` of every image (cos, lr, stream_shift, ...) are
            appended to it, still on the device (read once the stream is done, not per image).
        setup: the bundle (network, inferer, task; default: :func:`default_setup`).

    Returns:
        The logits of every image (from the model adapted up to and including it), the seconds spent adapting
        and predicting, and the adapter (``None`` for ``none``).
    """
    setup = setup or default_setup()
    device = torch.device(device)
    set_determinism(seed=cell.seed)
    model = setup.build_model(ckpt_path).to(device)
    inferer = setup.inferer or (lambda x, network: network(x))
    if cell.method.name == "none":
        model.eval()
        adapter = predict = None
    else:
        adapter = _build_adapter(cell, model, setup.task, ckpt_path)
        if setup.sliding_window:
            patches = PatchAdaptation(adapter, setup.inferer.roi_size, setup.num_patches, setup.inferer.overlap)
            predict = lambda x: patches(x, setup.inferer)  # noqa: E731
        else:
            predict = adapter
    logits_all, elapsed = [], 0.0
    for item in images:
        x = item["image"][None].to(device)
        start = time.perf_counter()
        with torch.no_grad():
            logits = predict(x) if predict is not None else inferer(x, model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - start
        logits_all.append(logits)
        if adapter_stats is not None and adapter is not None:
            adapter_stats.append(adapter.last_step)  # 0-dim tensors still on the device
    return logits_all, elapsed, adapter


def run_cell(
    cell: Cell,
    images: Sequence[dict[str, torch.Tensor]],
    ckpt_path: str,
    device: str | torch.device = "cpu",
    setup: BundleSetup | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Adapt over ``images`` with :func:`predict_stream`, then score every prediction against its label.

    Args:
        cell: method, source, target, seed.
        images: preprocessed items from :func:`load_target`.
        ckpt_path: the source model's checkpoint.
        device: where the model runs.
        setup: the bundle (default: :func:`default_setup`); its task names the channels.

    Returns:
        The summary (``dice_<c>`` and ``assd_<c>`` for every channel ``c`` of the task, ``dice_mean``,
        ``n_images``, ``images_per_s``, ``n_skipped``, ``n_rolled_back``) and one row per image: its scores and,
        prefixed ``adapt_``, what the adapter reported for it (e.g. GraTa's ``cos``, ``lr`` and, gated,
        ``stream_shift``).
    """
    setup = setup or default_setup()
    channels = setup.task.channels
    stats: list[AdaptationStep] = []
    logits_all, elapsed, adapter = predict_stream(cell, images, ckpt_path, device, stats, setup)
    rows, dice, assd = [], [], []
    for item, logits, step in zip(images, logits_all, stats or [None] * len(images), strict=True):
        d, a = _score(logits, item, setup.task)
        dice.append(d)
        assd.append(a)
        rows.append({"filename": item["name"], **{f"dice_{c}": float(d[i]) for i, c in enumerate(channels)}})
        rows[-1].update({f"assd_{c}": float(a[i]) for i, c in enumerate(channels)})
        scalars = step.scalars() if step is not None else {}
        rows[-1].update({f"adapt_{k}": float(v) for k, v in scalars.items() if v.numel() == 1})
    dice_t, assd_t = torch.stack(dice), torch.stack(assd)
    summary: dict[str, float] = {}
    for i, c in enumerate(channels):
        summary[f"dice_{c}"] = finite_mean(dice_t[:, i])[0]
        summary[f"assd_{c}"] = finite_mean(assd_t[:, i])[0]
    summary["dice_mean"] = sum(summary[f"dice_{c}"] for c in channels) / len(channels)
    summary["n_images"] = len(images)
    summary["images_per_s"] = len(images) / elapsed if elapsed > 0 else float("nan")
    summary["n_skipped"] = getattr(adapter, "n_skipped", 0)
    summary["n_rolled_back"] = getattr(adapter, "n_rolled_back", 0)
    return summary, rows
