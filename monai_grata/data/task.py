"""What a segmentation task is, in one small object: its output channels, how they are activated and decoded, how
its labels are read and written, its spatial layout and preprocessing. Adapters, reports and the benchmark read it
instead of assuming one task."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.nn import functional as F

from monai_grata.transforms import (
    DiscCupFromLabel,
    LabelFromDiscCup,
    LabelFromNestedChannels,
    NestedChannelsFromLabel,
    StrongIntensityAug,
    weak_views,
)

from .preprocessing import fundus_preprocessing
from .volumes import volume_preprocessing

__all__ = [
    "ACTIVATIONS",
    "FUNDUS",
    "SPINALCORD",
    "TASKS",
    "TaskSpec",
    "register_task",
    "resolve_task",
    "task_by_name",
    "task_of_bundle",
]

ACTIVATIONS = ("sigmoid", "softmax")
#: the key of a bundle's ``configs/metadata.json`` that names its task (one of :data:`TASKS`)
METADATA_KEY = "task_spec"


@dataclass(frozen=True)
class TaskSpec:
    """A segmentation task as the generic code needs to know it.

    Args:
        name: a short name, e.g. ``"fundus"``.
        channels: the names of the scored channels, e.g. ``("od", "oc")``; reports write ``dice_<name>``.
        activation: ``"sigmoid"``: one independent (multi-label) output per channel, thresholded at 0.5;
            ``"softmax"``: mutually exclusive classes (background first), decoded by argmax into a label map and
            then by ``label_to_channels`` into the scored channels.
        spatial_dims: 2 for images, 3 for volumes.
        view_axes: the two spatial axes (negative axes of a batch (B, C, *spatial)) that augmentation-based methods
            may flip, turn, crop or pad: GraTa's weak views, DUA's copies, in-plane blur. Any other axis, such as a
            volume's slice axis, is left as it is.
        preprocessing: a factory of the transform that loads a labelled item for scoring: image preprocessed for the
            network, label kept on the input's grid as the scored channels, every spatial step invertible.
        label_to_channels: a label map (1, *spatial) to the scored channels (len(channels), *spatial).
        channels_to_label: the scored channels back to a label map, for mask files.
        structures: the structures' names for people (e.g. ``("disc", "cup")``).
        mask_legend: what the values of a written label map mean.
        to_label_grid: how a prediction reaches its label's grid for scoring: ``"resize"`` (bilinear, when the
            preprocessing only resized) or ``"invert"`` (``monai.transforms.Invertd`` through the preprocessing:
            orientation, spacing, crop).
    """

    name: str
    channels: tuple[str, ...]
    activation: str
    spatial_dims: int
    view_axes: tuple[int, int]
    preprocessing: Callable = field(compare=False)
    label_to_channels: Callable[[torch.Tensor], torch.Tensor] = field(compare=False)
    channels_to_label: Callable[[torch.Tensor], torch.Tensor] = field(compare=False)
    structures: tuple[str, ...] = ()
    mask_legend: str = ""
    to_label_grid: str = "resize"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"task {self.name!r}: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"task {self.name!r}: spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if not self.channels:
            raise ValueError(f"task {self.name!r}: no channel names")
        if self.to_label_grid not in ("resize", "invert"):
            raise ValueError(
                f"task {self.name!r}: to_label_grid must be 'resize' or 'invert', got {self.to_label_grid!r}"
            )
        axes = tuple(int(a) for a in self.view_axes)
        if len(axes) != 2 or len(set(axes)) != 2 or any(not -self.spatial_dims <= a <= -1 for a in axes):
            raise ValueError(
                f"task {self.name!r}: view_axes must be two different spatial axes in "
                f"[{-self.spatial_dims}, -1], got {self.view_axes}"
            )
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "view_axes", axes)
        object.__setattr__(self, "structures", tuple(self.structures) or self.channels)

    @property
    def multilabel(self) -> bool:
        """Whether the channels are independent sigmoid outputs (the adapters' ``multilabel``)."""
        return self.activation == "sigmoid"

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The network's output (B, K, *spatial) as probabilities: sigmoid per channel or softmax over channels."""
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)

    def discretise(self, probs: torch.Tensor) -> torch.Tensor:
        """Probabilities of one image (K, *spatial) to the scored binary channels (len(channels), *spatial):
        threshold 0.5 (sigmoid) or argmax into a label map, then :attr:`label_to_channels` (softmax)."""
        if self.multilabel:
            return (probs >= 0.5).float()
        return self.label_to_channels(torch.argmax(probs, dim=0, keepdim=True)).float()

    def resize(self, probs: torch.Tensor, spatial_size: tuple[int, ...]) -> torch.Tensor:
        """Probabilities (B, K, *spatial) resampled (bi/trilinear) to ``spatial_size``: a prediction mapped to a
        label's grid when the preprocessing was a plain resize."""
        if tuple(probs.shape[2:]) == tuple(spatial_size):
            return probs
        mode = "bilinear" if probs.ndim == 4 else "trilinear"
        return F.interpolate(probs, size=spatial_size, mode=mode, align_corners=False)

    def make_preprocessing(self, **kwargs):
        """:attr:`preprocessing` called with those of ``kwargs`` it takes (e.g. ``image_size`` for a task that
        resizes to a square); the others are ignored, so one command line serves every task."""
        params = inspect.signature(self.preprocessing).parameters
        return self.preprocessing(**{k: v for k, v in kwargs.items() if k in params})

    def adapter_options(self, adapter_class: type, seed: int = 0) -> dict:
        """The constructor options an adapter class needs for this task, among those it takes: ``multilabel``,
        and for volumes the weak views (``views``), DUA's ``plane`` and the strong view's blur axes restricted to
        :attr:`view_axes`, so no augmentation flips, turns, crops or blurs along the slice axis.

        Args:
            adapter_class: a registered adapter class (e.g. ``adapter_class("grata")``).
            seed: the seed of the strong view built here (the adapter's own ``seed``).
        """
        params = inspect.signature(adapter_class).parameters
        options: dict = {}
        if "multilabel" in params:
            options["multilabel"] = self.multilabel
        if self.spatial_dims == 3:  # the 2D defaults already keep to the image's plane
            if "views" in params:
                options["views"] = weak_views(3, flip_axes=self.view_axes, plane=self.view_axes)
            if "plane" in params:
                options["plane"] = self.view_axes  # the same negative axes in an image (C, H, W, D)
            if "strong_transform" in params:
                options["strong_transform"] = StrongIntensityAug(blur_axes=self.view_axes, seed=seed)
        return options


FUNDUS = TaskSpec(
    name="fundus",
    channels=("od", "oc"),
    activation="sigmoid",
    spatial_dims=2,
    view_axes=(-2, -1),
    preprocessing=partial(fundus_preprocessing, resize_label=False),
    label_to_channels=DiscCupFromLabel(),
    channels_to_label=LabelFromDiscCup(),
    structures=("disc", "cup"),
    mask_legend="0 background, 1 disc rim, 2 cup",
)

SPINALCORD = TaskSpec(
    name="spinalcord",
    channels=("cord", "gm"),
    activation="softmax",
    spatial_dims=3,
    view_axes=(-3, -2),
    preprocessing=partial(volume_preprocessing, transform_label=False),
    label_to_channels=NestedChannelsFromLabel(structures=("white matter", "gray matter")),
    channels_to_label=LabelFromNestedChannels(("cord", "gray matter")),
    structures=("cord", "GM"),
    mask_legend="0 background, 1 white matter, 2 gray matter; NIfTI on each input's grid",
    to_label_grid="invert",
)

#: the registered tasks by name
TASKS: dict[str, TaskSpec] = {task.name: task for task in (FUNDUS, SPINALCORD)}
#: the task of each shipped bundle, by the bundle's folder name (a bundle's metadata.json may name it instead)
BUNDLE_TASKS = {"grata": "fundus", "spinalcord_gm": "spinalcord"}


def register_task(task: TaskSpec) -> TaskSpec:
    """Make ``task`` known by its name, so bundle configs (``"task": "<name>"``), reports and ``metadata.json``'s
    ``task_spec`` can name it.

    Args:
        task: the task; its name must be new.

    Raises:
        ValueError: a name already taken by another task.
    """
    if task.name in TASKS and TASKS[task.name] is not task:
        raise ValueError(f"a task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def task_by_name(name: str) -> TaskSpec:
    """The registered task ``name``.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def resolve_task(task: TaskSpec | str | None) -> TaskSpec | None:
    """A task given as a :class:`TaskSpec`, a registered name (as a bundle config writes it) or ``None``.

    Raises:
        KeyError: an unknown name.
    """
    return task_by_name(task) if isinstance(task, str) else task


def task_of_bundle(bundle_dir: str) -> TaskSpec:
    """The task of a bundle: the ``task_spec`` entry of its ``configs/metadata.json`` when there is one, else the
    shipped bundle of that folder name (``grata``: fundus, ``spinalcord_gm``: spinal cord).

    Args:
        bundle_dir: the bundle's root folder.

    Raises:
        ValueError: a bundle whose task is not known.
    """
    metadata = os.path.join(bundle_dir, "configs", "metadata.json")
    if os.path.isfile(metadata):
        with open(metadata) as f:
            name = json.load(f).get(METADATA_KEY)
        if name is not None:
            return task_by_name(name)
    folder = os.path.basename(os.path.normpath(bundle_dir))
    if folder not in BUNDLE_TASKS:
        raise ValueError(
            f'the task of bundle {bundle_dir!r} is unknown: add "{METADATA_KEY}": one of {sorted(TASKS)} to its '
            "configs/metadata.json"
        )
    return TASKS[BUNDLE_TASKS[folder]]
