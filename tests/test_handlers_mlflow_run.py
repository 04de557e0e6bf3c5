import pytest
from ignite.engine import Engine
from mlflow import MlflowClient
from monai.handlers import StatsHandler

from monai_grata.handlers import MLFlowRunHandler


def run_engine(uri: str, step, handlers=()):
    engine = Engine(lambda engine, batch: step(batch))
    MLFlowRunHandler(tracking_uri=uri, experiment_name="status", output_transform=lambda out: out).attach(engine)
    for handler in handlers:
        handler.attach(engine)
    engine.run([1.0, 2.0, 3.0])


def the_run(uri: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs(client.get_experiment_by_name("status").experiment_id)
    return run


def test_completed_run_is_finished(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_engine(uri, float)
    run = the_run(uri)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags


def fail_at_two(error: BaseException):
    def step(batch):
        if batch == 2.0:
            raise error
        return batch

    return step


@pytest.mark.parametrize(
    "error,tag",
    [(ValueError("bad pixel\nmore"), "ValueError: bad pixel"), (KeyboardInterrupt(), "KeyboardInterrupt")],
)
def test_failed_or_interrupted_run_is_failed_with_the_error_and_reraises(tmp_path, error, tag):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(type(error)):
        run_engine(uri, fail_at_two(error), handlers=[StatsHandler(iteration_log=False)])
    run = the_run(uri)
    assert run.info.status == "FAILED" and run.data.tags["error"] == tag
    assert [m.value for m in MlflowClient(uri).get_metric_history(run.info.run_id, "Loss")] == [1.0]
