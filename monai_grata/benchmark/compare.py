"""Rebuild the benchmark's table and chart from any MLflow store or tracking server.

    python -m monai_grata.benchmark.compare outputs/bench --output_dir outputs/bench_tables
    python -m monai_grata.benchmark.compare sqlite:///other/mlflow.db --filter "params.source = 'refuge_train'"
    python -m monai_grata.benchmark.compare outputs/report outputs/report_steps   # the cells of both stores

Every finished benchmark run of the experiment (narrowed by ``--filter``, MLflow's search syntax, and
``--methods``) becomes a cell; the table has the layout the benchmark writes: methods × source→target pairs, mean
± standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import os

from .cells import parse_method
from .store import CELL_TAG, BenchmarkStore, tracking_uri_of
from .table import summarise, write_chart, write_csv, write_markdown

__all__ = ["records_from_store"]


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
    records = [{**r.data.params, **r.data.metrics} for r in runs if CELL_TAG in r.data.tags]
    if methods is not None:
        methods = [parse_method(m).label for m in methods]
        records = sorted((r for r in records if r["method"] in methods), key=lambda r: methods.index(r["method"]))
    return records


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("locations", nargs="+", help="tracking URIs, .db files or folders holding mlflow.db")
    parser.add_argument("--experiment", default="benchmark")
    parser.add_argument("--filter", default="", help="MLflow filter string, e.g. \"params.target = 'drishti_gs'\"")
    parser.add_argument("--methods", nargs="*", default=None, help="methods to keep, in table order (specs or presets)")
    parser.add_argument("--baseline", default="none", help="the method the Δ columns compare with")
    parser.add_argument("--output_dir", default=None, help="where to write table.md/.csv/.png (default: print only)")
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
    out = args.output_dir or "."
    os.makedirs(out, exist_ok=True)
    md = os.path.join(out, "table.md") if args.output_dir else os.devnull
    print(write_markdown(summary, md, args.baseline))
    if args.output_dir:
        write_csv(summary, os.path.join(out, "table.csv"))
        write_chart(summary, os.path.join(out, "table.png"))
    return summary


if __name__ == "__main__":
    main()
