import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monai_grata.networks.slicewise import SliceWise
from monai_grata.transforms import StrongIntensityAug, weak_views
from monai_grata.tta import (
    ACTIVATIONS,
    BatchNormPolicy,
    GraTa,
    Tent,
    batch_norm_shift,
    build_adapter,
    per_group_batch_norm,
)


def tiny_net(out_channels: int = 2, norm: type = nn.BatchNorm2d) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        norm(8) if norm is not nn.GroupNorm else nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        norm(8) if norm is not nn.GroupNorm else nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, out_channels, 1),
    )
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net


def reference_grata(
    model: nn.Module, images: list[torch.Tensor], beta: float, seed: int, steps: int = 1, reuse_teacher: bool = False
) -> nn.Module:
    """Algorithm 1 written out plainly: separate forwards per view, train-mode BN, Adam by hand; ``steps`` updates
    per image, with ``reuse_teacher`` the teacher of an image's first update reused in its later ones."""
    model = copy.deepcopy(model).train()
    params = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]
    strong = StrongIntensityAug(seed=seed)
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    updates = [(x, first) for x in images for first in [True] + [False] * (steps - 1)]
    for step, (x, first) in enumerate(updates, start=1):
        p = torch.sigmoid(model(x))
        entropy = -(p * torch.log(p + 1e-6)).sum(dim=1).mean()
        g_ent = torch.autograd.grad(entropy, params)
        theta = [q.detach().clone() for q in params]
        with torch.no_grad():
            for q, g in zip(params, g_ent, strict=True):
                q -= g
            if first or not reuse_teacher:
                views = [
                    torch.sigmoid(model(x)),
                    torch.sigmoid(model(x.flip(-1))).flip(-1),
                    torch.sigmoid(model(x.flip(-2))).flip(-2),
                    torch.rot90(torch.sigmoid(model(torch.rot90(x, 1, (-2, -1)))), -1, (-2, -1)),
                    torch.rot90(torch.sigmoid(model(torch.rot90(x, 2, (-2, -1)))), -2, (-2, -1)),
                    torch.rot90(torch.sigmoid(model(torch.rot90(x, 3, (-2, -1)))), -3, (-2, -1)),
                ]
                teacher = sum(views) / 6
        consistency = F.binary_cross_entropy_with_logits(model(strong(x)), teacher)
        g_con = torch.autograd.grad(consistency, params)
        a, b = torch.cat([g.flatten() for g in g_ent]), torch.cat([g.flatten() for g in g_con])
        cos = (a @ b) / (a.norm() * b.norm() + 1e-12)
        lr = beta * (cos + 1) ** 2 / 4
        with torch.no_grad():
            for i, (q, t, g) in enumerate(zip(params, theta, g_con, strict=True)):
                m1[i] = 0.9 * m1[i] + 0.1 * g
                m2[i] = 0.999 * m2[i] + 0.001 * g * g
                m_hat, v_hat = m1[i] / (1 - 0.9**step), m2[i] / (1 - 0.999**step)
                q.copy_(t - lr * m_hat / (v_hat.sqrt() + 1e-8))
    return model


def test_grata_matches_plain_algorithm_1(device):
    source = tiny_net().to(device)
    images = [torch.rand(1, 3, 16, 16, device=device) for _ in range(2)]
    expected = reference_grata(source, images, beta=1e-2, seed=5)
    adapter = GraTa(copy.deepcopy(source), beta=1e-2, seed=5, multilabel=True)
    for x in images:
        adapter(x)
    got, want = dict(adapter.model.named_parameters()), dict(expected.named_parameters())
    changed = 0
    for name, value in got.items():
        assert value.device.type == device.type
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-6 if device.type == "cpu" else 1e-5, msg=name)
        if not torch.equal(value, dict(source.named_parameters())[name]):
            changed += 1
            assert name.split(".")[0] in {"1", "4"}, f"non-norm parameter {name} changed"
    assert changed == 4  # weight and bias of both BatchNorm layers


def test_reset_restores_source_bit_exactly():
    source = tiny_net()
    adapter = GraTa(copy.deepcopy(source), beta=1e-2, multilabel=True)
    state = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    adapter(torch.rand(1, 3, 16, 16))
    assert any(not torch.equal(v, state[k]) for k, v in adapter.model.state_dict().items())
    adapter.reset()
    assert all(torch.equal(v, state[k]) for k, v in adapter.model.state_dict().items())
    assert not adapter.optimizer.state
    for name, value in source.named_parameters():
        assert torch.equal(dict(adapter.model.named_parameters())[name], value)


def test_batched_views_equal_separate_forwards(device):
    net = tiny_net().to(device)
    adapter = GraTa(net, multilabel=True)
    x = torch.rand(2, 3, 16, 16, device=device)
    stacked = adapter.views(x)
    with torch.no_grad(), per_group_batch_norm(adapter.model, 6):
        batched = adapter.model(stacked)
    with torch.no_grad():
        separate = torch.cat([adapter.model(chunk) for chunk in stacked.chunk(6)])
        single = adapter.model(stacked[:1])
    torch.testing.assert_close(batched, separate, rtol=0, atol=1e-5)
    # batch size 1 per view: per-view statistics are the per-sample statistics of one image
    adapter_1 = GraTa(tiny_net().to(device), multilabel=True)
    x1 = torch.rand(1, 3, 16, 16, device=device)
    views = adapter_1.views(x1)
    with torch.no_grad(), per_group_batch_norm(adapter_1.model, 6):
        batched_1 = adapter_1.model(views)
    with torch.no_grad():
        for v in range(6):
            torch.testing.assert_close(batched_1[v : v + 1], adapter_1.model(views[v : v + 1]), rtol=0, atol=1e-5)
    assert single.shape == (1, 2, 16, 16)
    # the patch is removed after the context
    assert "forward" not in vars(adapter.model[1])


def test_adam_steps_with_the_dynamic_lr(device):
    # one plain Adam on every device: its lr is the step's dynamic lr, set as a float (no capturable branch)
    adapter = GraTa(tiny_net().to(device), beta=1e-2, multilabel=True)
    assert not adapter.optimizer.defaults["capturable"]
    for _ in range(2):
        adapter(torch.rand(1, 3, 16, 16, device=device))
        lr = adapter.optimizer.param_groups[0]["lr"]
        assert isinstance(lr, float) and lr == float(adapter.last_step.lr)
    assert all(v.device.type == device.type for v in adapter.last_step.scalars().values())
    assert float(adapter.optimizer.state[adapter.params[0]]["step"]) == 2


def test_stats_and_options():
    x = torch.rand(1, 3, 16, 16)
    adapter = GraTa(tiny_net(), beta=1e-3, multilabel=True)
    adapter(x)
    stats = adapter.last_step.scalars()  # the names the logs use
    assert set(stats) == {"cos", "lr", "loss_aux", "loss_pseudo"}
    assert -1 <= float(stats["cos"]) <= 1
    assert float(stats["lr"]) == pytest.approx(1e-3 * (float(stats["cos"]) + 1) ** 2 / 4, rel=1e-5)
    fixed = GraTa(tiny_net(), beta=1e-3, dynamic_lr=False, multilabel=True)
    fixed(x)
    assert float(fixed.last_step.lr) == pytest.approx(1e-3)
    for name, act in ACTIVATIONS.items():
        other = GraTa(tiny_net(), beta=1e-3, activation=name, multilabel=True)
        other(x)
        expected = 1e-3 * float(act(other.last_step.cos))
        assert float(other.last_step.lr) == pytest.approx(expected, rel=1e-5), name
    swapped = GraTa(tiny_net(), aux="consistency", pseudo="entropy", multilabel=True)
    swapped(x)
    assert float(swapped.last_step.loss_aux) != pytest.approx(float(stats["loss_aux"]))
    with pytest.raises(ValueError, match="activation"):
        GraTa(tiny_net(), activation="cubic", multilabel=True)
    with pytest.raises(ValueError, match="aux"):
        GraTa(tiny_net(), aux="rotation", multilabel=True)


def test_alignment_off_takes_pseudo_gradient_at_theta():
    x = torch.rand(1, 3, 16, 16)
    aligned, unaligned = (
        GraTa(tiny_net(), beta=1e-2, seed=1, multilabel=True),
        GraTa(tiny_net(), beta=1e-2, align=False, seed=1, multilabel=True),
    )
    aligned(x)
    unaligned(x)
    assert float(aligned.last_step.loss_pseudo) != pytest.approx(float(unaligned.last_step.loss_pseudo))
    # at theta the pseudo loss equals the consistency loss of the source model on the same strong view
    probe = GraTa(tiny_net(), seed=1, multilabel=True)
    assert float(unaligned.last_step.loss_pseudo) == pytest.approx(float(probe.loss("consistency", x)), rel=1e-6)


def test_a_plain_step_at_theta_takes_no_auxiliary_gradient():
    # align=False, dynamic_lr=False: Adam on the consistency gradient at θ with lr beta; the entropy gradient, which
    # nothing then reads, is not taken (its loss is still logged)
    x = torch.rand(1, 3, 16, 16)
    plain = GraTa(tiny_net(), beta=1e-2, align=False, dynamic_lr=False, seed=1, multilabel=True)
    calls = []
    grad = torch.autograd.grad
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
        plain(x)
    assert len(calls) == 1
    assert set(plain.last_step.scalars()) == {"lr", "loss_aux", "loss_pseudo"}
    assert float(plain.last_step.lr) == pytest.approx(1e-2)
    reference = GraTa(tiny_net(), seed=1, multilabel=True)  # the same strong view, drawn by the same seed
    params = reference.params
    gradients = torch.autograd.grad(reference.loss("consistency", x), params)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for p, g in zip(params, gradients, strict=True):
        p.grad = g
    optimizer.step()
    for p, q in zip(plain.params, params, strict=True):
        torch.testing.assert_close(p, q)


def test_same_seed_same_predictions_and_episodic():
    images = [torch.rand(1, 3, 16, 16) for _ in range(3)]
    runs = []
    for _ in range(2):
        adapter = GraTa(tiny_net(), beta=1e-2, seed=3, multilabel=True)
        runs.append([adapter(x) for x in images])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    episodic = GraTa(tiny_net(), beta=1e-2, seed=3, episodic=True, multilabel=True)
    first = episodic(images[0])
    episodic.strong_transform.set_random_state(3)
    assert torch.equal(episodic(images[0]), first)


def test_softmax_outputs_and_other_norms():
    x = torch.rand(2, 3, 16, 16)
    adapter = GraTa(tiny_net(out_channels=3), multilabel=False)
    assert adapter(x).shape == (2, 3, 16, 16)
    assert torch.isfinite(adapter.last_step.cos)
    grouped = GraTa(tiny_net(norm=nn.GroupNorm), multilabel=True)
    before = [p.clone() for p in grouped.params]
    grouped(x)
    assert len(grouped.params) == 4 and any(not torch.equal(a, b) for a, b in zip(before, grouped.params, strict=True))


def test_model_without_norm_layers_is_refused():
    with pytest.raises(ValueError, match="no normalisation layer"):
        GraTa(nn.Sequential(nn.Conv2d(3, 2, 1)), multilabel=True)


def test_non_finite_image_is_skipped(caplog):
    adapter = GraTa(tiny_net(), multilabel=True)
    before = [p.clone() for p in adapter.params]
    x = torch.rand(1, 3, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING):
        adapter(x)
    assert "NaN/Inf" in caplog.text and adapter.n_skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, adapter.params, strict=True))


def test_constant_image_gives_finite_cos():
    adapter = GraTa(tiny_net(), multilabel=True)
    adapter(torch.zeros(1, 3, 16, 16))
    assert all(torch.isfinite(v) for v in adapter.last_step.scalars().values())
    assert all(torch.isfinite(p).all() for p in adapter.params)


def test_zero_gradient_gives_cos_zero():
    net = tiny_net()
    adapter = GraTa(net, multilabel=True)
    adapter.loss = lambda name, x: (adapter.model(x) * 0).sum()
    adapter(torch.rand(1, 3, 16, 16))
    assert float(adapter.last_step.cos) == 0.0
    assert torch.isfinite(adapter.last_step.lr)


def test_non_finite_update_is_rolled_back(caplog):
    adapter = GraTa(tiny_net(), multilabel=True)
    adapter(torch.rand(1, 3, 16, 16))  # one good step, so Adam has state to roll back to
    before = [p.clone() for p in adapter.params]
    state_before = {
        i: {k: v.clone() for k, v in adapter.optimizer.state[p].items()} for i, p in enumerate(adapter.params)
    }
    lr_before = adapter.optimizer.param_groups[0]["lr"]
    original = adapter.adapt

    def poisoned(x):
        stats = original(x)
        with torch.no_grad():
            adapter.params[0].fill_(float("inf"))
        return stats

    adapter.adapt = poisoned
    with caplog.at_level(logging.WARNING):
        adapter(torch.rand(1, 3, 16, 16))
    assert "rolled back" in caplog.text and adapter.n_rolled_back == 1
    assert all(torch.equal(a, b) for a, b in zip(before, adapter.params, strict=True))
    for i, p in enumerate(adapter.params):
        assert all(torch.equal(adapter.optimizer.state[p][k], v) for k, v in state_before[i].items())
    assert adapter.optimizer.param_groups[0]["lr"] == lr_before
    adapter.adapt = original
    adapter(torch.rand(1, 3, 16, 16))
    assert all(torch.isfinite(p).all() for p in adapter.params)
    assert float(adapter.optimizer.state[adapter.params[0]]["step"]) == 2


def test_registry_and_tent():
    tent = build_adapter("tent", tiny_net(), lr=1e-3, task="fundus")
    assert isinstance(tent, Tent)
    before = [p.clone() for p in tent.params]
    tent(torch.rand(1, 3, 16, 16))
    assert any(not torch.equal(a, b) for a, b in zip(before, tent.params, strict=True))
    assert isinstance(build_adapter("grata", tiny_net(), task="fundus"), GraTa)
    with pytest.raises(ValueError, match="unknown test-time adaptation method"):
        build_adapter("magic", tiny_net())


def test_radius_scales_the_perturbation_to_the_parameters():
    adapter = GraTa(tiny_net(), radius=0.01, multilabel=True)
    grads = [torch.randn_like(p) for p in adapter.params]
    step = adapter.perturbation(grads)
    norm = lambda ts: torch.cat([t.flatten() for t in ts]).norm()  # noqa: E731
    assert torch.allclose(norm(step), 0.01 * norm([p.detach() for p in adapter.params]), rtol=1e-5)
    assert GraTa(tiny_net(), multilabel=True).perturbation(grads) is grads  # the paper's unit step
    with pytest.raises(ValueError, match="radius"):
        GraTa(tiny_net(), radius=0, multilabel=True)


def test_min_cos_skips_updates_of_disagreeing_gradients():
    x = torch.rand(1, 3, 16, 16)
    probe = GraTa(tiny_net(), beta=1e-2, seed=1, multilabel=True)
    probe(x)
    cos = float(probe.last_step.cos)
    skipping = GraTa(tiny_net(), beta=1e-2, seed=1, min_cos=min(cos + 0.1, 0.99), multilabel=True)
    before = [p.detach().clone() for p in skipping.params]
    skipping(x)
    assert float(skipping.last_step.lr) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, skipping.params, strict=True))
    assert not skipping.optimizer.state
    stepping = GraTa(tiny_net(), beta=1e-2, seed=1, min_cos=cos - 0.1, multilabel=True)
    stepping(x)
    assert not all(torch.equal(a, b) for a, b in zip(before, stepping.params, strict=True))
    with pytest.raises(ValueError, match="min_cos"):
        GraTa(tiny_net(), min_cos=1.0, multilabel=True)


def test_steps_repeat_the_update():
    x = torch.rand(1, 3, 16, 16)
    twice = GraTa(tiny_net(), beta=1e-2, seed=2, steps=2, multilabel=True)
    twice(x)
    once = GraTa(tiny_net(), beta=1e-2, seed=2, multilabel=True)
    once.adapt_batch(x)
    once.adapt_batch(x)
    for a, b in zip(once.params, twice.params, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="steps"):
        GraTa(tiny_net(), steps=0, multilabel=True)


def test_min_shift_updates_only_while_the_stream_looks_shifted():
    x = torch.rand(1, 3, 16, 16)
    probe = GraTa(
        tiny_net(), beta=1e-2, seed=3, normalization=BatchNormPolicy(prior=16), min_shift=0.0, multilabel=True
    )
    probe(x)
    shift = float(probe.last_step.stream_shift)
    assert shift > 0 and probe.last_step.cos is not None  # above the threshold: the usual update
    gated = GraTa(
        tiny_net(), beta=1e-2, seed=3, normalization=BatchNormPolicy(prior=16), min_shift=shift * 2, multilabel=True
    )
    before = [p.detach().clone() for p in gated.params]
    gated(x)
    assert float(gated.last_step.lr) == 0 and float(gated.last_step.gate_open) == 0
    assert gated.last_step.cos is None
    assert all(torch.equal(a, b) for a, b in zip(before, gated.params, strict=True))
    assert not gated.optimizer.state
    # the gate reads the stream's mean: a far-shifted batch lifts it above the threshold, a reset forgets it
    gated(x * 50 + 10)
    assert float(gated.last_step.stream_shift) > shift * 2 and gated.last_step.cos is not None
    assert float(gated.last_step.gate_open) == 1
    gated.reset()
    gated(x)
    assert float(gated.last_step.stream_shift) == pytest.approx(shift, rel=1e-5)
    with pytest.raises(ValueError, match="min_shift"):
        GraTa(tiny_net(), normalization=BatchNormPolicy(prior=16), min_shift=-1, multilabel=True)
    with pytest.raises(ValueError, match="bn_prior 0 ignores"):
        GraTa(tiny_net(), min_shift=0.2, multilabel=True)


def count_teacher_calls(adapter: GraTa) -> list[int]:
    """Wrap ``adapter.teacher`` to count its calls; returns the one-element counter."""
    calls, teacher = [0], adapter.teacher

    def counted(x):
        calls[0] += 1
        return teacher(x)

    adapter.teacher = counted
    return calls


def test_reuse_teacher_computes_the_teacher_once_per_batch():
    images = [torch.rand(1, 3, 16, 16) for _ in range(2)]
    once, once_reused = (
        GraTa(tiny_net(), beta=1e-2, seed=5, multilabel=True),
        GraTa(tiny_net(), beta=1e-2, seed=5, reuse_teacher=True, multilabel=True),
    )
    for x in images:
        once(x), once_reused(x)
    assert all(torch.equal(a, b) for a, b in zip(once.params, once_reused.params, strict=True))  # steps=1: no change
    source = tiny_net()
    expected = reference_grata(source, images, beta=1e-2, seed=5, steps=3, reuse_teacher=True)
    adapter = GraTa(copy.deepcopy(source), beta=1e-2, seed=5, steps=3, reuse_teacher=True, multilabel=True)
    recomputing = GraTa(copy.deepcopy(source), beta=1e-2, seed=5, steps=3, multilabel=True)
    calls, calls_recomputing = count_teacher_calls(adapter), count_teacher_calls(recomputing)
    for x in images:
        adapter(x), recomputing(x)
    assert (calls[0], calls_recomputing[0]) == (2, 6)  # per image: 1 teacher instead of 3
    assert adapter._batch_teacher is None  # nothing carried over to the next image
    want = dict(expected.named_parameters())
    for name, value in adapter.model.named_parameters():
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(adapter.params, recomputing.params, strict=True))


def count_forwards(adapter: GraTa) -> list[int]:
    """Count the forwards of ``adapter.model`` (a batched forward of the weak views counts once)."""
    calls = [0]
    adapter.model.register_forward_pre_hook(lambda module, inputs: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_gate_reads_the_shift_from_the_first_entropy_forward():
    torch.manual_seed(1)
    x = torch.rand(1, 3, 16, 16)
    gated = GraTa(
        tiny_net(), beta=1e-2, seed=3, normalization=BatchNormPolicy(prior=16), min_shift=0.0, steps=2, multilabel=True
    )
    separate = batch_norm_shift(copy.deepcopy(gated.model), x)  # the forward the gate used to take
    forwards = count_forwards(gated)
    gated.adapt_batch(x)
    # the same value as the separate forward's: same weights, same BatchNorm normalisation, read before each layer
    torch.testing.assert_close(gated.last_step.stream_shift, separate, rtol=1e-6, atol=1e-7)
    assert forwards[0] == 2 * 3  # per update: entropy, weak views (one batch), strong view; no gate forward
    # the updates are those of the same GraTa without the gate (its first entropy forward is the one reused)
    ungated = GraTa(tiny_net(), beta=1e-2, seed=3, normalization=BatchNormPolicy(prior=16), steps=2, multilabel=True)
    ungated.adapt_batch(x)
    assert all(torch.equal(a, b) for a, b in zip(gated.params, ungated.params, strict=True))
    # a shut gate: that one forward, no update
    shut = GraTa(
        tiny_net(),
        beta=1e-2,
        seed=3,
        normalization=BatchNormPolicy(prior=16),
        min_shift=float(separate) * 2,
        multilabel=True,
    )
    forwards = count_forwards(shut)
    shut.adapt_batch(x)
    assert forwards[0] == 1 and float(shut.last_step.gate_open) == 0 and shut.n_updated == 0
    # with the consistency loss as the auxiliary one there is no entropy forward at θ: a separate forward
    swapped = GraTa(
        tiny_net(),
        aux="consistency",
        pseudo="entropy",
        normalization=BatchNormPolicy(prior=16),
        min_shift=0.0,
        multilabel=True,
    )
    forwards = count_forwards(swapped)
    swapped.adapt_batch(x)
    assert forwards[0] == 1 + 3
    torch.testing.assert_close(swapped.last_step.stream_shift, separate, rtol=1e-6, atol=1e-7)
    # a prior that follows the stream moves only in the prediction forward: each gate reading is the separate
    # forward's at the weights and prior the batch starts from
    following = GraTa(
        tiny_net(), beta=1e-2, normalization=BatchNormPolicy(prior=16, momentum=0.2), min_shift=0.0, multilabel=True
    )
    shifts = []
    for batch in (x, x * 2 + 1):
        shifts.append(batch_norm_shift(copy.deepcopy(following.model), batch))
        following(batch)
    torch.testing.assert_close(following.last_step.stream_shift, torch.stack(shifts).mean(), rtol=1e-6, atol=1e-7)


def test_settle_updates_fewer_batches_until_the_shift_moves():
    torch.manual_seed(2)
    base = torch.rand(1, 3, 16, 16)
    similar = [base + 0.01 * torch.randn_like(base) for _ in range(8)]
    every = GraTa(tiny_net(), beta=1e-2, normalization=BatchNormPolicy(prior=16), multilabel=True)
    settling = GraTa(
        tiny_net(),
        beta=1e-2,
        normalization=BatchNormPolicy(prior=16),
        settle=2,
        settle_every=3,
        settle_tolerance=0.5,
        multilabel=True,
    )
    skipped = []
    for x in similar:
        every(x), settling(x)
        skipped.append(int(settling.last_step.settled))
    # updates on the first 2 batches, then on every 3rd: batches 1, 2, 5, 8
    assert skipped == [0, 0, 1, 1, 0, 1, 1, 0]
    assert (every.n_updated, settling.n_updated) == (8, 4)
    # a batch far from the settled shift (a new site) resumes updates on every batch
    far = base * 50 + 10
    for x in [far, far + 0.01]:
        settling(x)
        assert float(settling.last_step.settled) == 0 and settling.last_step.cos is not None
    settling(far + 0.02)
    assert float(settling.last_step.settled) == 1  # settled again after 2 updates at the new site
    settling.reset()
    settling(base)
    assert float(settling.last_step.settled) == 0 and settling.settle_schedule.updates == 1
    with pytest.raises(ValueError, match="bn_prior 0 ignores"):
        GraTa(tiny_net(), settle=2, multilabel=True)
    with pytest.raises(ValueError, match="settle_every"):
        GraTa(tiny_net(), normalization=BatchNormPolicy(prior=16), settle=2, settle_every=0, multilabel=True)


def test_settle_with_the_gate_counts_only_updates_the_gate_lets_through():
    x = torch.rand(1, 3, 16, 16)
    shut = GraTa(
        tiny_net(),
        normalization=BatchNormPolicy(prior=16),
        min_shift=1e6,
        settle=1,
        settle_tolerance=1e6,
        multilabel=True,
    )
    for _ in range(3):
        shut(x)
        assert float(shut.last_step.gate_open) == 0 and float(shut.last_step.settled) == 0
    assert shut.n_updated == 0 and not shut.settle_schedule.settled


def test_no_grad_dtype_runs_the_teacher_in_reduced_precision_and_keeps_float32_state():
    x = torch.rand(1, 3, 16, 16)
    full, reduced = (
        GraTa(tiny_net(), beta=1e-2, seed=1, multilabel=True),
        GraTa(tiny_net(), beta=1e-2, seed=1, no_grad_dtype="bfloat16", multilabel=True),
    )
    teacher_full, teacher_reduced = full.teacher(x), reduced.teacher(x)
    assert teacher_reduced.dtype == torch.float32
    torch.testing.assert_close(teacher_reduced, teacher_full, rtol=0, atol=2e-2)
    assert not torch.equal(teacher_reduced, teacher_full)
    reduced(x)
    assert all(p.dtype == torch.float32 for p in reduced.params)
    assert all(v.dtype == torch.float32 for s in reduced.optimizer.state.values() for v in s.values() if v.ndim)
    with pytest.raises(ValueError, match="no_grad_dtype"):
        GraTa(tiny_net(), no_grad_dtype="int8", multilabel=True)


def test_teacher_channels_last_gives_the_same_teacher():
    x = torch.rand(1, 3, 16, 16)
    plain, nhwc = GraTa(tiny_net(), multilabel=True), GraTa(tiny_net(), teacher_channels_last=True, multilabel=True)
    torch.testing.assert_close(nhwc.teacher(x), plain.teacher(x), rtol=0, atol=1e-6)


# --- volumes: a 3D network and a 2D network applied slice by slice ---------------------------------------------


def tiny_net_3d(out_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
        nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
        nn.Conv3d(4, out_channels, 1),
    )  # fmt: skip
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def slicewise_net(out_channels: int = 3) -> nn.Module:
    net = tiny_net(out_channels)
    net[0] = nn.Conv2d(1, 8, 3, padding=1)
    return SliceWise(net)


def reference_grata_3d(model: nn.Module, volume: torch.Tensor, beta: float, seed: int, multilabel: bool) -> nn.Module:
    """One step of Algorithm 1 on a volume (B, C, H, W, D), written out: train-mode BN, one forward per weak view
    (identity, a flip along each in-plane axis, quarter turns in the axial plane (H, W)), a strong view blurred in
    that plane, Adam's first step by hand. Nothing moves along the slice axis D."""
    model = copy.deepcopy(model).train()
    params = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in (m.weight, m.bias)]

    def prob(logits):
        return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)

    p = prob(model(volume))
    g_ent = torch.autograd.grad(-(p * torch.log(p + 1e-6)).sum(dim=1).mean(), params)
    theta = [q.detach().clone() for q in params]
    with torch.no_grad():
        for q, g in zip(params, g_ent, strict=True):
            q -= g
        views = [prob(model(volume))]
        views += [prob(model(volume.flip(a))).flip(a) for a in (-3, -2)]
        views += [torch.rot90(prob(model(torch.rot90(volume, k, (-3, -2)))), -k, (-3, -2)) for k in (1, 2, 3)]
        teacher = sum(views) / 6
    student = model(StrongIntensityAug(seed=seed, blur_axes=(-3, -2))(volume))
    if multilabel:
        consistency = F.binary_cross_entropy_with_logits(student, teacher)
    else:
        consistency = -(teacher * F.log_softmax(student, dim=1)).sum(dim=1).mean()
    g_con = torch.autograd.grad(consistency, params)
    a, b = torch.cat([g.flatten() for g in g_ent]), torch.cat([g.flatten() for g in g_con])
    lr = beta * ((a @ b) / (a.norm() * b.norm() + 1e-12) + 1) ** 2 / 4
    with torch.no_grad():
        for q, t, g in zip(params, theta, g_con, strict=True):  # Adam's first step: m̂ = g, v̂ = g²
            q.copy_(t - lr * g / (g.abs() + 1e-8))
    return model


@pytest.mark.parametrize("make_net", [tiny_net_3d, slicewise_net], ids=["3d", "slicewise_2d"])
@pytest.mark.parametrize("multilabel", [False, True], ids=["softmax", "sigmoid"])
def test_grata_step_on_a_volume_matches_algorithm_1(make_net, multilabel):
    source = make_net(3)
    torch.manual_seed(4)
    volume = torch.rand(1, 1, 8, 8, 5)
    expected = reference_grata_3d(source, volume, beta=1e-2, seed=5, multilabel=multilabel)
    adapter = build_adapter("grata", copy.deepcopy(source), task="spinalcord", beta=1e-2, seed=5, multilabel=multilabel)
    out = adapter(volume)
    assert out.shape == (1, 3, 8, 8, 5)
    assert adapter.weak_views(volume).num_views == 6
    want = dict(expected.named_parameters())
    moved = 0
    for name, value in adapter.model.named_parameters():
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(value, dict(source.named_parameters())[name])
    assert moved == 4  # weight and bias of both BatchNorm layers, nothing else


def test_grata_views_are_configurable_for_volumes():
    views = weak_views(3, flip_axes=(-3, -2), rotations=(2,))
    assert views == (((), 0, (-3, -2)), ((-3,), 0, (-3, -2)), ((-2,), 0, (-3, -2)), ((), 2, (-3, -2)))
    in_plane = StrongIntensityAug(blur_axes=(-3, -2))
    adapter = GraTa(tiny_net_3d(), views=views, strong_transform=in_plane, multilabel=False)
    volume = torch.rand(1, 1, 6, 8, 4)  # a half turn needs no square plane
    assert adapter.weak_views(volume).num_views == 4
    assert adapter(volume).shape == (1, 3, 6, 8, 4)
    quarter_turns = weak_views(3, flip_axes=(-3, -2))
    with pytest.raises(ValueError, match="square sides in their plane"):
        GraTa(tiny_net_3d(), views=quarter_turns, strong_transform=in_plane, multilabel=False)(volume)


@pytest.mark.parametrize("given", ["nothing", "views only", "strong view only"])
def test_grata_never_guesses_a_volumes_slice_axis(given):
    # the 2D defaults would flip and blur along D: a volume needs the task, or views and a strong view in its plane
    options = {
        "nothing": {},
        "views only": {"views": weak_views(3, flip_axes=(-3, -2))},
        "strong view only": {"strong_transform": StrongIntensityAug(blur_axes=(-3, -2))},
    }[given]
    adapter = GraTa(tiny_net_3d(), multilabel=False, **options)
    with pytest.raises(ValueError, match=r"GraTa on a volume \(1, 1, 8, 8, 4\).*task=.*views=weak_views"):
        adapter(torch.rand(1, 1, 8, 8, 4))


def test_grata_built_with_a_volume_task_keeps_to_its_plane():
    adapter = build_adapter("grata", tiny_net_3d(), task="spinalcord", seed=2)
    assert all(-1 not in flip and plane == (-3, -2) for flip, _, plane in adapter.views.views)
    assert adapter.strong_transform.blur_axes == (-3, -2) and not adapter.multilabel
    assert adapter(torch.rand(1, 1, 8, 8, 4)).shape == (1, 3, 8, 8, 4)
