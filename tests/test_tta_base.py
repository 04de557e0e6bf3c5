"""The adapter contract: construction with setup(), gradient and non-gradient adapters, predict(), typed steps."""

import copy
import dataclasses
import math

import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from torch import nn

from monai_grata.handlers import TTAHandler
from monai_grata.tta import (
    DIGA,
    DUA,
    AdaptationStep,
    BatchNormStatistics,
    GradientAdapter,
    SelectedBatchNormStatistics,
    TTAdapter,
    adapter_defaults,
    build_adapter,
)
from monai_grata.tta import base as tta_base
from monai_grata.tta.base import _REGISTRY, register_adapter

from .test_tta_baselines import images, sharp_net
from .test_tta_grata import tiny_net


@dataclasses.dataclass(kw_only=True)
class ScaledStep(AdaptationStep):
    loss: torch.Tensor
    spare: torch.Tensor | None = None


class Scaled(GradientAdapter):
    """Sets its fields after ``super().__init__``; ``setup`` registers a module built from them."""

    def __init__(self, model: nn.Module, lr: float = 1e-2, width: int = 3, episodic: bool = False) -> None:
        super().__init__(model, episodic=episodic)
        self.lr, self.width = lr, width
        self.seen_in_setup: dict = {}

    def setup(self) -> None:
        self.seen_in_setup = {"lr": self.lr, "configured": isinstance(self.model[1], nn.Module)}
        self.head = nn.Conv2d(self.width, self.width, 1)  # an extra module, registered as usual
        self.head.requires_grad_(False)

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return [self.head.weight]

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr)

    def adapt(self, x: torch.Tensor) -> ScaledStep:
        loss = self.model(self.head(x)).square().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return ScaledStep(loss=loss.detach())


def test_setup_runs_after_the_subclass_has_set_its_fields():
    adapter = Scaled(tiny_net(), lr=0.5, width=3)
    assert adapter.seen_in_setup == {"lr": 0.5, "configured": True}
    assert adapter.params == [adapter.head.weight] and adapter.params[0].requires_grad
    assert adapter.optimizer.param_groups[0]["lr"] == 0.5  # build_optimizer saw the field set after super()
    assert "head.weight" in adapter.state_dict() and not any(p.requires_grad for p in adapter.model.parameters())
    source = adapter.head.weight.detach().clone()
    adapter(images(1)[0])
    assert not torch.equal(adapter.head.weight, source)


def test_the_constructor_signature_is_the_subclass_own():
    assert dict(adapter_defaults("tent"), lr=None) == {
        "lr": None,
        "episodic": False,
        "multilabel": None,
        "predict": "before",
        "bn_prior": 0.0,
        "bn_momentum": 0.0,
        "bn_first_layers": 0,
        "bn_first_prior": 0.0,
        "bn_min_shift": 0.0,
        "bn_first_min_shift": 0.0,
        "bn_site_min_shift": 0.0,
        "bn_first_site_min_shift": 0.0,
        "bn_site_min_batches": 5,
    }
    register_adapter("scaled_test")(Scaled)
    try:
        assert adapter_defaults("scaled_test") == {"lr": 1e-2, "width": 3, "episodic": False}
        assert isinstance(build_adapter("scaled_test", tiny_net(), lr=0.1), Scaled)
    finally:
        _REGISTRY.pop("scaled_test", None)


@pytest.mark.parametrize(
    "build",
    [
        BatchNormStatistics,
        lambda net: SelectedBatchNormStatistics(net, multilabel=True),
        lambda net: DUA(net, n_augmentations=4),
        lambda net: DIGA(net, multilabel=True),
    ],
    ids=["norm", "norm_select", "dua", "diga"],
)
def test_methods_without_gradient_steps_have_no_optimizer_and_no_rollback_copies(build, monkeypatch):
    adapter = build(sharp_net())
    assert not isinstance(adapter, GradientAdapter)
    for name in ("optimizer", "params", "n_rolled_back", "_source_optimizer"):
        assert not hasattr(adapter, name), name
    assert not any(p.requires_grad for p in adapter.parameters())

    def no_snapshot(*args):
        raise AssertionError("a non-gradient adapter took an optimizer snapshot")

    monkeypatch.setattr(tta_base, "_snapshot_optimizer", no_snapshot)
    for x in images(2):
        assert bool(torch.isfinite(adapter(x)).all())
    assert isinstance(adapter.last_step, AdaptationStep) and not adapter.last_step.rolled_back


def test_diga_fuses_in_predict_without_a_hook_on_the_model():
    net = sharp_net()
    adapter = DIGA(net, multilabel=True)
    assert not net._forward_hooks and not net._forward_pre_hooks
    x, y = images(2)
    with torch.no_grad():
        raw = net(y)
    torch.testing.assert_close(adapter.predict(y), raw)  # no prototypes yet: the network's prediction
    adapter.adapt_batch(x)
    with torch.no_grad():
        raw = net(y)  # the network's forward stays the network's
        fused = adapter.fuse(net(y))
    assert not torch.allclose(fused, raw)
    torch.testing.assert_close(adapter.predict(y), fused)
    assert not net._forward_hooks and not net._forward_pre_hooks


def test_diga_in_an_evaluator_predicts_as_the_adapter_does():
    torch.manual_seed(0)
    data = [{"image": x[0]} for x in images(3)]
    reference = DIGA(sharp_net(), multilabel=True)
    expected = [reference(x) for x in images(3)]
    network = sharp_net()
    engine = SupervisedEvaluator(
        device="cpu",
        val_data_loader=DataLoader(data, batch_size=1),
        network=network,
        val_handlers=[TTAHandler(method="diga", multilabel=True)],
    )
    preds = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output[0]["pred"].clone()))
    engine.run()
    for got, want in zip(preds, expected, strict=True):
        torch.testing.assert_close(got[None], want, rtol=0, atol=1e-6)
    assert engine.inferer.__class__.__name__ == "SimpleInferer"  # the evaluator's own inferer is back


def test_adapt_must_return_a_step():
    class Untyped(Scaled):
        def adapt(self, x):
            return {"loss": torch.tensor(0.0)}

    with pytest.raises(TypeError, match="AdaptationStep"):
        Untyped(tiny_net()).adapt_batch(images(1)[0])


def test_a_step_names_its_set_fields_and_its_flags():
    loss = torch.tensor(0.5)
    assert ScaledStep(loss=loss).scalars() == {"loss": loss}
    flags = ScaledStep(loss=loss, spare=loss, updated=False, rolled_back=True).scalars()
    assert list(flags) == ["loss", "spare", "rolled_back"] and float(flags["rolled_back"]) == 1
    assert list(AdaptationStep(updated=False, skipped=True).scalars()) == ["skipped"]


def test_a_skipped_batch_and_a_rolled_back_update_are_not_updates():
    adapter = Scaled(tiny_net())
    bad = images(1)[0]
    bad[0, 0, 0, 0] = math.nan
    step = adapter.adapt_batch(bad)
    assert (
        step.skipped
        and not step.updated
        and adapter.last_step is step
        and adapter.last_stats == {"skipped": torch.tensor(1.0)}
    )
    source = copy.deepcopy(adapter.head.state_dict())
    original = adapter.adapt

    def poisoned(x):
        step = original(x)
        with torch.no_grad():
            adapter.head.weight.fill_(math.nan)
        return step

    adapter.adapt = poisoned
    step = adapter.adapt_batch(images(1)[0])
    assert step.rolled_back and not step.updated and adapter.n_rolled_back == 1
    assert torch.equal(adapter.head.weight, source["weight"])


def test_a_plain_adapter_only_needs_adapt():
    class Count(TTAdapter):
        def setup(self) -> None:
            self.batches = 0

        def adapt(self, x):
            self.batches += 1
            return AdaptationStep()

    adapter = Count(tiny_net())
    adapter(images(1)[0])
    assert adapter.batches == 1 and adapter.last_step.updated and adapter.prediction_order == "after"


def test_the_handler_warns_when_no_inferer_can_run_the_adapter_predict(caplog):
    engine = Engine(lambda e, batch: None)
    TTAHandler(adapter=DIGA(sharp_net(), multilabel=True)).attach(engine)
    engine.prepare_batch = lambda batch, device, non_blocking, **kwargs: (batch["image"], None)
    engine.state.device, engine.non_blocking = "cpu", False
    engine.run([{"image": x} for x in images(1)])
    assert "DIGA predicts with its own predict()" in caplog.text
