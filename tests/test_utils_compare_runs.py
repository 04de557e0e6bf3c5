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
    domains = {"site_a/dice_mean": 0.9, "site_b/dice_mean": 0.7, "no_adapt_site_a/dice_mean": 0.85}
    metrics = {"dice_mean": 0.8, "no_adapt_dice_mean": 0.8, "stream/dice_od": 0.5, **domains}
    log_run(client, experiment, "grata_run", {"method": "grata", "seed": "0", **both}, metrics, "FINISHED")
    log_run(client, experiment, "tent_run", {"method": "tent", **both}, {"dice_mean": 0.7}, "FAILED", "OSError: full")
    log_run(client, experiment, "none_run", {"method": "none", "seed": "0"}, {"dice_mean": 0.75})
    return str(tmp_path)


def test_status_column_shows_how_each_run_ended(store):
    rows = {r["run_name"]: r for r in collect_runs([store])}
    assert {name: r["status"] for name, r in rows.items()} == {
        "grata_run": "FINISHED",
        "tent_run": "FAILED",
        "none_run": "RUNNING",
    }
    table = format_table(list(rows.values()), ["method"], ["dice_mean"], per_domain=False)
    assert table.splitlines()[0] == "| run | status | method | dice_mean |"
    assert "| tent_run | FAILED: OSError: full | tent | 0.7 |" in table
    assert "| grata_run | FINISHED | grata | 0.8 |" in table


def test_baseline_deltas_per_domain_columns_and_only_applicable_params(store):
    rows = collect_runs([store])
    table = format_table(rows, ["method", "seed", "beta", "tent_lr"], ["dice_mean", "no_adapt_dice_mean"], "none_run")
    lines = table.splitlines()
    assert lines[0] == (
        "| run | status | method | seed | beta | tent_lr | dice_mean | Δ dice_mean | site_a/dice_mean | "
        "Δ site_a/dice_mean | site_b/dice_mean | Δ site_b/dice_mean | no_adapt_dice_mean | Δ no_adapt_dice_mean | "
        "no_adapt_site_a/dice_mean | Δ no_adapt_site_a/dice_mean |"
    )
    row = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert row["grata_run"].startswith("| grata_run | FINISHED | grata | 0 | 0.0001 |  | 0.8 | +0.05 | 0.9 |  | 0.7 |")
    assert row["tent_run"].startswith("| tent_run | FAILED: OSError: full | tent |  |  | 0.001 | 0.7 | -0.05 |")
    assert row["none_run (baseline)"].startswith("| none_run (baseline) | RUNNING | none | 0 |  |  | 0.75 | +0 |")
    assert "stream" not in lines[0]
    assert "site_a" not in format_table(rows, ["method"], ["dice_mean"], per_domain=False)
    with pytest.raises(ValueError, match="--baseline: no run named 'nothing'"):
        format_table(rows, ["method"], ["dice_mean"], "nothing")


def test_a_preset_run_shows_the_options_of_the_adapter_it_ran(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("grata_inference")
    params = {"method": "default", "adapter": "grata", "beta": "0.001"}
    log_run(client, experiment, "default_run", params, {"dice_mean": 0.8}, "FINISHED")
    table = format_table(collect_runs([str(tmp_path)]), ["method", "adapter", "beta"], ["dice_mean"])
    assert "| default_run | FINISHED | default | grata | 0.001 | 0.8 |" in table


def test_default_metrics_are_the_channels_the_runs_logged():
    from monai_grata.utils.compare_runs import default_metrics

    spinal = {"metrics.dice_cord": 0.9, "metrics.dice_gm": 0.7, "metrics.dice_mean": 0.8, "metrics.a/dice_gm": 0.6}
    fundus = {"metrics.dice_od": 0.9, "metrics.no_adapt_dice_od": 0.8, "metrics.stream/dice_od": 0.5}
    summary = ["dice_mean", "no_adapt_dice_mean", "assd_mean", "val_mean_dice"]
    assert default_metrics([spinal]) == ["dice_cord", "dice_gm", *summary]
    assert default_metrics([fundus, spinal])[:3] == ["dice_od", "dice_cord", "dice_gm"]  # no fundus default
