from types import SimpleNamespace

import torch

from monai_grata.handlers import MetricsReport, StreamReport
from monai_grata.tta import GraTaStep


class FakeMLflow:
    def __init__(self):
        self.cur_run, self.logged = SimpleNamespace(info=SimpleNamespace(run_id="r")), []
        self.client = SimpleNamespace(log_batch=lambda run_id, metrics: self.logged.extend(metrics))


def test_stream_logs_dice_only_and_plots_resets_and_no_adapt(tmp_path):
    adapted, no_adapt = MetricsReport(str(tmp_path), task="fundus"), MetricsReport(str(tmp_path), task="fundus")
    adapted.per_image = {"dice": torch.rand(6, 2)}
    no_adapt.per_image = {"dice": torch.rand(6, 2)}
    tta = SimpleNamespace(history=[GraTaStep(cos=torch.tensor(0.5), lr=torch.tensor(1e-4))] * 6)
    mlflow = FakeMLflow()
    stream = StreamReport(adapted, str(tmp_path), tta_handler=tta, mlflow_handler=mlflow, reference=no_adapt)
    stream.groups = ["a", "a", "a", "b", "b", "c"]
    assert stream.domain_starts() == [(1, "a"), (4, "b"), (6, "c")]
    assert set(stream.series()) == {"dice_od", "dice_oc", "no_adapt_dice_od", "no_adapt_dice_oc", "cos", "lr"}
    stream(None)
    assert {m.key for m in mlflow.logged} == {"stream/dice_od", "stream/dice_oc"}  # cos, lr: logged per iteration
    assert (tmp_path / "stream.png").stat().st_size > 10_000
