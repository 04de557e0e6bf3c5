"""Benchmark test-time adaptation methods on source→target pairs, one MLflow run per cell, resumable.

    python -m monai_grata.benchmark --dataset_dir $DATA_DIR/fundus \\
        --sources drishti_gs refuge_train refuge_val --targets drishti_gs refuge_train refuge_val \\
        --methods none norm tent grata "norm:bn_prior=16" --seeds 0 1 2 --max_images 50 --output_dir outputs/bench

    python -m monai_grata.benchmark --bundle bundles/spinalcord_gm --dataset_dir $DATA_DIR/spinalcord \\
        --sources ucl+nwu+juntendo --targets philips milan ceitec --methods none norm --output_dir outputs/bench_sc

``--bundle`` (default ``bundles/grata``) says what runs: the bundle's task (channels, sigmoid or softmax, label
codec, preprocessing; :func:`~monai_grata.data.task_of_bundle`) and, from its ``configs/inference.json``, the
network (``network_def``), the source checkpoint (``ckpt_path``, the source domain in place of ``@source``) and the
inferer (a sliding-window inferer: every volume is adapted on ``num_patches`` patches and predicted window by
window, as the bundle's ``TTAHandler`` does). For every (method, source, target, seed) cell with source ≠ target,
the source checkpoint (by default the bundle's; ``MODELS_DIR/CHECKPOINT_NAME`` with ``{source}`` filled in)
adapts continually over the target's images in datalist order at batch size 1; its predictions are mapped to the
label's grid and scored (Dice and ASSD of every channel of the task) and the cell is logged as one MLflow run in
``OUTPUT_DIR/mlflow.db`` with a per-image CSV. A method is a registered name, ``none`` (No Adapt) or
``name:key=value,...`` for options (e.g. ``grata:beta=0.001,bn_prior=16``). Methods without randomness run once,
with the first seed. Finished cells found in the store are skipped, so an interrupted benchmark resumes. At the end
``table.md``, ``table.csv`` and ``table.png`` (Table 1 of the paper: methods × pairs, mean ± std over seeds) are
written and attached to the store.

Under ``torchrun --nproc_per_node N -m monai_grata.benchmark ...`` the cells still to run are dealt over the N
processes (with ``--device cuda`` rank r runs on GPU r mod the GPUs, so several may share one; or CPU processes);
with a SQLite store each rank logs into ``OUTPUT_DIR/mlflow_rank<r>-<launch>.db`` and rank 0 merges them into the
store before writing the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import uuid

import ignite.distributed as idist
import torch
from tqdm import tqdm

from monai_grata.tta import adapter_class, adapter_names

from .bundle import DEFAULT_BUNDLE, bundle_setup
from .cells import VAL_SUFFIX, Cell, load_target, parse_method, run_cell, target_items
from .distributed import launched_world_size, process_group, rank_device, shard
from .store import SQLITE, BenchmarkStore, merge_rank_stores, rank_store, tracking_uri_of
from .table import summarise, write_chart, write_csv, write_markdown

logger = logging.getLogger("monai_grata.benchmark")


def all_methods() -> list[str]:
    """What ``--methods all`` runs: No Adapt, every registered adapter except the per-image selector
    ``norm_select`` (this project's experiment, not a baseline of the paper), then the shipped ``default`` and
    ``source_prior`` presets, so a first benchmark shows what the main job runs."""
    return ["none", *(name for name in adapter_names() if name != "norm_select"), "default", "source_prior"]


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


def checkpoint_template(args: argparse.Namespace) -> str:
    """The source checkpoint's path with ``{source}`` in it: ``--models_dir``/``--checkpoint_name``, each by default
    the bundle's (normalised: ``./a/`` and ``a`` are one directory)."""
    models_dir, checkpoint_name = args.models_dir, args.checkpoint_name
    if models_dir is None or checkpoint_name is None:
        setup = getattr(args, "setup", None) or bundle_setup(args.bundle)
        default_dir, default_name = os.path.split(setup.checkpoint)
        models_dir, checkpoint_name = models_dir or default_dir, checkpoint_name or default_name
    return os.path.normpath(os.path.join(models_dir, checkpoint_name))


def run_key(cell: Cell, args: argparse.Namespace) -> str:
    """The cell and the settings that change its result; a finished run with the same key is not repeated."""
    key = f"{cell.key}|size={args.image_size}|images={args.skip_images}:{args.max_images or ''}"
    if os.path.normpath(args.bundle) != os.path.normpath(DEFAULT_BUNDLE):
        key += f"|bundle={os.path.normpath(args.bundle)}"
    models = checkpoint_template(args)
    # the default bundle's own checkpoints leave the key as it was before keys named models and bundles
    return key if models == os.path.join(DEFAULT_BUNDLE, "models", "source_{source}.pt") else f"{key}|models={models}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=DEFAULT_BUNDLE, help="the bundle whose task, network and inferer run")
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--datalist", default=None, help="default: DATASET_DIR/datalist.json when it exists")
    parser.add_argument("--sources", nargs="+", required=True)
    parser.add_argument("--targets", nargs="*", default=[], help="target domains (none: only --same_domain_val)")
    parser.add_argument("--methods", nargs="+", default=["all"], help="'all', or names / name:key=value,...")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--skip_images", type=int, default=0, help="leave out the first K images of each target")
    parser.add_argument("--max_images", type=int, default=None, help="then take at most N images")
    parser.add_argument("--same_domain_val", action="store_true", help="add each source's held-out split (no shift)")
    parser.add_argument("--image_size", type=int, default=256, help="for tasks that resize images to a square")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models_dir", default=None, help="default: the folder of the bundle's ckpt_path")
    parser.add_argument(
        "--checkpoint_name", default=None, help="file name in MODELS_DIR per {source}; default: the bundle's"
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--tracking_uri",
        default=None,
        help="default: sqlite:///OUTPUT_DIR/mlflow.db (under torchrun each rank writes mlflow_rank<r>-<launch>.db "
        "beside a SQLite store and rank 0 merges them; a tracking server takes every rank's writes directly)",
    )
    parser.add_argument("--experiment", default="benchmark")
    return parser


def run_cells(
    cells: list[Cell], args: argparse.Namespace, device: torch.device, store: BenchmarkStore, done: dict
) -> None:
    """Run ``cells`` in order, each logged to ``store`` as soon as it has finished and recorded in ``done``.

    Args:
        cells: the cells to run, target by target (each target's images are loaded once).
        args: the parsed command line.
        device: where the models run.
        store: where the finished cells go.
        done: ``{run key: record}``, updated in place.
    """
    world_size, rank = idist.get_world_size(), idist.get_rank()
    desc, position = ("benchmark", None) if world_size < 2 else (f"benchmark rank {rank}", rank)
    images, loaded_target = [], None
    for cell in tqdm(cells, desc=desc, unit="cell", position=position):
        if cell.target != loaded_target:
            items = target_items(args.dataset_dir, cell.target, args.datalist)
            end = None if args.max_images is None else args.skip_images + args.max_images
            images = load_target(items[args.skip_images : end], args.image_size, args.setup)
            loaded_target = cell.target
        start = time.perf_counter()
        ckpt = os.path.join(args.models_dir, args.checkpoint_name.format(source=cell.source))
        summary, rows = run_cell(cell, images, ckpt, device, args.setup)
        params = {"image_size": args.image_size, "n_images": len(images), "skip_images": args.skip_images,
                  "max_images": args.max_images, "device": args.device, "ckpt_path": ckpt,
                  "bundle": args.bundle, "task": args.setup.task.name,
                  "channels": ",".join(args.setup.task.channels)}  # fmt: skip
        key = run_key(cell, args)
        store.log_cell(key, cell, params, summary, rows)
        done[key] = {"method": cell.method.label, "source": cell.source, "target": cell.target, "seed": cell.seed,
                     **summary}  # fmt: skip
        logger.info(f"{key}: dice_mean {summary['dice_mean']:.4f} ({time.perf_counter() - start:.0f} s)")


def run_grid(cells: list[Cell], args: argparse.Namespace, device: torch.device) -> dict | None:
    """Run the cells not yet in the store, on this process or on this rank's share of them, and write the table.

    One process logs into the store. Under ``torchrun`` rank 0 alone reads the store and deals the remaining cells
    to the ranks; with a SQLite store (one writer at a time) every rank logs into its own
    ``mlflow_rank<r>-<launch>.db`` and rank 0, once all ranks are done, merges them into the store (also what an
    interrupted run left, at the start); a tracking server takes every rank's runs directly. Then rank 0 writes the
    table from the store.

    Returns:
        The table's summary (see :func:`~monai_grata.benchmark.summarise`); ``None`` on ranks other than 0.

    Raises:
        RuntimeError: a cell missing from the store at the end.
    """
    world_size, rank = idist.get_world_size(), idist.get_rank()
    uri = args.tracking_uri or tracking_uri_of(args.output_dir)
    sqlite = uri.startswith(SQLITE)
    store, done, todo = None, {}, []
    if rank == 0:
        store = BenchmarkStore(uri, args.experiment)
        if sqlite and merge_rank_stores(store):
            logger.info("merged the cells an interrupted multi-process run left")
        done = store.finished()
        todo = [i for i, cell in enumerate(cells) if run_key(cell, args) not in done]
        on = f" on {world_size} processes" if world_size > 1 else ""
        logger.info(f"{len(cells)} cells, {len(cells) - len(todo)} already in the store, {len(todo)} to run{on}")
    if world_size > 1:  # rank 0 alone reads the store; the others get the cells to run from it
        plan = json.dumps({"todo": todo, "launch": uuid.uuid4().hex[:8]}) if rank == 0 else ""
        plan = json.loads(idist.broadcast(plan, src=0, safe_mode=True))
        todo = plan["todo"]
        if sqlite:
            store = rank_store(uri, rank, args.experiment, launch=plan["launch"])
        else:
            store = store or BenchmarkStore(uri, args.experiment)
    run_cells(shard([cells[i] for i in todo], group=lambda c: c.method.label), args, device, store, done)
    if world_size > 1:
        idist.barrier()
        if rank > 0:
            return None
        store = BenchmarkStore(uri, args.experiment)
        if sqlite:
            merge_rank_stores(store)
        done = store.finished()
    missing = [run_key(c, args) for c in cells if run_key(c, args) not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} cells are not in {uri}: {missing[:3]}")
    summary = summarise([done[run_key(c, args)] for c in cells], args.setup.task.channels)
    paths = [os.path.join(args.output_dir, f"table.{ext}") for ext in ("md", "csv", "png")]
    print(write_markdown(summary, paths[0]))
    write_csv(summary, paths[1])
    write_chart(summary, paths[2])
    store.log_artifacts(paths)
    return summary


def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    world_size = launched_world_size()
    prefix = f"[rank {os.environ.get('RANK', 0)}] " if world_size > 1 else ""
    logging.basicConfig(level=logging.INFO, format=prefix + "%(message)s")
    os.makedirs(args.output_dir, exist_ok=True)
    try:
        args.setup = bundle_setup(args.bundle)
    except (FileNotFoundError, KeyError, ValueError) as err:
        parser.error(str(err))
    args.models_dir, args.checkpoint_name = os.path.split(checkpoint_template(args))
    for source in args.sources:
        ckpt = os.path.join(args.models_dir, args.checkpoint_name.format(source=source))
        if not os.path.isfile(ckpt):
            parser.error(f"no source model for {source!r}: {ckpt} not found (see --models_dir)")
    try:
        rank_device(args.device, world_size, int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as err:
        parser.error(str(err))
    cells = build_cells(args)
    with process_group(args.device) as device:
        return run_grid(cells, args, device)


if __name__ == "__main__":
    main()
