"""The benchmark's MLflow store: one run per finished cell, looked up again to resume and to build tables."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Mapping, Sequence

from .cells import Cell

__all__ = ["CELL_TAG", "BenchmarkStore", "tracking_uri_of"]

CELL_TAG = "benchmark.cell"


def tracking_uri_of(location: str) -> str:
    """A tracking URI as given, or ``sqlite:///`` of a ``.db`` file or of ``mlflow.db`` in a folder."""
    if "://" in location:
        return location
    path = location if location.endswith(".db") else os.path.join(location, "mlflow.db")
    return f"sqlite:///{os.path.abspath(path)}"


class BenchmarkStore:
    """Writes and reads benchmark cells as MLflow runs of one experiment.

    A run is created only once its cell has finished (params, metrics, per-image CSV and status in one go),
    so an interrupted benchmark leaves no half-written run and a resumed one repeats no finished cell.

    Args:
        tracking_uri: an MLflow tracking URI (e.g. ``sqlite:///OUT/mlflow.db`` or a tracking server).
        experiment: the experiment name.
        artifact_dir: where a new experiment keeps its artifacts (default: beside a SQLite store).
    """

    def __init__(self, tracking_uri: str, experiment: str = "benchmark", artifact_dir: str | None = None) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            if artifact_dir is None and tracking_uri.startswith("sqlite:///"):
                artifact_dir = os.path.join(os.path.dirname(tracking_uri[len("sqlite:///") :]), "mlartifacts")
            location = None if artifact_dir is None else "file://" + os.path.abspath(artifact_dir)
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)

    def finished(self) -> dict[str, dict]:
        """``{cell key: record}`` of every finished cell in the experiment."""
        out = {}
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'FINISHED'", max_results=50000):
            key = run.data.tags.get(CELL_TAG)
            if key is not None:
                out[key] = {**run.data.params, **run.data.metrics, "run_id": run.info.run_id}
        return out

    def log_cell(
        self, key: str, cell: Cell, params: Mapping[str, object], summary: Mapping[str, float], rows: Sequence[dict]
    ) -> str:
        """Record one finished cell as a run (params, metrics, tags, per-image CSV); return its run id."""
        from mlflow.entities import Metric, Param, RunTag

        run = self.client.create_run(self.experiment_id, run_name=key, tags={CELL_TAG: key})
        run_id = run.info.run_id
        all_params = {
            "method": cell.method.label,
            "method_name": cell.method.name,
            "source": cell.source,
            "target": cell.target,
            "seed": cell.seed,
            **{f"option.{k}": v for k, v in cell.method.options.items()},
            **params,
        }
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), 0, 0) for k, v in summary.items()],
            params=[Param(k, str(v)) for k, v in all_params.items()],
            tags=[RunTag("mlflow.runName", key)],
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "per_image.csv")
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            self.client.log_artifact(run_id, path)
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def log_artifacts(self, paths: Sequence[str], run_name: str = "tables") -> None:
        """Attach files (the tables and chart) to a run of their own in the experiment."""
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={"benchmark.summary": "true"})
        for path in paths:
            self.client.log_artifact(run.info.run_id, path)
        self.client.set_terminated(run.info.run_id, "FINISHED")
