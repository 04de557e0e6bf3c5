"""configs/multi_gpu_train*.json: train.json / train_uda.json under ``torchrun`` on two gloo processes."""

import json
import os
import subprocess
import sys

import pytest
from monai.bundle import ConfigParser

from monai_grata.utils import export_source_model, latest_checkpoint

from .conftest import CONFIG_DIR, REPO_ROOT, SAMPLE_DIR

PAIRS = {"train.json": "multi_gpu_train.json", "train_uda.json": "multi_gpu_train_uda.json"}
# the handlers each multi-GPU config turns off on ranks other than 0 (they write files or MLflow, or print)
RANK0_ONLY = {
    "train.json": {"train#handlers": {0: "ProgressBar", 3: "MLFlowHandler", 4: "StatsHandler"},
                   "validate#handlers": {0: "CheckpointSaver", 1: "MLFlowHandler", 2: "StatsHandler"},
                   "train#state_handlers": {1: "CheckpointSaver"}},
    "train_uda.json": {"train#handlers": {0: "ProgressBar", 4: "MLFlowHandler", 5: "StatsHandler"},
                       "validate#handlers": {1: "CheckpointSaver", 3: "StatsHandler"},
                       "train#state_handlers": {1: "CheckpointSaver"}},
}  # fmt: skip


def torchrun_bundle(base: str, **overrides) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m monai.bundle run`` of ``base`` with its multi-GPU config."""
    files = [os.path.join(CONFIG_DIR, name) for name in (base, PAIRS[base])]
    args = [item for key, value in {"device": "cpu", **overrides}.items() for item in (f"--{key}", str(value))]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*command, "-m", "monai.bundle", "run", "--config_file", str(files), *args], cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def mlflow_runs(output_dir: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id]), client


@pytest.mark.parametrize("base", list(PAIRS))
def test_the_multi_gpu_config_turns_off_the_writers_on_other_ranks(base):
    parser = ConfigParser()
    parser.read_config([os.path.join(CONFIG_DIR, name) for name in (base, PAIRS[base])])
    for list_id, handlers in RANK0_ONLY[base].items():
        for index, name in handlers.items():
            assert parser[f"{list_id}#{index}#_target_"].endswith(name), (list_id, index)
            assert parser[f"{list_id}#{index}#_disabled_"] == "$@rank > 0"
    assert parser["network#_target_"].endswith("DistributedDataParallel")
    assert parser["train#dataloader#sampler"] == "@train#sampler"


@pytest.mark.slow
def test_train_on_two_processes(tmp_path):
    out = str(tmp_path / "train")
    # 8 sample images: 5 to train, 3 to validate (2 on rank 0, 1 on rank 1)
    run = torchrun_bundle("train.json", dataset_dir=SAMPLE_DIR, source="drishti_gs", output_dir=out, epochs=1,
                          max_iterations=2, batch_size=2, image_size=64, val_fraction=0.375)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert log.count("Epoch[1] Metrics") == 1  # rank 0 alone reports
    assert latest_checkpoint(out).endswith("epoch=1.pt")
    export_source_model(out, str(tmp_path / "source.pt"))  # a plain network state dict, no DDP "module." prefix
    runs, _ = mlflow_runs(out, "grata_source_training")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.params["n_val"] == "3"


@pytest.mark.slow
def test_train_uda_on_two_processes(tmp_path):
    out = str(tmp_path / "uda")
    run = torchrun_bundle("train_uda.json", dataset_dir=SAMPLE_DIR, source="refuge_train", target="drishti_gs",
                          alignment="adversarial", harmonization="gh", epochs=1, max_iterations=2, batch_size=2,
                          image_size=64, output_dir=out)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["iterations"] == 2
    assert metrics["n_images"] == 4  # the whole held-out half of the target, two images on each rank
    with open(os.path.join(out, "target_per_image.csv")) as f:
        assert len(f.read().strip().splitlines()) == 5
    runs, client = mlflow_runs(out, "grata_uda")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert len(client.get_metric_history(runs[0].info.run_id, "tau1")) == 2  # logged once per iteration
    assert len(client.get_metric_history(runs[0].info.run_id, "val_mean_dice")) == 1
