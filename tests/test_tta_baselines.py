import copy
import inspect
import math

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from torch import nn

from monai_grata.handlers import TTAHandler
from monai_grata.tta import (
    DIGA,
    DLTTA,
    DUA,
    SAR,
    BatchNormPolicy,
    DomainAdaptor,
    GradientAdapter,
    MedBN,
    adapter_class,
    adapter_names,
    build_adapter,
    convert_to_adaptive_batch_norm,
    convert_to_batch_norm,
    dua_copies,
    generalized_entropy_loss,
    pixel_entropy,
    symmetric_kl,
    update_running_statistics,
)

from .test_tta_grata import slicewise_net, tiny_net, tiny_net_3d
from .test_tta_sar import sar_with_reset

BASELINES = {"dua": DUA, "diga": DIGA, "medbn": MedBN, "dltta": DLTTA, "domainadaptor": DomainAdaptor, "sar": SAR}
# a small bank and no SAR reset (the ``small_constants`` fixture), so that two images show an update of every method
OPTIONS = {"dltta": {"k": 1}}
CONSTANTS = {DLTTA: {"MEMORY_SIZE": 3}, SAR: {"RESET_CONSTANT": 0.0}}


@pytest.fixture
def small_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    """The class constants of ``CONSTANTS`` for one test."""
    for cls, constants in CONSTANTS.items():
        for name, value in constants.items():
            monkeypatch.setattr(cls, name, value)


def sharp_net(out_channels: int = 2) -> nn.Module:
    """tiny_net with confident predictions (DIGA's pseudo-labels and SAR's filter keep pixels)."""
    net = tiny_net(out_channels)
    with torch.no_grad():
        net[-1].weight.mul_(20)
    return net


def images(n: int = 3, size: int = 16) -> list[torch.Tensor]:
    torch.manual_seed(3)
    return [torch.rand(1, 3, size, size) * 3 + 1 for _ in range(n)]  # far from the source statistics


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def is_affine(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("weight", "bias") and key.split(".")[0] in ("1", "4")  # tiny_net's norms


RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def method_state(adapter) -> object:
    return {
        "diga": lambda a: a.prototypes,
        "dltta": lambda a: (
            len(a.memory),
            [t.tolist() for t in a.adaptor.state_dict().values()],
            [t.tolist() for _, mean, var in a.running_statistics for t in (mean, var)],
        ),
        "sar": lambda a: a.ema,
        "dua": lambda a: a.steps,
    }.get(type(adapter).__name__.lower(), lambda a: None)(adapter)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_builds_with_defaults_and_returns_logits(name):
    adapter = build_adapter(name, tiny_net(), task="fundus")
    assert isinstance(adapter, BASELINES[name])
    x = images(1)[0]
    out = adapter(x)
    assert out.shape == (1, 2, 16, 16) and bool(torch.isfinite(out).all())
    scalars = adapter.last_step.scalars()
    assert scalars and all(torch.is_tensor(v) and v.ndim == 0 for v in scalars.values())


@pytest.mark.usefixtures("small_constants")
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_two_steps_change_only_what_the_method_adapts(name):
    adapter = build_adapter(name, sharp_net(), task="fundus", **OPTIONS.get(name, {}))
    source = copy.deepcopy(adapter.model.state_dict())
    first, second = images(2)
    adapter(first)
    after_one = copy.deepcopy(adapter.model.state_dict())
    adapter(second)
    moved = changed(source, adapter.model.state_dict())
    if name == "dua":  # backward-free: only the running statistics
        assert moved and all(k.endswith(RUNNING) for k in moved)
    elif name == "diga":  # backward-free: nothing persistent but its prototypes
        assert not moved and adapter.prototypes is not None and bool(adapter.exists.any())
    elif name == "dltta":  # the network's weights stay frozen (its train-mode forwards move the running statistics,
        # as the authors' do); the adaptor inside it moves
        fresh = build_adapter(name, sharp_net(), task="fundus", **OPTIONS[name]).adaptor.state_dict()
        assert all(k.endswith(RUNNING) for k in moved)
        assert changed(fresh, adapter.adaptor.state_dict())
    else:  # normalisation affine parameters only
        assert moved and all(is_affine(k) for k in moved)
    if name == "dltta":  # the authors' warm-up: lr = base * entries, 0 for the first image
        assert not [k for k in changed(source, after_one) if not k.endswith(RUNNING)]
        assert float(adapter.last_step.lr) == pytest.approx(1e-3)


@pytest.mark.usefixtures("small_constants")
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_reset_restores_the_source_state_bit_exactly(name):
    adapter = build_adapter(name, sharp_net(), task="fundus", **OPTIONS.get(name, {}))
    source = copy.deepcopy(adapter.model.state_dict())
    fresh = method_state(adapter)
    for x in images(3):
        adapter(x)
    adapter.reset()
    assert not changed(source, adapter.model.state_dict())
    if isinstance(adapter, GradientAdapter):
        assert adapter.optimizer.state_dict()["state"] == {}
    assert method_state(adapter) == fresh  # prototypes, memory bank, loss average, momentum schedule cleared


@pytest.mark.usefixtures("small_constants")
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_a_batch_with_nan_is_skipped(name):
    adapter = build_adapter(name, sharp_net(), task="fundus", **OPTIONS.get(name, {}))
    source = copy.deepcopy(adapter.model.state_dict())
    adapter(images(1)[0])
    before, state = copy.deepcopy(adapter.model.state_dict()), copy.deepcopy(method_state(adapter))
    bad = images(1)[0]
    bad[0, 0, 3, 3] = float("nan")
    adapter.adapt_batch(bad)
    assert adapter.n_skipped == 1 and adapter.last_step.skipped
    assert not changed(source if adapter.episodic else before, adapter.model.state_dict())  # episodic: reset first
    if name == "diga":
        assert torch.equal(adapter.prototypes, state)
    else:
        assert method_state(adapter) == state


@pytest.mark.parametrize("name", ["diga", "dltta", "domainadaptor", "grata", "medbn", "norm_select", "sar", "tent"])
def test_no_task_is_assumed_and_the_error_says_what_to_pass(name):
    with pytest.raises(ValueError, match=r"multilabel=True for sigmoid.*multilabel=False for softmax.*task="):
        build_adapter(name, sharp_net())
    assert build_adapter(name, sharp_net(), task="spinalcord").multilabel is False
    assert build_adapter(name, sharp_net(), task="fundus", multilabel=False).multilabel is False  # the caller wins
    with pytest.raises(KeyError, match="unknown task"):
        build_adapter(name, sharp_net(), task="retina")


@pytest.mark.usefixtures("small_constants")
@pytest.mark.parametrize("name", ["diga", "dltta", "domainadaptor", "medbn", "sar"])
def test_softmax_outputs(name):
    adapter = build_adapter(name, sharp_net(out_channels=3), multilabel=False, **OPTIONS.get(name, {}))
    for x in images(3):
        out = adapter(x)
    assert out.shape == (1, 3, 16, 16) and bool(torch.isfinite(out).all())


# --- the adapters never see the label --------------------------------------------------------------------------------


def _required_arguments(name: str) -> list[str]:
    signature = inspect.signature(adapter_class(name))
    return [p for p, v in list(signature.parameters.items())[1:] if v.default is inspect.Parameter.empty]


def _evaluator_predictions(name: str, labels: str) -> list[torch.Tensor]:
    torch.manual_seed(7)
    data = []
    for x in images(3):
        item = {"image": x[0]}
        if labels == "real":
            item["label"] = (x[0, :2] > 2.5).float()
        elif labels == "nan":
            item["label"] = torch.full((2, 16, 16), float("nan"))
        data.append(item)
    network = sharp_net()
    engine = SupervisedEvaluator(
        device="cpu",
        val_data_loader=DataLoader(data, batch_size=1),
        network=network,
        val_handlers=[TTAHandler(method=name, task="fundus")],
    )
    preds = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.append(e.state.output[0]["pred"].clone()))
    torch.manual_seed(0)
    engine.run()
    return preds


@pytest.mark.parametrize("name", adapter_names())
def test_no_adapter_receives_the_label(name):
    """Inside a MONAI evaluator with labels, with NaN-poisoned labels and without labels, every registered adapter
    gives the same predictions: the label never reaches it."""
    if _required_arguments(name):
        pytest.skip(f"{name} needs {_required_arguments(name)} to be built")
    real, poisoned, absent = (_evaluator_predictions(name, labels) for labels in ("real", "nan", "none"))
    for a, b, c in zip(real, poisoned, absent, strict=True):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


# --- per-method rules ------------------------------------------------------------------------------------------------


@torch.no_grad()
def median_reference(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = x
    for layer in net:
        if isinstance(layer, nn.BatchNorm2d):
            flat = out.transpose(0, 1).reshape(out.shape[1], -1)
            med = flat.median(dim=1).values
            var = (flat - med[:, None]).square().mean(dim=1)
            out = (out - med.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + layer.eps)
            out = out * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
        else:
            out = layer(out)
    return out


def median_net(net: nn.Module, prior: float = 0.0) -> nn.Module:
    """A copy of ``net`` whose BatchNorm layers normalise with median statistics mixed with a prior."""
    return convert_to_adaptive_batch_norm(copy.deepcopy(net), BatchNormPolicy(prior=prior, statistic="median"))


def test_median_statistics_match_the_reference_and_mix_a_prior():
    x = torch.rand(2, 3, 16, 16) * 3 + 1
    net = tiny_net()
    with torch.no_grad():
        torch.testing.assert_close(median_net(net)(x), median_reference(net, x))
        tiny_prior = median_net(net, prior=1e-9)(x)
        torch.testing.assert_close(tiny_prior, median_reference(net, x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(median_net(net, prior=64.0)(x), median_reference(net, x))
    with pytest.raises(ValueError, match="prior"):
        BatchNormPolicy(prior=math.inf, statistic="median")


def test_medbn_is_tent_on_median_statistics():
    net = tiny_net()
    adapter = MedBN(net, lr=1e-2, multilabel=True)
    x = images(1)[0]
    expected = median_reference(net, x)
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected)  # the adapting forward normalises with the median
    adapter(x)
    assert float(adapter.last_step.loss_aux) > 0


def test_dua_updates_running_statistics_on_augmented_copies_with_a_decaying_momentum():
    net = tiny_net()
    reference = copy.deepcopy(net).eval()
    adapter = DUA(net, n_augmentations=8, seed=4)
    stream = images(2)
    generator = torch.Generator().manual_seed(4)
    for step, x in enumerate(stream, start=1):
        out = adapter(x)
        momentum = 0.1 * 0.94**step + 0.005
        assert float(adapter.last_step.momentum) == pytest.approx(momentum)
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
                m.momentum = momentum
        with torch.no_grad():
            reference(dua_copies(x[0], 8, generator))
            expected = reference.eval()(x)
        torch.testing.assert_close(out, expected)
    assert all(not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_dua_copies_are_crops_flips_and_rotations_of_the_image():
    image = torch.arange(2 * 8 * 8, dtype=torch.float).reshape(2, 8, 8)
    copies = dua_copies(image, 16, torch.Generator().manual_seed(0))
    assert copies.shape == (16, 2, 8, 8)
    assert not torch.equal(copies[0], copies[1])
    assert len(dua_copies(torch.rand(3, 8, 12), 4, torch.Generator())) == 4  # non-square: half turns only


def test_update_running_statistics_is_train_mode_batch_norm_inside_the_context_only():
    net = convert_to_adaptive_batch_norm(tiny_net().eval(), BatchNormPolicy(prior=math.inf))
    reference = convert_to_batch_norm(copy.deepcopy(net)).train()
    for layer in (reference[1], reference[4]):
        layer.momentum = 0.5
    bn, x = net[1], torch.rand(2, 3, 8, 8)
    before = bn.running_mean.clone()
    with torch.no_grad(), update_running_statistics(net, 0.5):
        assert bn.running_update == 0.5
        torch.testing.assert_close(net(x), reference(x))
    assert bn.running_update is None and not torch.equal(before, bn.running_mean)
    torch.testing.assert_close(bn.running_mean, reference[1].running_mean)
    torch.testing.assert_close(bn.running_var, reference[1].running_var)  # unbiased, as PyTorch's
    with pytest.raises(ValueError, match="momentum"):
        with update_running_statistics(net, 0.0):
            pass
    with pytest.raises(ValueError, match="plain"):
        with update_running_statistics(tiny_net(), 0.5):
            pass


def test_diga_prototypes_follow_confident_pseudo_labels_and_fuse_with_the_network(monkeypatch):
    monkeypatch.setattr(DIGA, "PROTO_RHO", 0.5)
    net = sharp_net()
    adapter = DIGA(net, multilabel=True)
    x, y = images(2)
    adapter.adapt_batch(x)
    with torch.no_grad():
        logits = net(x)  # the network's own prediction: DIGA fuses in predict(), not in the network's forward
        features = adapter.tap.features
    p = torch.sigmoid(logits)
    present = (p[0, 0] > 0.9).flatten()
    assert bool(present.any())
    expected = features[0].flatten(1)[:, present].mean(dim=1)
    torch.testing.assert_close(adapter.prototypes[0, 1], expected)
    first = adapter.prototypes.clone()
    adapter.adapt_batch(y)
    instance, exists = adapter.instance_prototypes(adapter.tap.features, net_raw(adapter, y))
    both = exists & (first.abs().sum(-1) > 0)
    torch.testing.assert_close(adapter.prototypes[both], (first + 0.5 * (instance - first))[both])
    # no fusion: the network's own prediction (BatchNorm with the 0.8 / 0.2 mixture)
    monkeypatch.setattr(DIGA, "FUSION_LAMBDA", 0.0)
    plain = DIGA(copy.deepcopy(tiny_net()), multilabel=True)
    out = plain(x)
    with torch.no_grad():
        raw = plain.model(x)
    torch.testing.assert_close(out, raw, rtol=1e-4, atol=1e-4)


def net_raw(adapter: DIGA, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return adapter.model(x)


def test_dltta_learning_rate_grows_with_the_discrepancy_to_similar_past_images(monkeypatch):
    z = torch.randn(1, 2, 4, 4)
    assert float(symmetric_kl(z, z, True)) == pytest.approx(0.0, abs=1e-7)
    assert float(symmetric_kl(z, -z, True)) > 0 and float(symmetric_kl(z, 2 * z, False)) > 0
    monkeypatch.setattr(DLTTA, "MEMORY_SIZE", 4)
    adapter = DLTTA(tiny_net(), k=2, multilabel=True)
    lrs = []
    for x in images(5):
        adapter(x)
        lrs.append(float(adapter.last_step.lr))
    assert lrs[:3] == pytest.approx([0.0, 1e-3, 2e-3])  # warm-up while the bank holds <= k entries
    d = float(adapter.last_step.discrepancy)
    assert d > 0 and lrs[-1] == pytest.approx(1e-3 * math.exp(d))
    assert len(adapter.memory) == 4


def test_gem_t_matches_the_authors_formula():
    logits = torch.randn(2, 4, 3, 3)
    centred = logits - logits.mean(1, keepdim=True)
    t = centred.std(1, keepdim=True) * 2
    prob = (centred / t).softmax(1)
    expected = -((prob * prob.log()).sum(1) * t**2).mean()  # as written: (B, 3, 3) * (B, 1, 3, 3) broadcasts
    torch.testing.assert_close(generalized_entropy_loss(logits, multilabel=False), expected)
    z = torch.randn(2, 2, 3, 3)
    per_channel = [generalized_entropy_loss(torch.stack([-z[:, c] / 2, z[:, c] / 2], 1), False) for c in range(2)]
    torch.testing.assert_close(generalized_entropy_loss(z, multilabel=True), sum(per_channel))


def test_domainadaptor_starts_every_batch_from_the_source():
    net = tiny_net()
    adapter = DomainAdaptor(net, multilabel=True)
    source = copy.deepcopy(net.state_dict())
    x = images(1)[0]
    first = adapter(x)
    second = adapter(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # episodic: the same single step each time
    assert changed(source, net.state_dict())


def test_sar_filters_unreliable_pixels_and_resets_below_the_loss_average():
    z = torch.randn(1, 2, 4, 4)
    p = torch.sigmoid(z)
    torch.testing.assert_close(pixel_entropy(z, multilabel=True), -(p * p.log() + (1 - p) * (1 - p).log()))
    nothing_kept = SAR(tiny_net(), margin=0.01, multilabel=True)  # a tiny net is unsure everywhere
    source = copy.deepcopy(nothing_kept.model.state_dict())
    nothing_kept(images(1)[0])
    assert float(nothing_kept.last_step.kept) == 0 and not changed(source, nothing_kept.model.state_dict())
    always = sar_with_reset(math.inf)(sharp_net(), multilabel=True)
    state = copy.deepcopy(always.model.state_dict())
    always(images(1)[0])
    assert float(always.last_step.reset) == 1 and always.ema is not None  # the authors keep the average
    assert not changed(state, always.model.state_dict())
    always.reset()  # a reset from outside (a new domain) clears it
    assert always.ema is None
    kept = sar_with_reset(0.0)(sharp_net(), multilabel=True)
    kept(images(1)[0])
    assert 0 < float(kept.last_step.kept) <= 1 and kept.ema is not None
    assert float(kept.last_step.loss_pseudo) < math.log(2) * 0.4 + 1e-6


# --- volumes: every registered adapter on a 3D network and on a 2D network applied slice by slice --------------------


def _volume_options(name: str) -> dict:
    options = dict(OPTIONS.get(name, {}))  # the task: softmax over three classes, views in the (H, W) plane
    if name == "dua":
        options["n_augmentations"] = 4
    return options


@pytest.mark.usefixtures("small_constants")
@pytest.mark.parametrize("make_net", [tiny_net_3d, slicewise_net], ids=["3d", "slicewise_2d"])
@pytest.mark.parametrize("name", adapter_names())
def test_every_adapter_adapts_volumes_and_resets(name, make_net):
    if _required_arguments(name):
        pytest.skip(f"{name} needs {_required_arguments(name)} to be built")
    net = make_net(3)
    with torch.no_grad():  # confident predictions, so DIGA's and SAR's filters keep voxels
        last = net.network[-1] if hasattr(net, "network") else net[-1]
        last.weight.mul_(20)
    adapter = build_adapter(name, net, task="spinalcord", **_volume_options(name))
    source = copy.deepcopy(adapter.model.state_dict())
    torch.manual_seed(3)
    for _ in range(2):
        out = adapter(torch.rand(1, 1, 8, 8, 4) * 3 + 1)
        assert out.shape == (1, 3, 8, 8, 4) and bool(torch.isfinite(out).all())
    adapter.reset()
    assert not changed(source, adapter.model.state_dict())
