"""Benchmark test-time adaptation methods on source→target pairs, one MLflow run per cell, resumable.

    python -m monai_grata.benchmark --dataset_dir ../shared/data/fundus \\
        --sources drishti_gs refuge_train refuge_val --targets drishti_gs refuge_train refuge_val \\
        --methods none norm tent grata "norm:bn_prior=16" --seeds 0 1 2 --max_images 50 --output_dir outputs/bench

For every (method, source, target, seed) cell with source ≠ target, the shipped source checkpoint
(``MODELS_DIR/source_<source>.pt``) adapts continually over the target's images in datalist order at batch size 1;
its predictions are scored (Dice and ASSD of optic disc and cup) and the cell is logged as one MLflow run in
``OUTPUT_DIR/mlflow.db``. A method is a registered name, ``none`` (No Adapt) or ``name:key=value,...`` for options
(e.g. ``grata:beta=0.001,bn_prior=16``). Methods without randomness run once, with the first seed. Finished cells
found in the store are skipped, so an interrupted benchmark resumes. At the end ``table.md``, ``table.csv`` and
``table.png`` (Table 1 of the paper: methods × pairs, mean ± std over seeds) are written and attached to the store.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from tqdm import tqdm

from monai_grata.tta import adapter_class, adapter_names

from .cells import VAL_SUFFIX, Cell, load_target, parse_method, run_cell, target_items
from .store import BenchmarkStore, tracking_uri_of
from .table import summarise, write_chart, write_csv, write_markdown

logger = logging.getLogger("monai_grata.benchmark")


def all_methods() -> list[str]:
    """What ``--methods all`` runs: No Adapt and every registered adapter except the per-image selector
    ``norm_select`` (this project's experiment, not a baseline of the paper)."""
    return ["none", *(name for name in adapter_names() if name != "norm_select")]


def is_stochastic(method_name: str) -> bool:
    """Whether a method's result depends on the seed (then every seed runs; otherwise only the first)."""
    return method_name != "none" and getattr(adapter_class(method_name), "stochastic", False)


def build_cells(args: argparse.Namespace) -> list[Cell]:
    """Every (method, source, target, seed) cell of the grid, target by target (so images load once each)."""
    methods = [parse_method(m) for m in (all_methods() if args.methods == ["all"] else args.methods)]
    for method in methods:
        if method.name != "none":
            adapter_class(method.name)  # an unknown name fails before any work
    targets = list(args.targets)
    if args.same_domain_val:
        targets += [s + VAL_SUFFIX for s in args.sources]
    cells = []
    for target in targets:
        for source in args.sources:
            if source == target or (target.endswith(VAL_SUFFIX) and target != source + VAL_SUFFIX):
                continue
            for method in methods:
                seeds = args.seeds if is_stochastic(method.name) else args.seeds[:1]
                cells += [Cell(method, source, target, seed) for seed in seeds]
    return cells


def run_key(cell: Cell, args: argparse.Namespace) -> str:
    """The cell and the settings that change its result; a finished run with the same key is not repeated."""
    key = f"{cell.key}|size={args.image_size}|images={args.skip_images}:{args.max_images or ''}"
    models = os.path.join(args.models_dir, args.checkpoint_name)
    return key if models == os.path.join("bundles/grata/models", "source_{source}.pt") else f"{key}|models={models}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--datalist", default=None, help="default: DATASET_DIR/datalist.json when it exists")
    parser.add_argument("--sources", nargs="+", required=True)
    parser.add_argument("--targets", nargs="*", default=[], help="target domains (none: only --same_domain_val)")
    parser.add_argument("--methods", nargs="+", default=["all"], help="'all', or names / name:key=value,...")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--skip_images", type=int, default=0, help="leave out the first K images of each target")
    parser.add_argument("--max_images", type=int, default=None, help="then take at most N images")
    parser.add_argument("--same_domain_val", action="store_true", help="add each source's held-out split (no shift)")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models_dir", default="bundles/grata/models")
    parser.add_argument("--checkpoint_name", default="source_{source}.pt", help="file name in MODELS_DIR per source")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--tracking_uri", default=None, help="default: sqlite:///OUTPUT_DIR/mlflow.db")
    parser.add_argument("--experiment", default="benchmark")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.makedirs(args.output_dir, exist_ok=True)
    for source in args.sources:
        ckpt = os.path.join(args.models_dir, args.checkpoint_name.format(source=source))
        if not os.path.isfile(ckpt):
            parser.error(f"no source model for {source!r}: {ckpt} not found (see --models_dir)")
    cells = build_cells(args)
    store = BenchmarkStore(args.tracking_uri or tracking_uri_of(args.output_dir), args.experiment)
    done = store.finished()
    todo = [c for c in cells if run_key(c, args) not in done]
    logger.info(f"{len(cells)} cells, {len(cells) - len(todo)} already in the store, {len(todo)} to run")
    images, loaded_target = [], None
    for cell in tqdm(todo, desc="benchmark", unit="cell"):
        if cell.target != loaded_target:
            items = target_items(args.dataset_dir, cell.target, args.datalist)
            end = None if args.max_images is None else args.skip_images + args.max_images
            images, loaded_target = load_target(items[args.skip_images : end], args.image_size), cell.target
        start = time.perf_counter()
        ckpt = os.path.join(args.models_dir, args.checkpoint_name.format(source=cell.source))
        summary, rows = run_cell(cell, images, ckpt, args.device)
        params = {"image_size": args.image_size, "n_images": len(images), "skip_images": args.skip_images,
                  "max_images": args.max_images, "device": args.device, "ckpt_path": ckpt}  # fmt: skip
        key = run_key(cell, args)
        store.log_cell(key, cell, params, summary, rows)
        done[key] = {"method": cell.method.label, "source": cell.source, "target": cell.target, "seed": cell.seed,
                     **summary}  # fmt: skip
        logger.info(f"{key}: dice_mean {summary['dice_mean']:.4f} ({time.perf_counter() - start:.0f} s)")
    records = [done[run_key(c, args)] for c in cells]
    summary = summarise(records)
    paths = [os.path.join(args.output_dir, f"table.{ext}") for ext in ("md", "csv", "png")]
    print(write_markdown(summary, paths[0]))
    write_csv(summary, paths[1])
    write_chart(summary, paths[2])
    store.log_artifacts(paths)
    return summary


if __name__ == "__main__":
    main()
