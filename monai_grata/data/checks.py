"""Checks that turn a user's data mistakes into one clear error before any work starts."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from monai.transforms import LoadImaged
from torch.utils.data import DataLoader

from monai_grata.transforms import EnsureImageChannelsd, NestedChannelsFromLabeld

from .task import TaskSpec, resolve_task

__all__ = [
    "BAD_INPUT_CHOICES",
    "BadInputError",
    "MissingInputError",
    "check_inputs",
    "check_loader",
    "exit_on_bad_input",
]

BAD_INPUT_CHOICES = ("error", "skip")
logger = logging.getLogger(__name__)


class BadInputError(ValueError):
    """A problem with the user's data or options, stated in one line that names the file (or option) and what
    to change; inside :func:`exit_on_bad_input` it ends the program as that one line, without a traceback."""


class MissingInputError(BadInputError, FileNotFoundError):
    """A file or folder the user named (or a datalist lists) does not exist."""


def check_loader(loader: DataLoader, what: str, option: str = "--batch_size") -> DataLoader:
    """Return ``loader``, or raise when it yields no batch at all.

    A ``DataLoader`` with ``drop_last=True`` and fewer items than ``batch_size`` is empty: an engine run on it
    would do nothing and exit successfully (MONAI only warns). The bundle configs fail instead, naming the
    numbers and the option to change; they never shrink the batch behind the user's back, so the
    ``batch_size`` logged in MLflow is the one that ran.

    Args:
        loader: the data loader to check.
        what: what it loads, for the message (e.g. ``"the training split of 'refuge_train'"``).
        option: the command-line option that sets its batch size.

    Raises:
        BadInputError: when ``len(loader) == 0``.
    """
    if len(loader) > 0:
        return loader
    n, batch_size = len(loader.sampler), loader.batch_size  # a DistributedSampler: this rank's share
    if n == 0:
        raise BadInputError(f"no images in {what}: add images or point --dataset_dir/--datalist at them")
    raise BadInputError(
        f"{what} has {n} images, fewer than one batch ({option} {batch_size}, incomplete batches dropped): "
        f"pass {option} {n} or less, or add images"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _problem(
    item: dict, load: Callable, channels: Callable, labels: Callable, min_size: Sequence[int]
) -> str | None:
    """What is wrong with one ``{"image", "label"}`` item (naming the file), or ``None``."""
    data = {}
    for key in ("image", "label"):
        if key in item:
            try:
                data.update(load({key: item[key]}))
            except Exception as err:  # PIL, nibabel and MONAI raise many types for an unreadable file
                return f"{key} {str(item[key])!r} cannot be read ({_first_line(err)})"
    try:
        image = channels(data)["image"]
        if any(n < m for n, m in zip(image.shape[1:], min_size, strict=True)):
            size, least = ("x".join(str(n) for n in shape) for shape in (image.shape[1:], min_size))
            return f"image {str(item['image'])!r} is {size}: too small to segment (the least is {least})"
        finite = torch.isfinite(torch.as_tensor(image))
        if not finite.all():
            return f"image {str(item['image'])!r} has {int((~finite).sum())} NaN/Inf pixels"
        if "label" in data and tuple(data["label"].shape[1:]) != tuple(image.shape[1:]):
            sizes = ["x".join(str(n) for n in t.shape[1:]) for t in (data["label"], image)]
            return f"label {str(item['label'])!r} is {sizes[0]}, its image {str(item['image'])!r} is {sizes[1]}"
        if "label" in data:
            labels(data)
    except ValueError as err:  # the transforms' own messages name the file and the problem
        return str(err)
    return None


def _label_structures(task: TaskSpec | str | None) -> tuple[tuple[str, str], ...]:
    """The names of label values 1 and 2 in ``task``'s label codec, as a 0- or 1-tuple of arguments."""
    codec = getattr(resolve_task(task), "label_to_channels", None)
    names = getattr(codec, "structures", None)
    return (tuple(names),) if names is not None and len(names) == 2 else ()


def check_inputs(
    items: Sequence[dict],
    in_channels: int = 3,
    spatial_dims: int = 2,
    label_values: Sequence[int] = (0, 1, 2),
    on_bad_input: str = "error",
    min_size: int | Sequence[int] = 16,
    task: TaskSpec | str | None = None,
) -> tuple[list[dict], list[dict]]:
    """Read every image (and label) once before any work starts, so a bad file stops the run up front (or is
    left out) instead of aborting a stream part-way.

    Each item is loaded as the preprocessing loads it (``LoadImaged``, then :class:`EnsureImageChannelsd`,
    which turns a grayscale image into 3 channels and drops the alpha channel of an RGBA one). Problems found:
    an unreadable or truncated file, an image with a channel count that cannot be converted, an image with
    a side under ``min_size`` pixels (a 1x1 "image" holds nothing to segment), NaN or Inf pixels, a label whose
    size differs from its image's, a label with more than one channel or with values outside
    ``label_values``.

    Args:
        items: the datalist, ``[{"image": path, "label": path (optional), ...}, ...]``.
        in_channels: channels the network takes.
        spatial_dims: 2 for images, 3 for volumes.
        label_values: the values a label map may hold.
        on_bad_input: ``"error"`` raises :class:`BadInputError` naming every bad file; ``"skip"`` logs a
            warning per bad file and leaves it out.
        min_size: the smallest image side accepted, in pixels: one for every axis, or one per spatial axis (a
            slice-wise network takes a volume of any number of slices: e.g. ``(8, 8, 1)``).
        task: the task (a :class:`~monai_grata.data.TaskSpec` or a registered name) whose label codec names the
            label values in a message (e.g. "1 optic disc rim, 2 optic cup"); None: "1 outer structure, 2 inner
            structure".

    Returns:
        (the usable items, in order; ``[{"image": path, "reason": text}, ...]`` for the items left out).

    Raises:
        BadInputError: a bad file with ``on_bad_input="error"``, no usable item left, or an unknown
            ``on_bad_input``.
    """
    if on_bad_input not in BAD_INPUT_CHOICES:
        raise BadInputError(f"--on_bad_input must be one of {'|'.join(BAD_INPUT_CHOICES)}, got {on_bad_input!r}")
    load = LoadImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True, allow_missing_keys=True)
    channels = EnsureImageChannelsd(keys="image", in_channels=in_channels, spatial_dims=spatial_dims)
    labels = NestedChannelsFromLabeld("label", tuple(label_values), True, *_label_structures(task))
    min_size = (min_size,) * spatial_dims if isinstance(min_size, int) else tuple(min_size)
    if len(min_size) != spatial_dims:
        raise ValueError(f"min_size needs one side per spatial axis ({spatial_dims}), got {min_size}")
    if not items:
        raise BadInputError("empty dataset: no images to check")
    kept, skipped = [], []
    for item in items:
        problem = _problem(item, load, channels, labels, min_size)
        if problem is None:
            kept.append(item)
        else:
            skipped.append({"image": str(item["image"]), "reason": problem})
    if skipped and on_bad_input == "error":
        reasons = "; ".join(entry["reason"] for entry in skipped[:10])
        more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        raise BadInputError(
            f"{len(skipped)} bad input{'s' if len(skipped) > 1 else ''}: {reasons}{more} "
            "(fix or remove the files, or pass --on_bad_input skip to leave them out)"
        )
    for entry in skipped:
        logger.warning(f"skipping {entry['reason']}")
    if not kept:
        raise BadInputError(f"no usable input: all {len(skipped)} images are bad (first: {skipped[0]['reason']})")
    return kept, skipped


def _bad_input(error: BaseException | None) -> BadInputError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BadInputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def exit_on_bad_input() -> Iterator[None]:
    """Within the block (or the decorated function), a :class:`BadInputError`, also one that caused another
    exception (MONAI wraps errors raised in a bundle config), ends the program with the one line
    ``error: <message>`` and no traceback, by raising ``SystemExit``; every other exception passes unchanged.
    For the steps of a bundle job that check what the user gave (:mod:`monai_grata.engines.inference`,
    :func:`monai_grata.engines.job_step`), never for library functions, which raise :class:`BadInputError` for their
    caller to handle.

    Example::

        @exit_on_bad_input()
        def job_step(path): ...
    """
    try:
        yield
    except Exception as error:
        bad = _bad_input(error)
        if bad is None:
            raise
        raise SystemExit(f"error: {bad}") from None
