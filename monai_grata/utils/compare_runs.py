"""Compare MLflow runs of monai-grata (inference, evaluation, training) side by side.

python -m monai_grata.utils.compare_runs outputs/inference outputs/inference_tent --metrics dice_mean no_adapt_dice_mean
python -m monai_grata.utils.compare_runs outputs/stream1000 --history cos lr    # min / median / max along the run
python -m monai_grata.utils.compare_runs outputs/inference outputs/inference_tent --baseline RUN_NAME  # with deltas
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence

__all__ = [
    "adapter_options",
    "collect_runs",
    "default_metrics",
    "domains",
    "find_run",
    "format_table",
    "param_applies",
]

DEFAULT_PARAMS = ("method", "source", "target", "alignment", "harmonization", "beta", "seed", "image_size")
#: the metrics shown after the runs' per-channel Dice by default (a column no run has is left out)
SUMMARY_METRICS = ("dice_mean", "no_adapt_dice_mean", "assd_mean", "val_mean_dice")


def _tracking_uri(location: str) -> str:
    if "://" in location:
        return location
    path = os.path.join(location, "mlflow.db") if os.path.isdir(location) else location
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no MLflow store at {path!r}")
    return f"sqlite:///{os.path.abspath(path)}"


def collect_runs(locations: Sequence[str], experiment: str | None = None, history: Sequence[str] = ()) -> list[dict]:
    """One dict per run (``run_name``, ``status``, ``params.*``, ``metrics.*``, ``tags.*`` without MLflow's own)
    from each store, optionally one experiment.

    Args:
        locations: output folders holding ``mlflow.db``, ``.db`` files, or tracking URIs.
        experiment: an experiment name to keep (default: all).
        history: metrics logged per step (e.g. ``cos``, ``tau1``) whose whole history is summarised as
            ``metrics.<name>_min``, ``_median``, ``_max`` (the median is the lower middle value).
    """
    from mlflow import MlflowClient

    rows = []
    for location in locations:
        client = MlflowClient(tracking_uri=_tracking_uri(location))
        experiments = client.search_experiments()
        ids = [e.experiment_id for e in experiments if experiment is None or e.name == experiment]
        for run in client.search_runs(ids) if ids else []:
            row = {"store": location, "run_name": run.info.run_name, "run_id": run.info.run_id}
            row["status"] = run.info.status
            row.update({f"tags.{k}": v for k, v in run.data.tags.items() if not k.startswith("mlflow.")})
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            for name in history:
                values = sorted(m.value for m in client.get_metric_history(run.info.run_id, name))
                if values:
                    row.update({f"metrics.{name}_min": values[0], f"metrics.{name}_max": values[-1]})
                    row[f"metrics.{name}_median"] = values[(len(values) - 1) // 2]
            rows.append(row)
    return rows


RUN_PARAMS = ("method", "source", "target", "seed", "image_size", "ckpt_path", "n_images")
"""Parameters of every run, even where an adapter also takes an option of that name (GraTa's ``seed``)."""
SKIP_DOMAINS = ("stream",)
"""Prefixes of ``prefix/metric`` names that are not domains (per-step stream metrics)."""


def adapter_options() -> dict[str, set[str]]:
    """The constructor options of every registered test-time adapter, by method name."""
    from monai_grata.tta import adapter_defaults, adapter_names

    return {name: set(adapter_defaults(name)) for name in adapter_names()}


def param_applies(param: str, method: str | None, options: Mapping[str, set[str]]) -> bool:
    """Whether a logged parameter applies to a run of ``method``: an option of another adapter (e.g. GraTa's
    ``beta`` on a TENT run, or any adapter option on a ``none`` run) does not; ``<method>_<option>`` (such as
    ``tent_lr``) applies to that method only; anything else (data, model, training settings) applies."""
    if method is None or param in RUN_PARAMS:
        return True
    if param in options.get(method, ()) or param.startswith(f"{method}_"):
        return True
    return not any(param in opts or param.startswith(f"{name}_") for name, opts in options.items())


def domains(rows: Sequence[dict]) -> list[str]:
    """The domains the runs report per-domain metrics for (``metrics.<domain>/dice_mean`` etc.)."""
    found = {
        key[len("metrics.") :].split("/", 1)[0]
        for r in rows
        for key in r
        if key.startswith("metrics.") and "/" in key and not key.startswith("metrics.no_adapt_")
    }
    return sorted(found - set(SKIP_DOMAINS))


def _per_domain(metric: str, domain: str) -> str:
    """The per-domain name of ``metric`` as :class:`~monai_grata.handlers.MetricsReport` logs it (the no-adapt
    scores carry their prefix before the domain: ``no_adapt_<domain>/dice_mean``)."""
    prefix = "no_adapt_"
    if metric.startswith(prefix):
        return f"{prefix}{domain}/{metric[len(prefix) :]}"
    return f"{domain}/{metric}"


def default_metrics(rows: Sequence[dict]) -> list[str]:
    """The metrics to show when none are named: the per-channel Dice the runs logged (``dice_<channel>``, whatever
    their task's channels: ``dice_od`` for fundus, ``dice_gm`` for the spinal cord), then :data:`SUMMARY_METRICS`.

    Args:
        rows: runs, as :func:`collect_runs` returns them.
    """
    channels: list[str] = []
    for row in rows:
        for key in row:
            name = key[len("metrics.") :] if key.startswith("metrics.") else ""
            if name.startswith("dice_") and name != "dice_mean" and "/" not in name and name not in channels:
                channels.append(name)
    return channels + list(SUMMARY_METRICS)


def find_run(rows: Sequence[dict], name: str) -> dict:
    """The run whose name or id (or a unique id prefix) is ``name``.

    Raises:
        ValueError: no such run, or several.
    """
    found = [r for r in rows if r.get("run_name") == name or str(r.get("run_id", "")).startswith(name)]
    if len(found) != 1:
        names = ", ".join(str(r.get("run_name")) for r in (found or rows))
        what = "several runs match" if found else "no run named"
        raise ValueError(f"--baseline: {what} {name!r} (runs: {names})")
    return found[0]


def _number(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def format_table(
    rows: Sequence[dict],
    params: Sequence[str],
    metrics: Sequence[str],
    baseline: str | None = None,
    per_domain: bool = True,
) -> str:
    """A markdown table of the given params and metrics (columns no run has are left out).

    The ``status`` column says how each run ended: ``FINISHED``, ``FAILED: <error>`` (the run's ``error`` tag,
    see :class:`~monai_grata.handlers.MLFlowRunHandler`), or ``RUNNING`` for a run still going or one that
    was killed before it could record its end. A parameter is shown only for the runs it applies to
    (:func:`param_applies`, by the run's ``adapter`` param), so a TENT or ``none`` run shows no GraTa ``beta``. The
    main job logs only the options of the adapter that ran (:func:`~monai_grata.engines.run_params`); the filter
    keeps older stores, where every run logged every option, readable.

    Args:
        rows: runs, as :func:`collect_runs` returns them.
        params: parameter names to show.
        metrics: metric names to show; with ``per_domain`` each is followed by its ``<domain>/<metric>``
            columns where the runs have them.
        baseline: a run name or id: each metric gets a ``Δ <metric>`` column, the run's value minus the
            baseline's.
        per_domain: add the per-domain columns.
    """
    options = adapter_options()
    if per_domain:
        metrics = [col for m in metrics for col in [m] + [_per_domain(m, d) for d in domains(rows)]]
    params = [p for p in params if any(f"params.{p}" in r for r in rows)]
    metrics = [m for m in metrics if any(f"metrics.{m}" in r for r in rows)]
    base = find_run(rows, baseline) if baseline is not None else None
    columns = [c for m in metrics for c in ([m, f"Δ {m}"] if base is not None else [m])]
    header = ["run", "status", *params, *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        status = str(r.get("status", ""))
        if r.get("tags.error"):
            status += ": " + str(r["tags.error"])[:60].replace("|", "/")
        method = r.get("params.adapter") or r.get("params.method")  # a preset names no adapter's options
        values = [str(r.get("run_name", "")) + (" (baseline)" if r is base else ""), status]
        values += [str(r.get(f"params.{p}", "")) if param_applies(p, method, options) else "" for p in params]
        for m in metrics:
            v = r.get(f"metrics.{m}")
            values.append(_number(v))
            if base is not None:
                b = base.get(f"metrics.{m}")
                values.append("" if v is None or b is None else f"{v - b:+.4g}")
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare monai-grata MLflow runs.")
    parser.add_argument("locations", nargs="+", help="output folders with mlflow.db, .db files or tracking URIs")
    parser.add_argument("--experiment", default=None, help="keep only this experiment")
    parser.add_argument("--params", nargs="*", default=list(DEFAULT_PARAMS))
    parser.add_argument("--metrics", nargs="*", default=None, help="default: each run's dice_<channel>, dice_mean, ...")
    parser.add_argument("--history", nargs="*", default=[], help="per-step metrics to summarise (min/median/max)")
    parser.add_argument("--baseline", default=None, help="a run name or id: add a delta column per metric")
    parser.add_argument("--no_per_domain", action="store_true", help="leave out the per-domain metric columns")
    args = parser.parse_args()
    rows = collect_runs(args.locations, args.experiment, args.history)
    named = default_metrics(rows) if args.metrics is None else args.metrics
    metrics = named + [f"{h}_{stat}" for h in args.history for stat in ("min", "median", "max")]
    try:
        print(format_table(rows, args.params, metrics, baseline=args.baseline, per_domain=not args.no_per_domain))
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
