import copy
import math

import pytest
import torch
from torch import nn

from monai_grata.tta import batch_statistics_weight, build_adapter, per_group_batch_norm, source_prior_batch_norm

from .test_tta_grata import tiny_net


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


@pytest.mark.parametrize("prior", [0.5, 4.0, 64.0])
def test_source_prior_mixes_test_and_source_statistics(prior):
    x = torch.rand(2, 3, 16, 16) * 3 + 1
    net = tiny_net()
    expected = mixed_statistics_reference(net, x, prior)
    with torch.no_grad():
        out = source_prior_batch_norm(copy.deepcopy(net), prior).train()(x)  # train or eval mode alike
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_source_prior_limits_are_eval_and_train_mode():
    x = torch.rand(1, 3, 16, 16) * 3 + 1
    net = tiny_net()
    with torch.no_grad():
        torch.testing.assert_close(source_prior_batch_norm(copy.deepcopy(net), math.inf)(x), net.eval()(x))
        tiny_prior = source_prior_batch_norm(copy.deepcopy(net), 1e-9)(x)
        torch.testing.assert_close(tiny_prior, copy.deepcopy(net).train()(x), rtol=1e-4, atol=1e-4)
    assert batch_statistics_weight(1, 0.0) == 1.0 and batch_statistics_weight(1, math.inf) == 0.0
    with pytest.raises(ValueError, match="positive"):
        source_prior_batch_norm(net, 0)


def test_per_group_statistics_with_a_prior_equal_separate_forwards():
    views = [torch.rand(1, 3, 16, 16) * (i + 1) for i in range(3)]
    net = source_prior_batch_norm(tiny_net(), 4.0)
    with torch.no_grad():
        separate = torch.cat([net(v) for v in views])
        with per_group_batch_norm(net, 3):
            batched = net(torch.cat(views))
        after = net(views[0])
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, separate[:1])  # the context restores the prior forward


@pytest.mark.parametrize("method", ["tent", "grata"])
def test_adapters_with_a_prior_update_and_reset(method):
    net = tiny_net()
    source = copy.deepcopy(net.state_dict())
    adapter = build_adapter(method, net, bn_prior=8.0)
    x = torch.rand(1, 3, 16, 16) * 3 + 1
    adapter(x)
    moved = [not torch.equal(net.state_dict()[k], v) for k, v in source.items() if k.endswith(("weight", "bias"))]
    assert any(moved)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in source.items() if "running" in k)
    adapter.reset()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in source.items())


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
