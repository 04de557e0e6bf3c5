import copy

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.handlers import StatsHandler
from monai.inferers import SlidingWindowInferer

from monai_grata.handlers import GraTaHandler, TTAHandler, tta_output_transform
from monai_grata.tta import GraTa, GraTaStep, PatchAdaptation, build_adapter

from .test_tta_grata import tiny_net, tiny_net_3d


def loader(domains=("a", "a", "b", "b")):
    torch.manual_seed(1)
    data = [{"image": torch.rand(3, 16, 16), "label": torch.ones(2, 16, 16), "domain": d} for d in domains]
    return DataLoader(data, batch_size=1, shuffle=False)


def evaluator(network, handlers, device="cpu"):
    return SupervisedEvaluator(device=device, val_data_loader=loader(), network=network, val_handlers=handlers)


def test_evaluator_forward_sees_adapted_weights(device):
    # the evaluator moves each batch to the device; the handler adapts on that copy
    source = tiny_net().to(device)
    reference = GraTa(copy.deepcopy(source), beta=1e-2, seed=2, multilabel=True)
    expected = [reference(batch["image"].to(device)) for batch in loader()]

    network = copy.deepcopy(source)
    handler = GraTaHandler(beta=1e-2, seed=2, task="fundus")
    engine = evaluator(network, [handler], device)
    preds = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output[0]["pred"]))
    engine.run()
    assert handler.adapter.model is network
    assert len(handler.history) == 4
    for got, want in zip(preds, expected, strict=True):
        assert got.device.type == device.type
        torch.testing.assert_close(got[None], want, rtol=0, atol=1e-6 if device.type == "cpu" else 1e-5)
    assert isinstance(engine.state.tta, GraTaStep) and engine.state.tta.updated
    assert set(engine.state.output[0]["tta"]) == {"cos", "lr", "loss_aux", "loss_pseudo"}  # the names logged


def test_stats_reach_stats_handler(capsys):
    handler = GraTaHandler(beta=1e-3, task="fundus")
    stats = StatsHandler(iteration_log=True, output_transform=tta_output_transform, name="tta_test")
    evaluator(tiny_net(), [handler, stats]).run()
    printed = "".join(capsys.readouterr())
    assert "Iter: 4/4 -- cos:" in printed and "lr:" in printed and "loss_pseudo:" in printed


def test_a_preset_builds_its_adapter_and_options_given_win():
    handler = TTAHandler(
        method="grata_gated", steps=2, beta=1e-4, task="fundus"
    )  # 1e-4: GraTa's own default, still the user's
    evaluator(tiny_net(), [handler]).run()
    assert isinstance(handler.adapter, GraTa)
    assert (handler.adapter.min_shift, handler.adapter.beta, handler.adapter.steps) == (0.18, 1e-4, 2)
    assert handler.history[0].stream_shift is not None


def test_reset_on_domain_change():
    handler = TTAHandler(method="grata", reset_key="domain", beta=1e-2, task="fundus")
    resets = []
    engine = evaluator(tiny_net(), [handler])

    def spy(engine):
        handler.adapter.reset = lambda: (resets.append(engine.state.iteration), GraTa.reset(handler.adapter))

    engine.add_event_handler(Events.STARTED, spy)
    engine.run()
    assert resets == [3]  # first image of domain "b"


def test_the_evaluator_prediction_moves_a_following_prior_and_feeds_the_site_gate_as_the_adapter_does():
    source = tiny_net()
    options = {"bn_prior": 4.0, "bn_momentum": 0.5, "bn_min_shift": 1e3, "bn_site_min_shift": 1e-9,
               "bn_site_min_batches": 3}  # fmt: skip
    reference = build_adapter("norm", copy.deepcopy(source), **options)
    expected = [reference(batch["image"]) for batch in loader()]
    network = copy.deepcopy(source)
    handler = TTAHandler(method="norm", task="fundus", reset_key="domain", **options)
    engine = evaluator(network, [handler])
    preds, records = [], []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output[0]["pred"]))
    engine.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: records.append(handler.adapter.model[1].stream_batches)
    )
    engine.run()
    assert records == [1, 2, 1, 2]  # one record per prediction, a new stream at domain "b"
    for got, want in zip(preds[:2], expected[:2], strict=True):  # the reference runs one stream: its first two
        torch.testing.assert_close(got[None], want, rtol=0, atol=1e-6)
    assert not torch.equal(network[1].running_mean, source[1].running_mean)  # the prior followed the stream


def test_adapter_sees_the_batch_as_the_evaluator_prepares_it():
    calls = []

    def prepare_batch(batchdata, device=None, non_blocking=False, **kwargs):
        calls.append(kwargs)
        return batchdata["image"].to(device=device, **kwargs) * 2, batchdata["label"].to(device)

    network = tiny_net()
    handler = TTAHandler(method="grata", beta=1e-3, task="fundus")
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
        return GraTaStep(updated=False, lr=torch.tensor(0.0))

    engine.add_event_handler(Events.STARTED, lambda e: setattr(handler.adapter, "adapt", record))
    network.double()
    engine.run()
    assert calls == [{"dtype": torch.float64}] * 8  # once by the handler, once by the evaluator, per batch
    first = next(iter(loader()))["image"]
    assert seen[0].dtype == torch.float64 and torch.equal(seen[0], first.double() * 2)


def test_adapter_must_wrap_the_evaluator_network():
    with pytest.raises(ValueError, match="evaluator's own network"):
        evaluator(tiny_net(), [GraTaHandler(adapter=GraTa(tiny_net(), multilabel=True))]).run()


def test_tta_output_transform_without_stats():
    assert tta_output_transform([{"pred": torch.zeros(1)}]) is None


# --- volumes with a SlidingWindowInferer: adapt on patches, predict every window with the adapted weights ---------


def volume_loader(domains=("a", "a", "b")):
    torch.manual_seed(5)
    data = [{"image": torch.rand(1, 20, 20, 4), "label": torch.ones(3, 20, 20, 4), "domain": d} for d in domains]
    return DataLoader(data, batch_size=1, shuffle=False)


def sliding_evaluator(network, handlers):
    inferer = SlidingWindowInferer(roi_size=(8, 8, -1), sw_batch_size=2, overlap=0.25)
    engine = SupervisedEvaluator(
        device="cpu", val_data_loader=volume_loader(), network=network, inferer=inferer, val_handlers=handlers
    )
    preds = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output[0]["pred"]))
    return engine, inferer, preds


def test_sliding_window_evaluator_predicts_with_the_patch_adapted_weights():
    source = tiny_net_3d()
    reference = PatchAdaptation(
        build_adapter("grata", copy.deepcopy(source), task="spinalcord", beta=1e-2, seed=2), (8, 8, -1), 3
    )
    network = copy.deepcopy(source)
    handler = TTAHandler(method="grata", num_patches=3, beta=1e-2, seed=2, task="spinalcord")
    engine, inferer, preds = sliding_evaluator(network, [handler])
    seen = []
    engine.add_event_handler(
        Events.STARTED,
        lambda e: setattr(handler.adapter, "adapt", lambda x, f=handler.adapter.adapt: (seen.append(x.shape), f(x))[1]),
    )
    engine.run()
    expected = [reference(batch["image"], inferer) for batch in volume_loader()]
    assert seen == [torch.Size([3, 1, 8, 8, 4])] * 3  # patches only, never the 20 x 20 x 4 volume
    for got, want in zip(preds, expected, strict=True):
        torch.testing.assert_close(got[None], want, rtol=0, atol=1e-6)
    assert float(engine.state.output[0]["tta"]["n_patches"]) == 3 and engine.state.tta.cos is not None
    assert all("forward" not in vars(m) for m in network.modules())  # BatchNorm released after each iteration


def test_sliding_window_reset_on_domain_change_and_rollback(caplog):
    network = tiny_net_3d()
    source = copy.deepcopy(network.state_dict())
    handler = TTAHandler(method="tent", reset_key="domain", lr=1e-2, multilabel=False)
    engine, _, preds = sliding_evaluator(network, [handler])
    params = {}

    def setup(engine):
        adapter = handler.adapter
        original = adapter.adapt

        def adapt(x):  # the second volume's update goes non-finite and must be rolled back
            stats = original(x)
            if engine.state.iteration == 2:
                params["before"] = [p.clone() for p in adapter.params]
                with torch.no_grad():
                    adapter.params[0].fill_(float("nan"))
            return stats

        adapter.adapt = adapt
        adapter.reset = lambda f=adapter.reset: (params.setdefault("reset_at", engine.state.iteration), f())

    def check(engine):
        if engine.state.iteration == 2:
            assert handler.adapter.n_rolled_back == 1 and engine.state.tta.rolled_back
            assert bool(torch.isfinite(torch.cat([p.flatten() for p in handler.adapter.params])).all())
        if engine.state.iteration == 3:  # domain "b": started again from the source weights, then adapted
            assert params["reset_at"] == 3

    engine.add_event_handler(Events.STARTED, setup)
    engine.add_event_handler(Events.ITERATION_COMPLETED, check)
    engine.run()
    assert all(bool(torch.isfinite(p).all()) for p in preds)
    handler.adapter.reset()
    assert all(torch.equal(v, source[k]) for k, v in network.state_dict().items())


def test_patch_adaptation_needs_a_sliding_window_inferer():
    handler = TTAHandler(method="norm", patch_adaptation=True, task="fundus")
    with pytest.raises(ValueError, match="SlidingWindowInferer"):
        evaluator(tiny_net(), [handler]).run()
    whole = TTAHandler(method="norm", patch_adaptation=False, task="fundus")
    engine, _, _ = sliding_evaluator(tiny_net_3d(), [whole])
    engine.run()
    assert whole.patches is None and len(whole.history) == 3


@pytest.mark.parametrize("predict", ["before", "after"])
def test_methods_that_predict_before_their_update_do_so_in_an_evaluator(predict):
    from monai_grata.tta import Tent

    reference = Tent(tiny_net(), lr=1e-1, predict=predict, multilabel=True)
    expected = [reference(batch["image"]) for batch in loader()]
    handler = TTAHandler(method="tent", lr=1e-1, predict=predict, task="fundus")
    engine = evaluator(tiny_net(), [handler])
    preds = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output[0]["pred"]))
    engine.run()
    for got, want in zip(preds, expected, strict=True):
        torch.testing.assert_close(got[None], want, rtol=0, atol=1e-6)
    after = Tent(tiny_net(), lr=1e-1, predict="after", multilabel=True)
    differs = [not torch.allclose(after(b["image"]), w, atol=1e-6) for b, w in zip(loader(), expected, strict=True)]
    assert any(differs) == (predict == "before")
