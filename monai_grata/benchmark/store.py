"""The benchmark's MLflow store: one run per finished cell, looked up again to resume and to build tables."""

from __future__ import annotations

import contextlib
import csv
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence

from monai_grata.utils.per_image import read_per_image_csv

from .cells import Cell

__all__ = ["CELL_TAG", "BenchmarkStore", "merge_rank_stores", "rank_store", "tracking_uri_of"]

CELL_TAG = "benchmark.cell"
SQLITE = "sqlite:///"
RANK_SUFFIX = "_rank"
logger = logging.getLogger(__name__)


def tracking_uri_of(location: str) -> str:
    """A tracking URI as given, or ``sqlite:///`` of a ``.db`` file or of ``mlflow.db`` in a folder."""
    if "://" in location:
        return location
    path = location if location.endswith(".db") else os.path.join(location, "mlflow.db")
    return f"{SQLITE}{os.path.abspath(path)}"


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence MLflow's per-download progress bar (one per copied cell otherwise)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as flag

    saved = os.environ.get(flag.name)
    os.environ[flag.name] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[flag.name]
        else:
            os.environ[flag.name] = saved


def _stem(tracking_uri: str) -> str:
    """The path of a SQLite store without ``.db``.

    Raises:
        ValueError: ``tracking_uri`` is not a SQLite store.
    """
    if not tracking_uri.startswith(SQLITE):
        raise ValueError(f"rank stores are for SQLite stores; {tracking_uri!r} takes concurrent writes itself")
    path = tracking_uri[len(SQLITE) :]
    return path[: -len(".db")] if path.endswith(".db") else path


def _rank_store_paths(tracking_uri: str) -> list[str]:
    """The rank stores beside a SQLite store (``mlflow_rank0-<launch>.db``, ``mlflow_rank1-<launch>.db``, ... for
    ``mlflow.db``; also the ``mlflow_rank<r>.db`` of earlier versions) in rank order; none for any other URI."""
    if not tracking_uri.startswith(SQLITE):
        return []
    prefix = _stem(tracking_uri) + RANK_SUFFIX
    ranks = {p: p[len(prefix) : -len(".db")].partition("-") for p in glob.glob(glob.escape(prefix) + "*.db")}
    return sorted((p for p, r in ranks.items() if r[0].isdigit()), key=lambda p: (int(ranks[p][0]), ranks[p][2]))


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
        self.tracking_uri, self.experiment = tracking_uri, experiment
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            if artifact_dir is None and tracking_uri.startswith(SQLITE):
                artifact_dir = os.path.join(os.path.dirname(tracking_uri[len(SQLITE) :]), "mlartifacts")
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
                columns = list(dict.fromkeys(k for row in rows for k in row))  # stats can differ per image
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
            self.client.log_artifact(run_id, path)
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def per_image_rows(self, run_id: str) -> list[dict[str, str]]:
        """The rows of a cell's ``per_image.csv`` (one per image, in stream order), read back from the store.

        Args:
            run_id: the cell's run, e.g. the ``run_id`` of a record of :meth:`finished`.
        """
        with tempfile.TemporaryDirectory() as tmp, _no_progress_bars():
            return read_per_image_csv(self.client.download_artifacts(run_id, "per_image.csv", tmp))

    def log_artifacts(self, paths: Sequence[str], run_name: str = "tables") -> None:
        """Attach files (the tables and chart) to a run of their own in the experiment."""
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={"benchmark.summary": "true"})
        for path in paths:
            self.client.log_artifact(run.info.run_id, path)
        self.client.set_terminated(run.info.run_id, "FINISHED")

    def merge(self, other: BenchmarkStore) -> int:
        """Copy every finished cell of ``other`` that this store lacks (params, metrics, tags, start and end
        time, per-image CSV); a cell already here is not copied again, so merging twice changes nothing.

        Returns:
            The number of cells copied.
        """
        done = set(self.finished())
        copied = 0
        runs = other.client.search_runs(
            [other.experiment_id],
            "attributes.status = 'FINISHED'",
            max_results=50000,
            order_by=["attributes.start_time"],
        )
        for run in runs:
            key = run.data.tags.get(CELL_TAG)
            if key is None or key in done:
                continue
            self._copy_run(other, run)
            done.add(key)
            copied += 1
        return copied

    def _copy_run(self, other: BenchmarkStore, run) -> str:
        from mlflow.entities import Metric, Param

        tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.runName"}
        new = self.client.create_run(self.experiment_id, start_time=run.info.start_time, tags=tags)
        metrics = [Metric(k, v, run.info.end_time or 0, 0) for k, v in run.data.metrics.items()]
        params = [Param(k, v) for k, v in run.data.params.items()]
        self.client.log_batch(new.info.run_id, metrics=metrics, params=params)
        with tempfile.TemporaryDirectory() as tmp, _no_progress_bars():
            local = other.client.download_artifacts(run.info.run_id, "", tmp)
            if os.listdir(local):
                self.client.log_artifacts(new.info.run_id, local)
        self.client.set_terminated(new.info.run_id, "FINISHED", end_time=run.info.end_time)
        return new.info.run_id


def rank_store(tracking_uri: str, rank: int, experiment: str = "benchmark", launch: str = "") -> BenchmarkStore:
    """The store rank ``rank`` writes in a multi-process benchmark whose main store is a SQLite file
    (``OUT/mlflow.db`` → ``OUT/mlflow_rank{rank}-{launch}.db``, artifacts in
    ``OUT/mlflow_rank{rank}-{launch}_artifacts``): SQLite takes one writer at a time, so every rank writes its own
    file and :func:`merge_rank_stores` moves the cells into the main store.

    Args:
        tracking_uri: the main store.
        rank: the writing rank.
        experiment: the experiment name.
        launch: a name new to every launch. Rank 0 merges and deletes the rank stores an interrupted launch left
            before it writes its own; MLflow keeps one SQLAlchemy engine per URI for the life of the process, so a
            rank store re-created at a deleted store's path would be written through the stale engine (a
            read-only database).

    Raises:
        ValueError: ``tracking_uri`` is not a SQLite store (a tracking server takes every rank's writes itself).
    """
    path = f"{_stem(tracking_uri)}{RANK_SUFFIX}{rank}" + (f"-{launch}" if launch else "")
    return BenchmarkStore(f"{SQLITE}{path}.db", experiment, artifact_dir=f"{path}_artifacts")


def merge_rank_stores(store: BenchmarkStore) -> int:
    """Move the finished cells of every rank store beside ``store`` (what an earlier multi-process run left,
    finished or interrupted) into the same experiments of ``store``'s tracking URI, then delete the rank stores
    and their artifacts. Safe to repeat: a rank store is deleted only once all its cells are copied, and a cell
    already in the main store is not copied again.

    Returns:
        The number of cells copied.
    """
    from mlflow import MlflowClient

    copied = 0
    for path in _rank_store_paths(store.tracking_uri):
        uri = f"{SQLITE}{path}"
        for experiment in MlflowClient(tracking_uri=uri).search_experiments():
            into = store if experiment.name == store.experiment else BenchmarkStore(store.tracking_uri, experiment.name)
            n = into.merge(BenchmarkStore(uri, experiment.name))
            if n:
                logger.info(f"merged {n} cells from {path} into experiment {experiment.name!r}")
            copied += n
        os.remove(path)
        shutil.rmtree(f"{path[: -len('.db')]}_artifacts", ignore_errors=True)
    return copied
