"""Rebuild the benchmark's table and chart from any MLflow store or tracking server.

    python -m monai_grata.benchmark.compare outputs/bench --output_dir outputs/bench_tables
    python -m monai_grata.benchmark.compare sqlite:///other/mlflow.db --filter "params.source = 'refuge_train'"
    python -m monai_grata.benchmark.compare outputs/report outputs/report_steps   # the cells of both stores
    python -m monai_grata.benchmark.compare outputs/bench_sc --per_image dice_gm --output_dir outputs/bench_sc_tables

Every finished benchmark run of the experiment (narrowed by ``--filter``, MLflow's search syntax, and
``--methods``) becomes a cell; the table has the layout the benchmark writes: methods × source→target pairs, mean
± standard deviation over seeds. ``--per_image METRIC`` adds a table of one column of the cells' ``per_image.csv``:
a row per (pair, image), a column per method, and each method's worst per-image change against ``--baseline``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence

from .cells import parse_method
from .per_image_table import per_image_values, summarise_per_image, write_per_image_csv, write_per_image_markdown
from .store import CELL_TAG, BenchmarkStore, tracking_uri_of
from .table import summarise, write_chart, write_csv, write_markdown

__all__ = ["per_image_rows_of", "per_image_table", "records_from_store", "write_per_image"]


def records_from_store(
    location: str, experiment: str = "benchmark", filter_string: str = "", methods: list[str] | None = None
) -> list[dict]:
    """The finished benchmark cells of a store as records for :func:`~monai_grata.benchmark.summarise`.

    Args:
        location: a tracking URI, a ``.db`` file or a folder holding ``mlflow.db``.
        experiment: the experiment name.
        filter_string: an extra MLflow filter, e.g. ``"params.seed = '0'"``.
        methods: keep only these methods, in this order (default: all, in run order); written as the benchmark's
            ``--methods`` takes them (a preset name, options in any order), so ``grata_gated`` finds its cells.

    Returns:
        One record per cell: its params and metrics, ``run_id`` and ``tracking_uri`` (where to read its artifacts).

    Raises:
        ValueError: no such experiment in the store.
    """
    from mlflow import MlflowClient

    uri = tracking_uri_of(location)
    if MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment) is None:
        raise ValueError(f"no experiment {experiment!r} in {uri}")
    store = BenchmarkStore(uri, experiment)
    query = " and ".join(filter(None, ["attributes.status = 'FINISHED'", filter_string]))
    runs = store.client.search_runs([store.experiment_id], query, max_results=50000, order_by=["attributes.start_time"])
    records = [
        {**r.data.params, **r.data.metrics, "run_id": r.info.run_id, "tracking_uri": uri}
        for r in runs
        if CELL_TAG in r.data.tags
    ]
    if methods is not None:
        methods = [parse_method(m).label for m in methods]
        records = sorted((r for r in records if r["method"] in methods), key=lambda r: methods.index(r["method"]))
    return records


def per_image_rows_of(records: Sequence[Mapping], experiment: str = "benchmark") -> list[list[dict[str, str]]]:
    """The ``per_image.csv`` rows of every record's run, in the order of ``records``.

    Args:
        records: from :func:`records_from_store` (any number of stores).
        experiment: the experiment name.
    """
    stores = {uri: BenchmarkStore(uri, experiment) for uri in dict.fromkeys(str(r["tracking_uri"]) for r in records)}
    return [stores[str(r["tracking_uri"])].per_image_rows(str(r["run_id"])) for r in records]


def per_image_table(records: Sequence[Mapping], summary: dict, metric: str, experiment: str = "benchmark") -> dict:
    """One per-image metric of the records' runs, rows and columns ordered as the main table's.

    Args:
        records: from :func:`records_from_store`.
        summary: the main table (:func:`~monai_grata.benchmark.summarise` of ``records``).
        metric: a column of the runs' ``per_image.csv``, e.g. ``dice_gm``.
        experiment: the experiment name.

    Raises:
        ValueError: ``metric`` is a column of no run's ``per_image.csv``.
    """
    values = per_image_values(records, per_image_rows_of(records, experiment), metric)
    return summarise_per_image(values, summary["methods"], summary["pairs"], metric)


def write_per_image(table: dict, baseline: str, output_dir: str | None) -> None:
    """Write ``per_image_<metric>.md`` and ``.csv`` to ``output_dir``, or print the markdown when there is none.

    Args:
        table: from :func:`per_image_table`.
        baseline: the method the worst per-image changes are taken against.
        output_dir: where to write (``None``: print only).
    """
    if output_dir is None:
        print(write_per_image_markdown(table, os.devnull, baseline))
        return
    stem = os.path.join(output_dir, f"per_image_{table['metric']}")
    write_per_image_markdown(table, f"{stem}.md", baseline)
    write_per_image_csv(table, f"{stem}.csv")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("locations", nargs="+", help="tracking URIs, .db files or folders holding mlflow.db")
    parser.add_argument("--experiment", default="benchmark")
    parser.add_argument("--filter", default="", help="MLflow filter string, e.g. \"params.target = 'drishti_gs'\"")
    parser.add_argument("--methods", nargs="*", default=None, help="methods to keep, in table order (specs or presets)")
    parser.add_argument("--baseline", default="none", help="the method the Δ columns compare with")
    parser.add_argument("--output_dir", default=None, help="where to write table.md/.csv/.png (default: print only)")
    per_image_help = "also per_image_METRIC.md/.csv: a column of per_image.csv (e.g. dice_gm) by image and method"
    parser.add_argument("--per_image", default=None, metavar="METRIC", help=per_image_help)
    args = parser.parse_args(argv)
    if args.methods is not None:
        args.methods = [parse_method(m).label for m in args.methods]
    args.baseline = parse_method(args.baseline).label
    records = [r for loc in args.locations for r in records_from_store(loc, args.experiment, args.filter, args.methods)]
    if args.methods is not None:  # one order over all the stores
        records.sort(key=lambda r: args.methods.index(r["method"]))
    if not records:
        parser.error("no finished benchmark run matches")
    summary = summarise(records)
    try:
        per_image = per_image_table(records, summary, args.per_image, args.experiment) if args.per_image else None
    except ValueError as error:
        parser.error(str(error))
    out = args.output_dir or "."
    os.makedirs(out, exist_ok=True)
    md = os.path.join(out, "table.md") if args.output_dir else os.devnull
    print(write_markdown(summary, md, args.baseline))
    if args.output_dir:
        write_csv(summary, os.path.join(out, "table.csv"))
        write_chart(summary, os.path.join(out, "table.png"))
    if per_image is not None:
        write_per_image(per_image, args.baseline, args.output_dir)
    return summary


if __name__ == "__main__":
    main()
