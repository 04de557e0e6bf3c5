import pytest
from mlflow import MlflowClient

from monai_grata.utils.compare_runs import collect_runs, format_table


def log_run(client, experiment, name, params, metrics, status=None, error=None):
    run = client.create_run(experiment, run_name=name).info.run_id
    for key, value in params.items():
        client.log_param(run, key, value)
    for key, value in metrics.items():
        client.log_metric(run, key, value)
    if error:
        client.set_tag(run, "error", error)
    if status:
        client.set_terminated(run, status)


@pytest.fixture
def store(tmp_path):
    """An MLflow store with a finished GraTa run, a failed TENT run and a No-Adapt run that still runs."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("grata_inference")
    both = {"beta": "0.0001", "tent_lr": "0.001"}
    log_run(client, experiment, "grata_run", {"method": "grata", **both}, {"dice_mean": 0.8}, "FINISHED")
    log_run(client, experiment, "tent_run", {"method": "tent", **both}, {"dice_mean": 0.7}, "FAILED", "OSError: full")
    log_run(client, experiment, "none_run", {"method": "none"}, {"dice_mean": 0.75})
    return str(tmp_path)


def test_status_column_shows_how_each_run_ended(store):
    rows = {r["run_name"]: r for r in collect_runs([store])}
    assert {name: r["status"] for name, r in rows.items()} == {
        "grata_run": "FINISHED",
        "tent_run": "FAILED",
        "none_run": "RUNNING",
    }
    table = format_table(list(rows.values()), ["method"], ["dice_mean"])
    assert table.splitlines()[0] == "| run | status | method | dice_mean |"
    assert "| tent_run | FAILED: OSError: full | tent | 0.7 |" in table
    assert "| grata_run | FINISHED | grata | 0.8 |" in table
