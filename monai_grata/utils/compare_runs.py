"""Compare MLflow runs of monai-grata (inference, evaluation, training) side by side.

python -m monai_grata.utils.compare_runs outputs/inference outputs/inference_tent --metrics dice_mean no_adapt_dice_mean
python -m monai_grata.utils.compare_runs outputs/stream1000 --history cos lr    # min / median / max along the run
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

__all__ = ["collect_runs", "format_table"]

DEFAULT_PARAMS = ("method", "source", "target", "alignment", "harmonization", "beta", "seed", "image_size")
DEFAULT_METRICS = ("dice_od", "dice_oc", "dice_mean", "no_adapt_dice_mean", "assd_mean", "val_mean_dice")


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
            row = {"store": location, "run_name": run.info.run_name, "status": run.info.status}
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


def format_table(rows: Sequence[dict], params: Sequence[str], metrics: Sequence[str]) -> str:
    """A markdown table of the given params and metrics (columns no run has are left out).

    The ``status`` column says how each run ended: ``FINISHED``, ``FAILED: <error>`` (the run's ``error`` tag,
    see :class:`~monai_grata.handlers.MLFlowRunHandler`), or ``RUNNING`` for a run still going or one that
    was killed before it could record its end.
    """
    params = [p for p in params if any(f"params.{p}" in r for r in rows)]
    metrics = [m for m in metrics if any(f"metrics.{m}" in r for r in rows)]
    header = ["run", "status", *params, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        status = str(r.get("status", ""))
        if r.get("tags.error"):
            status += ": " + str(r["tags.error"])[:60].replace("|", "/")
        values = [str(r.get("run_name", "")), status] + [str(r.get(f"params.{p}", "")) for p in params]
        for m in metrics:
            v = r.get(f"metrics.{m}")
            values.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}")
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare monai-grata MLflow runs.")
    parser.add_argument("locations", nargs="+", help="output folders with mlflow.db, .db files or tracking URIs")
    parser.add_argument("--experiment", default=None, help="keep only this experiment")
    parser.add_argument("--params", nargs="*", default=list(DEFAULT_PARAMS))
    parser.add_argument("--metrics", nargs="*", default=list(DEFAULT_METRICS))
    parser.add_argument("--history", nargs="*", default=[], help="per-step metrics to summarise (min/median/max)")
    args = parser.parse_args()
    metrics = args.metrics + [f"{h}_{stat}" for h in args.history for stat in ("min", "median", "max")]
    print(format_table(collect_runs(args.locations, args.experiment, args.history), args.params, metrics))


if __name__ == "__main__":
    main()
