import copy

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.handlers import StatsHandler

from monai_grata.handlers import GraTaHandler, TTAHandler, tta_output_transform
from monai_grata.tta import GraTa

from .test_tta_grata import tiny_net


def loader(domains=("a", "a", "b", "b")):
    torch.manual_seed(1)
    data = [{"image": torch.rand(3, 16, 16), "label": torch.ones(2, 16, 16), "domain": d} for d in domains]
    return DataLoader(data, batch_size=1, shuffle=False)


def evaluator(network, handlers, device="cpu"):
    return SupervisedEvaluator(device=device, val_data_loader=loader(), network=network, val_handlers=handlers)


def test_evaluator_forward_sees_adapted_weights(device):
    # the evaluator moves each batch to the device; the handler adapts on that copy
    source = tiny_net().to(device)
    reference = GraTa(copy.deepcopy(source), beta=1e-2, seed=2)
    expected = [reference(batch["image"].to(device)) for batch in loader()]

    network = copy.deepcopy(source)
    handler = GraTaHandler(beta=1e-2, seed=2)
    engine = evaluator(network, [handler], device)
    preds = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output[0]["pred"]))
    engine.run()
    assert handler.adapter.model is network
    assert len(handler.history) == 4
    for got, want in zip(preds, expected, strict=True):
        assert got.device.type == device.type
        torch.testing.assert_close(got[None], want, rtol=0, atol=1e-6 if device.type == "cpu" else 1e-5)
    assert set(engine.state.tta) == {"cos", "lr", "loss_aux", "loss_pseudo"}


def test_stats_reach_stats_handler(capsys):
    handler = GraTaHandler(beta=1e-3)
    stats = StatsHandler(iteration_log=True, output_transform=tta_output_transform, name="tta_test")
    evaluator(tiny_net(), [handler, stats]).run()
    printed = "".join(capsys.readouterr())
    assert "Iter: 4/4 -- cos:" in printed and "lr:" in printed and "loss_pseudo:" in printed


def test_reset_on_domain_change():
    handler = TTAHandler(method="grata", reset_key="domain", beta=1e-2)
    resets = []
    engine = evaluator(tiny_net(), [handler])

    def spy(engine):
        handler.adapter.reset = lambda: (resets.append(engine.state.iteration), GraTa.reset(handler.adapter))

    engine.add_event_handler(Events.STARTED, spy)
    engine.run()
    assert resets == [3]  # first image of domain "b"


def test_adapter_sees_the_batch_as_the_evaluator_prepares_it():
    calls = []

    def prepare_batch(batchdata, device=None, non_blocking=False, **kwargs):
        calls.append(kwargs)
        return batchdata["image"].to(device=device, **kwargs) * 2, batchdata["label"].to(device)

    network = tiny_net()
    handler = TTAHandler(method="grata", beta=1e-3)
    engine = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader(),
        network=network,
        prepare_batch=prepare_batch,
        to_kwargs={"dtype": torch.float64},
        val_handlers=[handler],
    )
    seen = []

    def record(x):
        seen.append(x)
        return {}

    engine.add_event_handler(Events.STARTED, lambda e: setattr(handler.adapter, "adapt", record))
    network.double()
    engine.run()
    assert calls == [{"dtype": torch.float64}] * 8  # once by the handler, once by the evaluator, per batch
    first = next(iter(loader()))["image"]
    assert seen[0].dtype == torch.float64 and torch.equal(seen[0], first.double() * 2)


def test_adapter_must_wrap_the_evaluator_network():
    with pytest.raises(ValueError, match="evaluator's own network"):
        evaluator(tiny_net(), [GraTaHandler(adapter=GraTa(tiny_net()))]).run()


def test_tta_output_transform_without_stats():
    assert tta_output_transform([{"pred": torch.zeros(1)}]) is None
