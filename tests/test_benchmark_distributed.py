"""The benchmark under ``torchrun``: cells dealt over the ranks, one SQLite store per rank merged by rank 0."""

import os
import subprocess
import sys

import pytest
import torch

from monai_grata.benchmark import Cell, parse_method
from monai_grata.benchmark.__main__ import build_parser, run_key
from monai_grata.benchmark.__main__ import main as benchmark_main
from monai_grata.benchmark.compare import records_from_store
from monai_grata.benchmark.distributed import rank_device, shard
from monai_grata.benchmark.store import (
    BenchmarkStore,
    _rank_store_paths,
    merge_rank_stores,
    rank_store,
    tracking_uri_of,
)

from .conftest import REPO_ROOT, SAMPLE_DIR

GRID = ["--dataset_dir", SAMPLE_DIR, "--sources", "refuge_train", "--targets", "drishti_gs", "refuge_val",
        "--max_images", "2", "--device", "cpu"]  # fmt: skip


def without_speed(table: str) -> list[list[str]]:
    """The rows of a markdown table without the images/s column (a measurement, not a result)."""
    return [line.split(" | ")[:-1] for line in table.strip().splitlines()]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (a free port of its own) of the benchmark, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*command, "-m", "monai_grata.benchmark", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("by_method", [False, True])
def test_shard_gives_every_rank_a_share_of_every_group(monkeypatch, by_method):
    # two methods per pair on two ranks: a plain deal gives rank 0 every "n" (No Adapt), rank 1 every "D"
    items = ["n0", "D0", "n1", "D1", "n2", "D2"]
    monkeypatch.setattr("ignite.distributed.get_world_size", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr("ignite.distributed.get_rank", lambda rank=rank: rank)
        shares.append(shard(items, group=(lambda item: item[0]) if by_method else None))
    assert sorted(shares[0] + shares[1]) == sorted(items)  # each item once
    assert all(share == [i for i in items if i in share] for share in shares)  # in the given order
    methods = [{item[0] for item in share} for share in shares]
    assert methods == ([{"n", "D"}, {"n", "D"}] if by_method else [{"n"}, {"D"}])


def test_a_cell_left_in_a_rank_store_is_not_run_again_and_is_merged(tmp_path):
    args = GRID + ["--methods", "none", "--image_size", "64", "--output_dir", str(tmp_path)]
    cell = Cell(parse_method("none"), "refuge_train", "drishti_gs", 0)
    key = run_key(cell, build_parser().parse_args(args))
    # what an interrupted two-process run leaves: a finished cell in rank 1's store, nothing in the main store
    left = rank_store(tracking_uri_of(str(tmp_path)), 1)
    summary = {"dice_od": 0.5, "dice_oc": 0.25, "dice_mean": 0.375, "assd_od": 1.0, "assd_oc": 2.0, "images_per_s": 1.0}
    rows = [{"filename": "a.png", "dice_od": 0.5, "adapt_lr": 0.0}]
    rows += [{"filename": "b.png", "dice_od": 0.4, "adapt_cos": -0.1}]
    left.log_cell(key, cell, {"image_size": 64}, summary, rows)  # per-image columns may differ between images
    result = benchmark_main(args)
    assert result["cells"][("none", "refuge_train→drishti_gs")]["dice_mean"][0] == 0.375  # not run again
    records = records_from_store(str(tmp_path))
    assert sorted(r["target"] for r in records) == ["drishti_gs", "refuge_val"]  # each cell once
    assert not [f for f in os.listdir(tmp_path) if "_rank" in f]  # the rank store is merged and removed
    store = BenchmarkStore(tracking_uri_of(str(tmp_path)))
    merged = next(r for r in store.client.search_runs([store.experiment_id]) if r.info.run_name == key)
    assert store.client.list_artifacts(merged.info.run_id)[0].path == "per_image.csv"
    csv_path = store.client.download_artifacts(merged.info.run_id, "per_image.csv", str(tmp_path))
    with open(csv_path) as f:
        assert f.read().splitlines() == ["filename,dice_od,adapt_lr,adapt_cos", "a.png,0.5,0.0,", "b.png,0.4,,-0.1"]


def test_a_launch_after_a_merge_writes_a_new_rank_store(tmp_path):
    uri = tracking_uri_of(str(tmp_path))
    main_store = BenchmarkStore(uri)
    left = rank_store(uri, 0, launch="first")
    left.client.create_run(left.experiment_id)
    merge_rank_stores(main_store)
    assert not [f for f in os.listdir(tmp_path) if "_rank" in f]
    # the same process (rank 0) then writes the next launch's store: a new path, so a new engine
    again = rank_store(uri, 0, launch="second")
    again.client.create_run(again.experiment_id)
    assert [os.path.basename(p) for p in _rank_store_paths(uri)] == ["mlflow_rank0-second.db"]


def test_rank_stores_are_for_sqlite_and_gpus_follow_the_local_rank():
    with pytest.raises(ValueError, match="SQLite"):
        rank_store("http://localhost:5000", 0)
    assert rank_device("cpu", 2, 1) == torch.device("cpu")
    assert rank_device("cuda:1", 1, 0) == torch.device("cuda:1")  # one process: as given
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        rank_device("cuda:1", 2, 0)
    if torch.cuda.device_count() == 0:
        with pytest.raises(ValueError, match="no GPU"):
            rank_device("cuda", 2, 1)
    else:  # ranks beyond the GPUs share them
        assert rank_device("cuda", 8, 7) == torch.device("cuda", 7 % torch.cuda.device_count())


@pytest.mark.slow
def test_two_processes_give_the_one_process_table_and_every_cell_once(tmp_path):
    grid = GRID + ["--methods", "none", "grata", "--seeds", "0", "1", "--image_size", "64"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun children (OMP_NUM_THREADS=1): the same arithmetic
    try:
        benchmark_main(grid + ["--output_dir", str(tmp_path / "one")])
        # the 'none' cells finished before, by one process: the two ranks run only the four GraTa cells
        benchmark_main(GRID + ["--methods", "none", "--image_size", "64", "--output_dir", str(tmp_path / "two")])
    finally:
        torch.set_num_threads(threads)
    run = torchrun(2, *grid, "--output_dir", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "6 cells, 2 already in the store, 4 to run on 2 processes" in run.stderr
    for rank in (0, 1):  # each rank ran two cells
        assert run.stderr.count(f"[rank {rank}] grata|") == 2
    one, two = ((tmp_path / d / "table.md").read_text() for d in ("one", "two"))
    assert without_speed(two) == without_speed(one)
    records = records_from_store(str(tmp_path / "two"))
    cells = sorted((r["method"], r["target"], r["seed"]) for r in records)
    assert len(cells) == 6 and len(set(cells)) == 6  # no cell lost, none twice
    assert not [f for f in os.listdir(tmp_path / "two") if "_rank" in f]


def test_run_key_names_the_models_directory_only_when_it_is_not_the_shipped_one():
    cell = Cell(parse_method("none"), "refuge_train", "drishti_gs", 0)
    keys = {
        models: run_key(cell, build_parser().parse_args(GRID + ["--output_dir", "o", "--models_dir", models]))
        for models in ("bundles/grata/models", "./bundles/grata/models/", "/elsewhere/models")
    }
    shipped = keys["bundles/grata/models"]
    assert shipped == keys["./bundles/grata/models/"] and "models=" not in shipped
    assert keys["/elsewhere/models"].endswith("|models=/elsewhere/models/source_{source}.pt")
