import dataclasses
import io
from types import SimpleNamespace

import torch

from monai_grata.handlers import MetricsReport, RunSummary
from monai_grata.tta import (
    AdaptationStep,
    DeTTAStep,
    DIGAStep,
    DLTTAStep,
    DomainAdaptorStep,
    DUAStep,
    GraTaStep,
    NormStep,
    SARStep,
    TentStep,
)


def report(tmp_path, summary):
    r = MetricsReport(str(tmp_path), task="fundus")
    r.summary = summary
    return r


def test_summary_compares_no_adapt_and_adapted_dice_per_domain(tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    adapted = report(tmp_path, {"dice_mean": 0.75, "a/dice_mean": 0.8, "b/dice_mean": 0.7})
    no_adapt = report(tmp_path, {"dice_mean": 0.7, "a/dice_mean": 0.75, "b/dice_mean": 0.65})
    skipped = [{"image": "x.png", "reason": "image 'x.png' cannot be read (OSError)"}]
    summary = RunSummary(
        str(tmp_path), "grata", "refuge_train", adapted, no_adapt, "sqlite:///db", skipped, task="fundus"
    )
    summary.n_images, summary.domains = 5, ["a", "b"]
    lines = summary.text().splitlines()
    assert lines[1] == "Done: source model 'refuge_train', adapted with grata, 5 images in 2 domains."
    assert lines[2].split() == ["Dice", "(disc,", "cup", "mean)", "No", "Adapt", "grata"]
    assert [line.split() for line in lines[3:6]] == [
        ["a", "0.750", "0.800"],
        ["b", "0.650", "0.700"],
        ["all", "0.700", "0.750"],
    ]
    assert (
        lines[6].startswith(f"Outputs in {tmp_path}: masks/ (label maps: 0 background, 1 disc rim, 2 cup)")
        and "metrics.json" in lines[6]
        and "stream" not in lines[6]
    )
    assert "mlflow ui --backend-store-uri sqlite:///db" in lines[7]
    assert lines[-2].startswith("Skipped 1 bad input") and "x.png' cannot be read" in lines[-1]


def test_summary_keeps_a_long_method_name_apart_from_no_adapt(tmp_path):
    adapted, no_adapt = report(tmp_path, {"dice_mean": 0.75}), report(tmp_path, {"dice_mean": 0.7})
    summary = RunSummary(str(tmp_path), "grata_gated_long_name", report=adapted, reference=no_adapt)
    header, row = summary.text().splitlines()[2:4]
    assert header.split()[-3:] == ["No", "Adapt", "grata_gated_long_name"]
    assert row.split() == ["all", "0.700", "0.750"]
    assert header.index("grata_gated_long_name") + len("grata_gated_long_name") == len(row)  # columns line up


def adaptation_line(tmp_path, method: str, history: list) -> str | None:
    summary = RunSummary(str(tmp_path), method, tta_handler=SimpleNamespace(history=history))
    return next((x for x in summary.text().splitlines() if x.startswith("Adaptation")), None)


def test_summary_counts_the_updated_batches_and_those_the_shift_gate_held(tmp_path):
    zero, shift = torch.tensor(0.0), torch.tensor(0.1)
    history = [
        GraTaStep(updated=False, lr=zero, stream_shift=shift, gate_open=zero),
        GraTaStep(lr=torch.tensor(1e-3), cos=torch.tensor(0.2), gate_open=torch.tensor(1.0)),
        GraTaStep(updated=False, lr=zero, cos=torch.tensor(-0.5)),  # min_cos rule: no step, but not the gate
        AdaptationStep(updated=False, skipped=True),  # non-finite input
        GraTaStep(lr=torch.tensor(1e-3), rolled_back=True),  # undone: not an update
    ]
    assert adaptation_line(tmp_path, "grata_gated", history) == (
        "Adaptation updated the weights on 1 of 5 batches; the shift gate (min_shift) held them on 1 "
        "(the stream looked like the source domain)."
    )
    assert adaptation_line(tmp_path, "norm", [NormStep()]) is None  # nothing persists between batches


def test_summary_counts_the_updates_of_every_kind_of_method(tmp_path):
    def step(cls, **fields):  # every tensor field set, as the adapter would
        values = {
            f.name: torch.tensor(1.0)
            for f in dataclasses.fields(cls)
            if f.name not in ("updated", "skipped", "rolled_back")
        }
        return cls(**{**values, **fields})

    expected = {
        TentStep: "the weights",
        SARStep: "the weights",
        DeTTAStep: "the weights",
        DomainAdaptorStep: "the weights",
        DLTTAStep: "the weights",
        DUAStep: "the BatchNorm statistics",
        DIGAStep: "the prototypes",
    }
    for cls, changes in expected.items():
        history = [step(cls), step(cls, updated=False), AdaptationStep(updated=False, skipped=True)]
        assert adaptation_line(tmp_path, cls.__name__, history) == f"Adaptation updated {changes} on 1 of 3 batches."
    assert adaptation_line(tmp_path, "norm_select", [step(NormStep)]) is None


def test_summary_without_labels(tmp_path):
    stream = io.StringIO()
    summary = RunSummary(str(tmp_path), "none", stream=stream)
    summary.n_images = 2
    assert "Done: no adaptation, 2 images." in summary.text() and "No labels: no Dice" in summary.text()


def test_summary_names_the_structures_of_its_task_or_of_its_report(tmp_path):
    (tmp_path / "masks").mkdir()
    spinal = RunSummary(str(tmp_path), "none", report=report(tmp_path, {"dice_mean": 0.8}), task="spinalcord")
    assert "Dice (cord, GM mean)" in spinal.text() and "white matter" in spinal.text()
    plain = MetricsReport(str(tmp_path), channel_names=("liver", "tumour"))
    plain.summary = {"dice_mean": 0.8}
    text = RunSummary(str(tmp_path), "none", report=plain).text()
    assert "Dice (liver, tumour mean)" in text and "masks/ (label maps)" in text
