import copy
import math

import pytest
import torch
from torch import nn

from monai_grata.tta import (
    AdaptiveBatchNorm,
    BatchNormPolicy,
    adapter_defaults,
    batch_norm_shift,
    batch_statistics_weight,
    build_adapter,
    convert_to_adaptive_batch_norm,
    convert_to_batch_norm,
    frozen_statistics,
    normalisation_statistics,
    normalization,
    per_group_batch_norm,
    track_test_statistics,
)
from monai_grata.tta.normalization import adaptive_batch_norms, source_divergence

from .test_tta_grata import tiny_net


def adaptive(net: nn.Module, **policy) -> nn.Module:
    """A copy of ``net`` whose BatchNorm layers normalise as ``BatchNormPolicy(**policy)`` says."""
    return convert_to_adaptive_batch_norm(copy.deepcopy(net), BatchNormPolicy(**policy))


@torch.no_grad()
def mixed_statistics_reference(net: nn.Module, x: torch.Tensor, prior: float) -> torch.Tensor:
    """Each BatchNorm in eval mode with running statistics set to the mixture, one layer at a time."""
    net = copy.deepcopy(net).eval()
    w = batch_statistics_weight(x.shape[0], prior)
    out = x
    for layer in net:
        if isinstance(layer, nn.BatchNorm2d):
            var, mean = torch.var_mean(out, dim=(0, 2, 3), correction=0)
            layer.running_mean.copy_(w * mean + (1 - w) * layer.running_mean)
            layer.running_var.copy_(w * var + (1 - w) * layer.running_var)
        out = layer(out)
    return out


def test_the_swap_round_trip_keeps_parameters_buffers_and_output():
    net = tiny_net()
    keys, params = list(net.state_dict()), list(net.parameters())
    buffers = [net[1].running_mean, net[1].running_var, net[1].num_batches_tracked]
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = net.eval()(x)
        swapped = convert_to_adaptive_batch_norm(net, BatchNormPolicy(prior=math.inf))
        assert swapped is net and isinstance(net[1], AdaptiveBatchNorm) and isinstance(net[4], AdaptiveBatchNorm)
        assert list(net.state_dict()) == keys and all(a is b for a, b in zip(net.parameters(), params, strict=True))
        kept = (net[1].running_mean, net[1].running_var, net[1].num_batches_tracked)
        assert all(a is b for a, b in zip(kept, buffers, strict=True))
        torch.testing.assert_close(net.train()(x), expected, rtol=0, atol=0)  # source statistics in either mode
        net[1].weight.mul_(2)  # an adapted parameter
        adapted = net(x)
        convert_to_batch_norm(net)
    assert type(net[1]) is nn.BatchNorm2d and net[1].momentum == 0.1 and net[1].training
    assert list(net.state_dict()) == keys and all(a is b for a, b in zip(net.parameters(), params, strict=True))
    assert net[1].running_mean is buffers[0]
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), adapted, rtol=0, atol=0)
    assert net.load_state_dict(tiny_net().state_dict()) is not None  # a plain checkpoint loads into it


def test_batch_statistics_are_train_mode_batch_norm_in_either_mode():
    net, x = tiny_net(), torch.rand(2, 3, 16, 16) * 3 + 1
    with torch.no_grad():
        expected = copy.deepcopy(net).train()(x)
        torch.testing.assert_close(adaptive(net).eval()(x), expected)
    assert torch.equal(adaptive(net).state_dict()["1.running_mean"], net[1].running_mean)  # kept, not deleted


@pytest.mark.parametrize("prior", [0.5, 4.0, 64.0])
def test_a_source_prior_mixes_test_and_source_statistics(prior):
    x = torch.rand(2, 3, 16, 16) * 3 + 1
    net = tiny_net()
    expected = mixed_statistics_reference(net, x, prior)
    with torch.no_grad():
        out = adaptive(net, prior=prior).train()(x)  # train or eval mode alike
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_prior_limits_are_eval_and_train_mode():
    x = torch.rand(1, 3, 16, 16) * 3 + 1
    net = tiny_net()
    with torch.no_grad():
        torch.testing.assert_close(adaptive(net, prior=math.inf)(x), net.eval()(x))
        tiny_prior = adaptive(net, prior=1e-9)(x)
        torch.testing.assert_close(tiny_prior, copy.deepcopy(net).train()(x), rtol=1e-4, atol=1e-4)
    assert batch_statistics_weight(1, 0.0) == 1.0 and batch_statistics_weight(1, math.inf) == 0.0


@pytest.mark.parametrize("policy", [{}, {"prior": 4.0}, {"statistic": "median"}, {"prior": 2.0, "statistic": "median"}])
def test_per_group_statistics_equal_separate_forwards(policy):
    views = [torch.rand(1, 3, 16, 16) * (i + 1) for i in range(3)]
    net = adaptive(tiny_net(), **policy)
    with torch.no_grad():
        separate = torch.cat([net(v) for v in views])
        with per_group_batch_norm(net, 3):
            assert net[1].groups == 3
            batched = net(torch.cat(views))
        after = net(views[0])
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, separate[:1])  # the context restores one group
    assert net[1].groups == 1
    with pytest.raises(ValueError, match="cannot be split"), per_group_batch_norm(net, 2):
        net(torch.cat(views))
    with pytest.raises(ValueError, match="plain"), per_group_batch_norm(tiny_net(), 2):
        pass


def test_median_statistics_centre_on_the_median():
    x = torch.rand(2, 3, 16, 16) * 3 + 1
    net = adaptive(tiny_net(), statistic="median")
    h = net[0](x)
    centre = h.transpose(0, 1).reshape(8, -1).median(dim=1).values
    mean, var = net[1].statistics(h)
    torch.testing.assert_close(mean, centre)
    torch.testing.assert_close(var, (h - centre.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3)))


def test_tracking_moves_the_prior_only_inside_the_context():
    net = adaptive(tiny_net(), prior=4.0, momentum=0.5)
    bn, x = net[1], torch.rand(1, 3, 16, 16) * 3 + 1
    source = bn.running_mean.clone()
    with torch.no_grad():
        net(x)
        assert torch.equal(bn.running_mean, source)
        with track_test_statistics(net):
            assert bn.tracking
            net(x)
    assert not bn.tracking
    expected = 0.5 * source + 0.5 * net[0](x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected.detach(), rtol=1e-5, atol=1e-5)
    followed = adaptive(tiny_net(), prior=math.inf, momentum=0.5)  # the source statistics themselves follow
    with torch.no_grad(), track_test_statistics(followed):
        followed(x)
    torch.testing.assert_close(followed[1].running_mean, expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", [{}, {"prior": 3.0}, {"prior": math.inf}, {"prior": 2.0, "statistic": "median"}])
def test_frozen_statistics_reproduce_the_recorded_forward(policy):
    net = adaptive(tiny_net(), **policy)
    x, other = torch.rand(4, 3, 8, 8), torch.rand(2, 3, 8, 8) * 5
    with torch.no_grad():
        expected = net(x)
        stats = normalisation_statistics(net, x)
        with frozen_statistics(net, stats):
            assert net[1].frozen is not None
            torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(net(other)[:1], net(other[:1]), rtol=0, atol=1e-5)
        assert net[1].frozen is None
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


@torch.no_grad()
def test_the_first_layers_take_their_own_prior_and_the_others_keep_the_policys():
    x = torch.rand(1, 3, 16, 16) * 3 + 1
    net = tiny_net()
    reference = copy.deepcopy(net).eval()
    reference[1].train()  # the first BatchNorm on the batch's own statistics, the second on the source's
    expected = reference(x)
    adapted = adaptive(net, prior=math.inf, first_layers=1)
    assert adapted[1].policy == BatchNormPolicy(prior=0.0) and adapted[4].policy == BatchNormPolicy(prior=math.inf)
    torch.testing.assert_close(adapted(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(adapted[1].running_mean, net[1].running_mean)  # the source statistics are not moved
    mixed = adaptive(net, prior=4.0, momentum=0.1, first_layers=1, first_prior=2.0)
    assert mixed[1].policy == BatchNormPolicy(prior=2.0) and mixed[4].policy == BatchNormPolicy(4.0, 0.1)
    first_mixed = copy.deepcopy(net)
    first_mixed[4] = adaptive(nn.Sequential(net[4]), prior=math.inf)[0]  # the reference: one layer at a time
    first_mixed[1] = adaptive(nn.Sequential(net[1]), prior=2.0)[0]
    torch.testing.assert_close(adaptive(net, prior=math.inf, first_layers=1, first_prior=2.0)(x), first_mixed(x))
    assert build_adapter("norm", copy.deepcopy(net), bn_prior=math.inf, bn_first_layers=1).normalization == (
        BatchNormPolicy(prior=math.inf, first_layers=1)
    )
    torch.testing.assert_close(build_adapter("norm", net, bn_prior=math.inf, bn_first_layers=1)(x), expected)
    with pytest.raises(ValueError, match="first_layers=3, but Sequential has 2 BatchNorm layers"):
        adaptive(net, first_layers=3)
    for bad in (-1, 0.5):
        with pytest.raises(ValueError, match="bn_first_layers"):
            BatchNormPolicy(first_layers=bad)
    with pytest.raises(ValueError, match="bn_first_prior"):
        BatchNormPolicy(first_layers=1, first_prior=-1.0)


@torch.no_grad()
def test_the_gate_keeps_the_source_statistics_for_a_batch_near_the_source():
    net = tiny_net()
    in_domain = 0.5 + 0.1 * torch.randn(9, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    var, mean = torch.var_mean(net[0](in_domain[1:]), dim=(0, 2, 3), correction=0)
    net[1].running_mean.copy_(mean), net[1].running_var.copy_(var)  # the first layer's source: in-domain images
    near, far = in_domain[:1], torch.rand(1, 3, 16, 16) * 3 + 1
    batch_statistics, source = adaptive(net, prior=0.0), copy.deepcopy(net).eval()
    divergence = {}
    for name, x in (("near", near), ("far", far)):
        h = net[0](x)
        var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=0)
        divergence[name] = float(
            source_divergence(mean, var, net[1].running_mean, net[1].running_var, net[1].eps).mean()
        )
    threshold = (divergence["near"] + divergence["far"]) / 2
    assert divergence["near"] < threshold < divergence["far"]
    gated = adaptive(net, prior=math.inf, first_layers=1, first_min_shift=threshold)
    assert gated[1].policy == BatchNormPolicy(prior=0.0, min_shift=threshold)
    stem = adaptive(net, prior=math.inf, first_layers=1)
    torch.testing.assert_close(gated(far), stem(far), rtol=0, atol=1e-5)  # far: the stem on the image's statistics
    torch.testing.assert_close(gated(near), source(near), rtol=0, atol=1e-5)  # near: the source model
    both = torch.cat([near, far])  # a batch of views, each group decided by its own statistics
    with per_group_batch_norm(gated, 2):
        grouped = gated(both)
    torch.testing.assert_close(grouped[:1], source(near), rtol=0, atol=1e-5)
    torch.testing.assert_close(grouped[1:], stem(far), rtol=0, atol=1e-5)
    assert not torch.allclose(batch_statistics(near), source(near), atol=1e-3)  # the gate made the difference
    torch.testing.assert_close(
        build_adapter("norm", copy.deepcopy(net), bn_prior=math.inf, bn_first_layers=1,
                      bn_first_min_shift=threshold)(near), source(near), rtol=0, atol=1e-5,
    )  # fmt: skip
    with pytest.raises(ValueError, match="bn_first_min_shift"):
        BatchNormPolicy(first_layers=1, first_prior=math.inf, first_min_shift=0.1)
    with pytest.raises(ValueError, match="bn_min_shift"):
        BatchNormPolicy(min_shift=-0.1)
    with pytest.raises(ValueError, match="bn_min_shift"):
        BatchNormPolicy(prior=math.inf, min_shift=0.1)


@torch.no_grad()
def test_the_site_gate_opens_for_every_image_once_the_stream_median_is_shifted():
    net = tiny_net()
    in_domain = 0.5 + 0.1 * torch.randn(9, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    var, mean = torch.var_mean(net[0](in_domain[1:]), dim=(0, 2, 3), correction=0)
    net[1].running_mean.copy_(mean), net[1].running_var.copy_(var)
    near, far = in_domain[:1], torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 3 + 1
    h = net[0](far)
    far_var, far_mean = torch.var_mean(h, dim=(0, 2, 3), correction=0)
    far_divergence = float(source_divergence(far_mean, far_var, mean, var, net[1].eps).mean())
    policy = {"prior": math.inf, "first_layers": 1, "first_min_shift": far_divergence * 2, "site_min_batches": 3}
    source, stem = copy.deepcopy(net).eval(), adaptive(net, prior=math.inf, first_layers=1)
    shifted_site = build_adapter("norm", copy.deepcopy(net), normalization=BatchNormPolicy(
        **policy, first_site_min_shift=far_divergence / 2))  # fmt: skip
    layer = adaptive_batch_norms(shifted_site.model)[0]
    assert layer.policy.site_min_shift == far_divergence / 2
    for _ in range(2):  # the per-image gate is shut for far and the site gate waits for 3 images
        torch.testing.assert_close(shifted_site(far), source(far), rtol=0, atol=1e-5)
    torch.testing.assert_close(shifted_site(far), stem(far), rtol=0, atol=1e-5)  # median of 3 far ones: open
    torch.testing.assert_close(shifted_site(near), stem(near), rtol=0, atol=1e-5)  # open for a near one too
    assert layer.stream_batches == 4 and len(layer.recorded_divergences()) == 4  # one record per prediction
    shifted_site.model(near)  # a forward outside the adapter's prediction records nothing
    assert layer.stream_batches == 4
    shifted_site.reset()  # a new stream: the record is gone
    assert layer.stream_batches == 0 and len(layer.recorded_divergences()) == 0
    torch.testing.assert_close(shifted_site(far), source(far), rtol=0, atol=1e-5)
    unshifted_site = build_adapter("norm", copy.deepcopy(net), normalization=BatchNormPolicy(
        **policy, first_site_min_shift=far_divergence * 4))  # fmt: skip
    for _ in range(4):  # the stream's median stays below the site gate
        torch.testing.assert_close(unshifted_site(far), source(far), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"bn_first_site_min_shift .*\(bn_first_min_shift > 0\)"):
        BatchNormPolicy(first_layers=1, first_site_min_shift=0.1)
    with pytest.raises(ValueError, match="bn_site_min_shift"):
        BatchNormPolicy(prior=4.0, min_shift=0.1, site_min_shift=-1.0)
    with pytest.raises(ValueError, match="site_min_batches"):
        BatchNormPolicy(site_min_batches=0)


def test_the_site_gate_judges_the_latest_window_of_the_stream(monkeypatch):
    monkeypatch.setattr(normalization, "SITE_WINDOW", 4)
    policy = BatchNormPolicy(prior=math.inf, first_layers=1, first_min_shift=10.0, first_site_min_shift=1.0,
                             site_min_batches=1)  # fmt: skip
    layer = adaptive_batch_norms(build_adapter("norm", tiny_net(), normalization=policy).model)[0]
    layer.tracking = True
    opened = [bool(layer._site_shifted(torch.tensor(value))) for value in (5.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0)]
    # the whole stream's (lower) median stays 5; the latest four's falls to 0 with the second near batch
    assert opened == [True, True, True, True, True, False, False]
    assert sorted(layer.recorded_divergences().tolist()) == [0.0, 0.0, 0.0, 5.0]
    assert "stream_record" not in layer.state_dict()  # a stream's record is no part of the model


def test_the_shift_reads_the_public_running_statistics():
    net, x = tiny_net(), torch.rand(1, 3, 16, 16) * 3 + 1
    assert batch_norm_shift(adaptive(net, prior=math.inf), x) == batch_norm_shift(net.eval(), x)


def test_bad_policies_are_refused_with_the_problem_named():
    with pytest.raises(ValueError, match="bn_prior"):
        BatchNormPolicy(prior=-1)
    with pytest.raises(ValueError, match="bn_prior"):
        BatchNormPolicy(prior=math.nan)
    with pytest.raises(ValueError, match="bn_momentum"):
        BatchNormPolicy(prior=4.0, momentum=1.0)
    with pytest.raises(ValueError, match="needs a source prior"):
        BatchNormPolicy(momentum=0.1)
    with pytest.raises(ValueError, match="statistic"):
        BatchNormPolicy(statistic="mode")
    with pytest.raises(ValueError, match="finite prior"):
        BatchNormPolicy(prior=math.inf, statistic="median")
    unkept = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="no running statistics"):
        convert_to_adaptive_batch_norm(unkept, BatchNormPolicy(prior=4.0))
    with pytest.raises(ValueError, match="inside a network"):
        convert_to_adaptive_batch_norm(nn.BatchNorm2d(2))
    with pytest.raises(TypeError, match="BatchNormPolicy"):
        build_adapter("tent", tiny_net(), normalization={"prior": 4.0}, task="fundus")


@pytest.mark.parametrize("method", ["tent", "grata"])
def test_adapters_with_a_prior_update_and_reset(method):
    net = tiny_net()
    source = copy.deepcopy(net.state_dict())
    adapter = build_adapter(method, net, bn_prior=8.0, task="fundus")
    assert adapter.normalization == BatchNormPolicy(prior=8.0)
    x = torch.rand(1, 3, 16, 16) * 3 + 1
    adapter(x)
    moved = [not torch.equal(net.state_dict()[k], v) for k, v in source.items() if k.endswith(("weight", "bias"))]
    assert any(moved)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in source.items() if "running" in k)
    adapter.reset()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in source.items())


def test_the_flat_options_make_the_adapters_policy():
    assert build_adapter("medbn", tiny_net(), bn_prior=4.0, task="fundus").normalization == BatchNormPolicy(
        4.0, 0.0, "median"
    )
    assert build_adapter("diga", tiny_net(), bn_momentum=0.1, task="fundus").normalization == BatchNormPolicy(4.0, 0.1)
    assert build_adapter("norm", tiny_net()).normalization == BatchNormPolicy()
    assert adapter_defaults("diga")["bn_prior"] == 4.0 and adapter_defaults("grata")["bn_momentum"] == 0.0
    assert "normalization" not in adapter_defaults("tent") and "bn_prior" not in adapter_defaults("dua")
    with pytest.raises(ValueError, match="takes no BatchNorm policy"):
        build_adapter("dua", tiny_net(), bn_prior=4.0)
    with pytest.raises(ValueError, match="not both"):
        build_adapter("tent", tiny_net(), bn_prior=4.0, normalization=BatchNormPolicy(), task="fundus")


def test_norm_with_a_prior_matches_the_reference_and_rejects_a_negative_prior():
    x = torch.rand(1, 3, 16, 16) * 3 + 1
    net = tiny_net()
    expected = mixed_statistics_reference(net, x, 16.0)
    out = build_adapter("norm", copy.deepcopy(net), bn_prior=16.0)(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bn_prior"):
        build_adapter("norm", net, bn_prior=-1)


def test_momentum_makes_the_prior_follow_the_stream_only_when_predicting():
    net = tiny_net()
    source = copy.deepcopy(net.state_dict())
    adapter = build_adapter("norm", net, bn_prior=4.0, bn_momentum=0.5)
    bn = net[1]
    x = torch.rand(1, 3, 16, 16) * 3 + 1
    with torch.no_grad():
        net(x)  # a forward outside the adapter's prediction leaves the prior alone
    assert torch.equal(bn.running_mean, source["1.running_mean"])
    adapter(x)
    expected = 0.5 * source["1.running_mean"] + 0.5 * net[0](x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected.detach(), rtol=1e-5, atol=1e-5)
    adapter.reset()
    assert torch.equal(bn.running_mean, source["1.running_mean"])
    with pytest.raises(ValueError, match="needs a source prior"):
        build_adapter("norm", tiny_net(), bn_momentum=0.1)
