import logging

import mlflow
import pytest
from ignite.engine import Engine
from monai.handlers import MLFlowHandler

from monai_grata.handlers import ResumableMLFlowHandler


def train_once(handler_class, uri, params):
    """A two-iteration "training" logged into the MLflow run named "source"."""
    engine = Engine(lambda engine, batch: float(batch))
    handler = handler_class(
        tracking_uri=uri,
        experiment_name="resume",
        run_name="source",
        experiment_param=params,
        output_transform=lambda output: output,
    )
    handler.attach(engine)
    engine.run([1.0, 2.0])


def test_resumed_run_keeps_one_mlflow_run_and_tags_changed_params(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    train_once(ResumableMLFlowHandler, uri, {"batch_size": 2, "lr": 0.1})
    with caplog.at_level(logging.WARNING):
        train_once(ResumableMLFlowHandler, uri, {"batch_size": 3, "lr": 0.1, "new": "x"})
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs(client.get_experiment_by_name("resume").experiment_id)
    assert run.data.params["batch_size"] == "2" and run.data.params["new"] == "x"
    assert run.data.tags["changed_param.batch_size"] == "2 -> 3"
    assert not any(key == "changed_param.lr" for key in run.data.tags)
    assert "batch_size=3 (logged as 2)" in caplog.text
    assert len(client.get_metric_history(run.info.run_id, "Loss")) == 4
    assert run.info.status == "FINISHED"  # each training ends its run; the resume reopened it


def test_plain_mlflow_handler_fails_on_the_same_resume(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    train_once(MLFlowHandler, uri, {"batch_size": 2})
    with pytest.raises(mlflow.exceptions.MlflowException, match="Changing param values is not allowed"):
        train_once(MLFlowHandler, uri, {"batch_size": 3})
