"""Named adaptation settings, and the one rule that decides which option value a run uses.

Presets: ``inference.json --method default`` (the shipped default, also ``stem_gated``), ``--method paper``,
``--method stem_site_gated`` (the default with a site gate), ``--method stem_statistics`` (the default before),
``--method grata_calibrated`` (the one before that), ``--method grata_gated`` and ``--method source_prior``; the
benchmark accepts the same names (``--methods default paper source_prior``).

Precedence (:func:`resolve_method`), lowest first:

1. the adapter constructor's own defaults;
2. what the task decides (:meth:`~monai_grata.data.TaskSpec.adapter_options`: ``multilabel``, a volume's in-plane
   views, DUA's plane, the strong view's blur axes), when the run names its task;
3. the preset's options (``--method grata_calibrated`` sets ``beta`` 1e-3, ``steps`` 3, ...);
4. the bundle config's explicit choices for that adapter (its ``adapter_kwargs``, e.g. ``n_augmentations: 16``),
   which never restate a constructor default or what the task decides;
5. what the user passed on the command line (``--beta 1e-4``), or as keyword arguments to
   :class:`~monai_grata.handlers.TTAHandler`.

An option the user did not set is ``None`` (the bundle configs' top-level options are ``null``) and takes no part;
so ``--method grata_calibrated --beta 1e-4`` runs beta 1e-4, whatever the constructor's default is. Options whose
meaningful values include ``None`` (GraTa's ``radius``, ``min_cos``, ``min_shift``) cannot be set back to ``None``
from the command line (MONAI's command line drops a ``None`` value, too): pick a method that does not set them
(``--method grata --bn_prior 256 --beta 1e-3 --steps 3`` is ``grata_gated`` without the gate), or write ``null`` for
them in the bundle config's ``adapter_kwargs``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .base import adapter_class, adapter_defaults, adapter_names
from .calibration import read_first_shift_threshold, read_shift_threshold

if TYPE_CHECKING:
    from monai_grata.data.task import TaskSpec

__all__ = ["CALIBRATED", "PRESETS", "calibrated_options", "effective_options", "resolve_method"]

#: preset name -> the registered method it runs and the options it fixes (over the constructor's defaults).
#: ``paper``: GraTa exactly as the paper and the authors' code run it (the same as ``--method grata``).
#: ``default`` (also ``stem_gated``, a name that stays when the default moves on): no gradient step; for a test
#: image far from the source, the network's first BatchNorm (the stem's, which sees the image's colour and
#: contrast) normalises with the image's own statistics, every other layer with the source's (``bn_first_layers``
#: 1, ``bn_prior`` inf); "far": its first BatchNorm input's divergence from the source statistics exceeds the
#: threshold calibrated for the source model (``bn_first_min_shift="calibrated"``, the ``first_layer`` entry of its
#: ``<checkpoint>.shift.json``); a closer image is predicted by the source model as it is. One forward per image
#: (docs/results.md, "Gating the stem by the model's own images").
#: ``stem_site_gated``: ``stem_gated`` with a site gate: once the median first-layer divergence of the stream's images
#: (five at least) exceeds the 90th percentile of the model's training images (``bn_first_site_min_shift=
#: "calibrated"``), every image of the stream takes the stem statistics, those the per-image gate would keep too.
#: ``stem_statistics``: the default before that one: the stem on every image's own statistics, ungated (no
#: calibration needed; up to 0.008 Dice lost on the source's own images).
#: ``grata_calibrated``: the default before the stem: GraTa, three updates per image at beta 1e-3 on the source
#: prior of 256, updating only while the stream's mean BatchNorm shift from the source statistics exceeds the
#: threshold calibrated for the source model (``min_shift="calibrated"``: its ``<checkpoint>.shift.json``,
#: :mod:`monai_grata.tta.calibration`); the weak views' teacher computed once per image and reused by its later
#: updates, in channels-last memory (``reuse_teacher``, ``teacher_channels_last``; docs/performance.md).
#: ``grata_gated``: the three updates with a teacher each and the hand-set threshold 0.18 read off the three shipped
#: fundus models (docs/results.md, "A shift gate": +0.0246, +0.0346, +0.0326 mean Dice over No Adapt on the report
#: split in three seeds, no pair below it by more than 0.002, every no-shift split within 0.001).
#: ``source_prior``: BatchNorm statistics alone, the source counted as 256 images (as safe, one forward per image,
#: no gain).
#: the ``min_shift`` that stands for the threshold calibrated for the source checkpoint (:func:`calibrated_options`)
CALIBRATED = "calibrated"
_GATED_GRATA = {"bn_prior": 256.0, "beta": 1e-3, "steps": 3}
_STEM = {"bn_prior": math.inf, "bn_first_layers": 1}
PRESETS: dict[str, dict] = {
    "paper": {"method": "grata", "options": {}},
    "default": {"method": "norm", "options": {**_STEM, "bn_first_min_shift": CALIBRATED}},
    "stem_gated": {"method": "norm", "options": {**_STEM, "bn_first_min_shift": CALIBRATED}},
    "stem_site_gated": {
        "method": "norm",
        "options": {**_STEM, "bn_first_min_shift": CALIBRATED, "bn_first_site_min_shift": CALIBRATED},
    },
    "stem_statistics": {"method": "norm", "options": dict(_STEM)},
    "grata_calibrated": {
        "method": "grata",
        "options": {**_GATED_GRATA, "min_shift": CALIBRATED, "reuse_teacher": True, "teacher_channels_last": True},
    },
    "grata_gated": {"method": "grata", "options": {**_GATED_GRATA, "min_shift": 0.18}},
    "source_prior": {"method": "norm", "options": {"bn_prior": 256.0}},
}


def resolve_method(
    method: str,
    adapter_kwargs: Mapping[str, Mapping] | None = None,
    overrides: Mapping | None = None,
    task: TaskSpec | str | None = None,
    ckpt_path: str | None = None,
) -> tuple[str, dict]:
    """The registered adapter name and the constructor options for ``method``, by the module's precedence rule:
    the task's options < preset < the bundle's ``adapter_kwargs`` for that adapter < ``overrides`` that are not
    ``None``.

    Args:
        method: a preset name (:data:`PRESETS`: ``"default"``, ``"paper"``, ``"grata_calibrated"``, ...) or a registered
            adapter name (``"grata"``, ...).
        adapter_kwargs: per registered name, the options the bundle config chooses.
        overrides: the options the user passed (on the command line); ``None`` values mean "not set".
        task: the run's task (a :class:`~monai_grata.data.TaskSpec` or a registered name such as ``"spinalcord"``):
            fills what it decides for the adapter (its strong view seeded with the resolved ``seed``). None: no
            task's options (the adapter then needs ``multilabel`` from the other layers).
        ckpt_path: the source checkpoint, whose calibration file gives ``min_shift="calibrated"`` its value
            (:func:`calibrated_options`); None: such an option is an error.

    Returns:
        (adapter name, options) for :func:`~monai_grata.tta.build_adapter`: only the options someone set, so the
        constructor's defaults hold for the rest.
    """
    preset = PRESETS.get(method, {"method": method, "options": {}})
    name = preset["method"]
    configured = dict((adapter_kwargs or {}).get(name, {}))
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    options = {**preset["options"], **configured, **given}
    if name in adapter_names():
        options = calibrated_options(options, ckpt_path)
    if task is None or name not in adapter_names():  # "none" (no adaptation) has no options
        return name, options
    from monai_grata.data.task import resolve_task  # the data package imports transforms, not adapters

    decided = resolve_task(task).adapter_options(adapter_class(name), seed=options.get("seed", 0))
    return name, {**decided, **options}


def calibrated_options(options: Mapping, ckpt_path: str | None) -> dict:
    """``options`` with ``min_shift="calibrated"`` replaced by the threshold calibrated for ``ckpt_path``
    (:func:`~monai_grata.tta.read_shift_threshold`, checked against the options' ``bn_prior``) and
    ``bn_first_min_shift="calibrated"`` by the first-layer one (:func:`~monai_grata.tta.read_first_shift_threshold`,
    for ``bn_first_layers`` 1), ``bn_first_site_min_shift="calibrated"`` by the first layer's site gate; other
    options as they are.

    Args:
        options: an adapter's options.
        ckpt_path: the source checkpoint the adapter starts from.

    Raises:
        ValueError: a ``"calibrated"`` option without a checkpoint, or a first-layer one (``bn_first_min_shift``,
            ``bn_first_site_min_shift``) with ``bn_first_layers`` other than 1 (the calibration measures the first
            layer).
        MissingInputError: no calibration file beside the checkpoint (the message names the command that makes it).
    """
    options = dict(options)
    keys = ("min_shift", "bn_first_min_shift", "bn_first_site_min_shift")
    wanted = [key for key in keys if options.get(key) == CALIBRATED]
    if wanted and ckpt_path is None:
        raise ValueError(
            f"{wanted[0]}='calibrated' is the threshold calibrated for the source checkpoint: give its ckpt_path "
            "(or a number)"
        )
    if "min_shift" in wanted:
        options["min_shift"] = read_shift_threshold(ckpt_path, bn_prior=options.get("bn_prior"))
    for key in [k for k in wanted if k.startswith("bn_first_")]:
        if options.get("bn_first_layers") != 1:
            raise ValueError(
                f"{key}='calibrated' is calibrated on the first BatchNorm layer: it needs bn_first_layers 1, got "
                f"{options.get('bn_first_layers')}"
            )
        options[key] = read_first_shift_threshold(ckpt_path, site=key == "bn_first_site_min_shift")
    return options


def effective_options(name: str, options: Mapping) -> dict:
    """Every constructor option of the registered adapter ``name`` as a run with ``options`` uses it: the
    constructor's defaults updated with ``options`` (what to log as the run's parameters).

    Args:
        name: a registered adapter name.
        options: the options passed to :func:`~monai_grata.tta.build_adapter` (from :func:`resolve_method`).
    """
    return {**adapter_defaults(name), **options}
