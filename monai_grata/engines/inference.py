"""The named steps of the bundles' main job (``configs/inference.json``): the config composes them.

Each step that checks what the user gave (data, checkpoint, output folder, method options) ends the program with
one line, ``error: <problem>``, when it is wrong (:func:`~monai_grata.data.exit_on_bad_input`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from monai_grata.data import BadInputError, TaskSpec, check_inputs, exit_on_bad_input, target_datalist
from monai_grata.networks import load_weights
from monai_grata.tta import TTAdapter, build_adapter, effective_options, resolve_method
from monai_grata.utils.files import make_output_dir
from monai_grata.utils.run_config import export_run_config

__all__ = [
    "JOB_OPTIONS",
    "JobInputs",
    "check_job_options",
    "inference_handlers",
    "job_adapter",
    "job_inputs",
    "job_method",
    "prepare_output_dir",
    "run_name",
    "run_params",
    "source_network",
]

NO_ADAPTATION = "none"

#: The adaptation options a bundle's main job takes on the command line (``--beta 1e-4``), config key -> the
#: adapter option it sets; the one list of them. Each bundle's ``configs/inference.json`` declares every key as
#: ``null`` at its top level (not set: the preset's or the constructor's value holds) and passes them on in its
#: ``options`` map; :func:`check_job_options` (run by ``monai_grata.utils.verify_bundle``) holds the configs to it.
JOB_OPTIONS: dict[str, str] = {
    "beta": "beta",
    "lr": "lr",
    "steps": "steps",
    "episodic": "episodic",
    "bn_prior": "bn_prior",
    "bn_momentum": "bn_momentum",
    "bn_first_layers": "bn_first_layers",
    "bn_first_prior": "bn_first_prior",
    "bn_first_min_shift": "bn_first_min_shift",
    "bn_first_site_min_shift": "bn_first_site_min_shift",
    "aux": "aux",
    "pseudo": "pseudo",
    "activation": "activation",
    "align": "align",
    "dynamic_lr": "dynamic_lr",
    "radius": "radius",
    "min_cos": "min_cos",
    "min_shift": "min_shift",
    "detta_denoiser": "denoiser",
}


def check_job_options(config: Mapping) -> list[str]:
    """The ways a main-job config (``configs/inference.json``) departs from :data:`JOB_OPTIONS`.

    Args:
        config: the config's content (its top-level keys).

    Returns:
        one message per problem: an option key not declared ``null`` at the top level, or an ``options`` map that
        does not pass every key on as ``"@key"`` under its option name (and nothing else).
    """
    problems = [
        f'option {key!r} must be declared at the top level as "{key}": null'
        for key in JOB_OPTIONS
        if key not in config or config[key] is not None
    ]
    expected = {option: f"@{key}" for key, option in JOB_OPTIONS.items()}
    given = config.get("options")
    if given != expected:
        given = given if isinstance(given, dict) else {}
        wrong = sorted(k for k in {*expected, *given} if given.get(k) != expected.get(k))
        problems.append(f'"options" must pass each option on from its key ("beta": "@beta", ...); wrong: {wrong}')
    return problems


@dataclass
class JobInputs:
    """The images a job runs on, after the input check.

    Args:
        items: the usable datalist items, in stream order.
        skipped: the items left out, ``[{"image": path, "reason": text}, ...]``.
        label_keys: the item keys that hold a label (an item with any of them is labelled).
    """

    items: list[dict]
    skipped: list[dict] = field(default_factory=list)
    label_keys: Sequence[str] = ("label",)

    @property
    def has_labels(self) -> bool:
        """Whether every image has a label, so the job can score itself."""
        return all(any(key in item for key in self.label_keys) for item in self.items)

    @property
    def targets(self) -> str:
        """The target domains in stream order, joined by ``+``."""
        return "+".join(dict.fromkeys(str(item.get("domain", "")) for item in self.items))


@exit_on_bad_input()
def job_inputs(
    dataset_dir: str,
    target: str | Sequence[str] | None = None,
    source: str | None = None,
    datalist: str | None = None,
    max_images: int | None = None,
    in_channels: int = 3,
    spatial_dims: int = 2,
    on_bad_input: str = "error",
    min_size: int | Sequence[int] = 16,
    exclude_domains: Sequence[str] = (),
    label_keys: Sequence[str] = ("label",),
    task: TaskSpec | str | None = None,
) -> JobInputs:
    """The target images of a job (:func:`~monai_grata.data.target_datalist`), the first ``max_images``, each
    read once by :func:`~monai_grata.data.check_inputs` before any work.

    Args:
        dataset_dir: the dataset folder.
        target: the target domain(s); ``None`` for every domain but the source.
        source: the source domain, left out when ``target`` is ``None``.
        datalist: an optional datalist file.
        max_images: keep only the first images of the stream (``None`` for all).
        in_channels: channels the network takes.
        spatial_dims: 2 for images, 3 for volumes.
        on_bad_input: ``"error"`` or ``"skip"`` (see :func:`~monai_grata.data.check_inputs`).
        min_size: the smallest image side accepted, for every axis or per axis.
        exclude_domains: domains left out as well (e.g. every source of a multi-source model).
        label_keys: the item keys that hold a label.
        task: the job's task, whose label codec names the label values in a message about a bad label.

    Raises:
        SystemExit: ``error: <problem>`` for a missing folder or datalist, a bad file (with ``"error"``) or no
            usable image.
    """
    items = [i for i in target_datalist(dataset_dir, target, source, datalist) if i["domain"] not in exclude_domains]
    kept, skipped = check_inputs(
        items[:max_images], in_channels, spatial_dims, on_bad_input=on_bad_input, min_size=min_size, task=task
    )
    return JobInputs(kept, skipped, tuple(label_keys))


@exit_on_bad_input()
def source_network(network: nn.Module, ckpt_path: str, device: str | torch.device = "cpu") -> nn.Module:
    """``network`` with the source checkpoint's weights, on ``device``.

    Args:
        network: the network (its architecture matches the checkpoint).
        ckpt_path: the source checkpoint.
        device: where to run it.

    Raises:
        SystemExit: ``error: <problem>`` for a missing or unreadable checkpoint.
    """
    return load_weights(network, ckpt_path).to(torch.device(device))


@exit_on_bad_input()
def prepare_output_dir(output_dir: str, config_name: str = "config.json") -> str:
    """Create ``output_dir`` (checked writable) and save the run's config with its command-line overrides there.

    Args:
        output_dir: the run's output folder.
        config_name: the file name of the saved config.

    Raises:
        SystemExit: ``error: <problem>`` when the folder cannot be written.
    """
    make_output_dir(output_dir)
    return export_run_config(f"{output_dir}/{config_name}")


@exit_on_bad_input()
def job_method(
    method: str,
    adapter_kwargs: Mapping[str, Mapping] | None,
    options: Mapping | None,
    task: TaskSpec | str | None,
    ckpt_path: str | None,
) -> tuple[str, dict]:
    """The adapter name and options a job runs, by :func:`~monai_grata.tta.resolve_method`'s precedence (preset <
    the bundle's ``adapter_kwargs`` < the command line).

    Args:
        method: the method as the user named it (a preset or a registered adapter).
        adapter_kwargs: per registered adapter, the options the bundle config chooses.
        options: the command line's options (``None``: not set).
        task: the job's task.
        ckpt_path: the source checkpoint, whose calibration gives ``min_shift="calibrated"`` (``grata_calibrated``)
            its threshold.

    Raises:
        SystemExit: ``error: <problem>`` for a source model without the calibration the method needs (the message
            names the command that writes it).
    """
    return resolve_method(method, adapter_kwargs, options, task, ckpt_path)


@exit_on_bad_input()
def job_adapter(method: tuple[str, Mapping], network: nn.Module) -> TTAdapter | None:
    """The test-time adapter of a job around ``network``, or ``None`` for no adaptation.

    Args:
        method: (adapter name, options) as :func:`~monai_grata.tta.resolve_method` returns them; the name
            ``"none"`` for no adaptation.
        network: the network to adapt (in place).

    Raises:
        SystemExit: ``error: <problem>`` for an option the adapter does not take, or a file an option names
            that is missing or unreadable (DeTTA's denoiser).
    """
    name, options = method
    if name == NO_ADAPTATION:
        return None
    try:
        return build_adapter(name, network, **options)
    except TypeError as error:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if unknown is None:
            raise
        raise BadInputError(f"--{unknown.group(1)} does not apply to the method {name!r}: leave it out") from error


def run_name(method: str, source: str, inputs: JobInputs) -> str:
    """``<method>_<source>_to_<targets>_<date-time>``, the MLflow run name of a job.

    Args:
        method: the method as the user named it (a preset or an adapter).
        source: the source domain(s) of the model.
        inputs: the job's inputs (their domains are the targets).
    """
    return "_".join([method, source, "to", inputs.targets, time.strftime("%Y%m%d-%H%M%S")])


def _param(value):
    """An option's value as an MLflow param: plain values as they are, anything else by its type's name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return str(list(value))
    return type(value).__name__


def run_params(method: str, resolved: tuple[str, Mapping], **fields) -> dict:
    """The MLflow params of a job: what ran, nothing that may not have.

    ``method`` as the user named it, ``adapter`` (the registered adapter that ran, ``"none"`` for none), every
    option of that adapter as it ran (its constructor's defaults updated with the resolved options, one param each;
    an object option such as a transform by its type's name), then ``fields`` (source, target, seed, ...), which
    win over an adapter option of the same name.

    Args:
        method: the method as the user named it.
        resolved: (adapter name, options) from :func:`~monai_grata.tta.resolve_method`.
        fields: the run's other settings (``source``, ``target``, ``n_images``, ``seed``, ``image_size``, ...).
    """
    name, options = resolved
    ran = {} if name == NO_ADAPTATION else effective_options(name, options)
    return {"method": method, "adapter": name, **{k: _param(v) for k, v in ran.items()}, **fields}


def inference_handlers(
    method: str,
    has_labels: bool,
    tta_handler,
    report,
    stream,
    mlflow,
    summary,
    no_adapt=None,
    progress_bar=None,
) -> list:
    """The main job's evaluator handlers, in the order they must run, with what does not apply left out.

    Without adaptation (``method`` ``"none"``) there is no ``tta_handler`` and no No-Adapt reference pass;
    without labels no ``report`` and no reference. ``stream`` and ``summary`` are told the same: their
    ``report``, ``reference`` and ``tta_handler`` are set to what runs (or ``None``), and ``report`` gets the
    reference's scores as its ``extra`` entries.

    Args:
        method: the method as the user named it (``"none"`` for none).
        has_labels: whether every image has a label.
        tta_handler: the :class:`~monai_grata.handlers.TTAHandler`.
        report: the :class:`~monai_grata.handlers.MetricsReport` of the adapted predictions.
        stream: the :class:`~monai_grata.handlers.StreamReport`.
        mlflow: the MLflow handler.
        summary: the :class:`~monai_grata.handlers.RunSummary`.
        no_adapt: the :class:`~monai_grata.handlers.NoAdaptReference` pass, or ``None`` for none.
        progress_bar: a progress bar handler, or ``None``.
    """
    adapting = method != NO_ADAPTATION
    reference = no_adapt if no_adapt is not None and adapting and has_labels else None
    report.extra = reference.extra if reference is not None else None
    for handler in (stream, summary):
        handler.report = report if has_labels else None
        handler.reference = reference.report if reference is not None else None
        handler.tta_handler = tta_handler if adapting else None
    chosen = [
        (progress_bar, True),
        (reference, True),
        (tta_handler, adapting),
        (report, has_labels),
        (stream, True),
        (mlflow, True),
        (summary, True),
    ]
    return [handler for handler, on in chosen if on and handler is not None]
