import copy

import pytest
import torch
from torch import nn

from monai_grata.tta import DomainAdaptor, build_adapter, normalisation_statistics
from monai_grata.tta.domainadaptor import AdaMixBatchNorm, ada_mix_batch_norm

from .test_tta_grata import tiny_net


def toy_net(out_channels: int = 3) -> nn.Module:
    return tiny_net(out_channels).double()


def batch(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 8, 8, generator=generator) * 3 + 1).double()  # far from the source statistics


# --- the authors' rule written out (AdaMixBN with Transform=True, GEM-T, one plain SGD step, prediction) ----------


def authors_lambda(h, src_mu, src_var, cur_mu, cur_var):
    ins_mu, ins_std = h.mean((2, 3), keepdim=True), h.std((2, 3), keepdim=True)
    it = ((ins_mu - cur_mu) ** 2).mean(1, keepdim=True) + ((ins_std - cur_var.sqrt()) ** 2).mean(1, keepdim=True)
    is_ = ((ins_mu - src_mu) ** 2).mean(1, keepdim=True) + ((ins_std - src_var.sqrt()) ** 2).mean(1, keepdim=True)
    st = ((cur_mu - src_mu) ** 2).mean(1)[None] + ((cur_var.sqrt() - src_var.sqrt()) ** 2).mean(1)[None]
    return torch.clip(1 - st / (st + is_ + it), min=0, max=1).mean(0, keepdim=True)


def authors_forward(net, x, rectify, lambdas=None, mix_lambda=None):
    """Train-mode forward of ``net`` with every BatchNorm an AdaMixBN; ``rectify``: the first forward of a batch."""
    h = x
    for layer in net:
        if not isinstance(layer, nn.BatchNorm2d):
            h = layer(h)
            continue
        c = h.shape[1]
        src_mu, src_var = layer.running_mean.view(1, c, 1, 1), layer.running_var.view(1, c, 1, 1)
        cur_mu, cur_var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), keepdim=True)
        if rectify:
            lam = authors_lambda(h, src_mu, src_var, cur_mu, cur_var) if mix_lambda is None else mix_lambda
            gamma = (cur_var + layer.eps).sqrt() / (lam * src_var + (1 - lam) * cur_var + layer.eps).sqrt()
            gamma = gamma * layer.weight.view(1, c, 1, 1)
            beta = lam * (cur_mu - src_mu) / (cur_var + layer.eps).sqrt() * gamma + layer.bias.view(1, c, 1, 1)
            layer.weight.data, layer.bias.data = gamma.data.view(-1), beta.data.view(-1)
            if lambdas is not None:
                lambdas.append(float(lam))
        inv_std = 1 / (cur_var + layer.eps).sqrt()
        h = (h - cur_mu) * (inv_std * layer.weight.view(1, c, 1, 1)) + layer.bias.view(1, c, 1, 1)
    return h


def authors_gem_t(logits):
    logits = logits - logits.mean(1, keepdim=True).detach()
    t = logits.std(1, keepdim=True).detach() * 2
    prob = (logits / t).softmax(1)
    return -((prob * prob.log()).sum(1) * (t**2)).mean()


def authors_step(net, x, lr=1e-3, multilabel=False, mix_lambda=None):
    """(BatchNorm weights and biases after the step, the prediction, the lambdas): DomainAdaptor on one batch."""
    net = copy.deepcopy(net)
    params = [p for m in net if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]
    lambdas = []
    logits = authors_forward(net, x, rectify=True, lambdas=lambdas, mix_lambda=mix_lambda)
    if multilabel:
        loss = sum(authors_gem_t(torch.stack([-z / 2, z / 2], 1)) for z in logits.unbind(1))
    else:
        loss = authors_gem_t(logits)
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
        prediction = authors_forward(net, x, rectify=False)
    return [p.detach() for p in params], prediction, lambdas


@pytest.mark.parametrize("multilabel", [False, True], ids=["softmax", "sigmoid"])
def test_matches_the_authors_rule_on_a_stream_of_batches(multilabel):
    source = toy_net(3)
    adapter = DomainAdaptor(copy.deepcopy(source), lr=0.05, multilabel=multilabel)
    for n, seed in ((1, 0), (3, 1), (1, 2)):  # batch size 3: lambda per instance, GEM-T's batch broadcast
        x = batch(n, seed)
        params, expected, lambdas = authors_step(source, x, lr=0.05, multilabel=multilabel)
        out = adapter(x)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
        for ours, theirs in zip(adapter.params, params, strict=True):
            torch.testing.assert_close(ours.detach(), theirs, rtol=1e-9, atol=1e-9)
        assert float(adapter.last_step.mix_lambda) == pytest.approx(sum(lambdas) / len(lambdas))
        if n == 1:
            assert lambdas == pytest.approx([0.5, 0.5])
        else:
            assert all(0 < lam < 1 for lam in lambdas) and lambdas != pytest.approx([0.5, 0.5])
    assert not torch.equal(adapter.params[0], source[1].weight)


def test_a_fixed_lambda_and_the_rectified_forward_equals_the_mixture(monkeypatch):
    monkeypatch.setattr(DomainAdaptor, "MIX_LAMBDA", 0.3)
    source = toy_net(3)
    x = batch(2, 5)
    params, expected, _ = authors_step(source, x, mix_lambda=0.3)
    adapter = DomainAdaptor(copy.deepcopy(source), multilabel=False)
    torch.testing.assert_close(adapter(x), expected, rtol=1e-9, atol=1e-9)
    assert float(adapter.last_step.mix_lambda) == pytest.approx(0.3)
    # the first forward of a batch normalises with 0.3 source + 0.7 batch statistics and the source affine
    adapter.reset()
    with torch.no_grad():
        rectifying = adapter.model(x)
        h = x
        for layer in source:
            if isinstance(layer, nn.BatchNorm2d):
                var, mean = torch.var_mean(h, dim=(0, 2, 3))
                mean, var = 0.3 * layer.running_mean + 0.7 * mean, 0.3 * layer.running_var + 0.7 * var
                h = nn.functional.batch_norm(h, mean, var, layer.weight, layer.bias, False, 0.0, layer.eps)
            else:
                h = layer(h)
    torch.testing.assert_close(rectifying, h, rtol=1e-9, atol=1e-9)


def test_every_batch_starts_from_the_source_and_the_prediction_follows_the_step():
    source = toy_net(3)
    adapter = build_adapter("domainadaptor", copy.deepcopy(source), multilabel=False)
    x, y = batch(1, 0), batch(1, 1)
    first = adapter(x)
    adapter(y)
    torch.testing.assert_close(adapter(x), first, rtol=0, atol=0)
    no_step = DomainAdaptor(copy.deepcopy(source), lr=0.0, multilabel=False)(x)
    assert not torch.allclose(first, no_step)
    continual = DomainAdaptor(copy.deepcopy(source), episodic=False, multilabel=False)
    continual(y)
    assert not torch.allclose(continual(x), first)


def test_a_rolled_back_step_predicts_with_adamixbn_at_the_restored_weights():
    source = toy_net(3)
    x = batch(1, 0)
    _, expected, _ = authors_step(source, x, lr=0.0)
    adapter = DomainAdaptor(copy.deepcopy(source), lr=float("inf"), multilabel=False)
    out = adapter(x)
    assert adapter.last_step.rolled_back and adapter.n_rolled_back == 1
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_layers_read_as_batch_statistics_batch_norms():
    net = toy_net(3)
    layers = ada_mix_batch_norm(net)
    assert len(layers) == 2 and all(isinstance(m, AdaMixBatchNorm) and m.running_mean is None for m in layers)
    assert {"1.weight", "1.bias", "1.source_mean", "1.source_var"} <= set(net.state_dict())
    x = batch(2, 3)
    statistics = normalisation_statistics(net, x)  # what PatchAdaptation freezes: the batch's own statistics
    var, mean = torch.var_mean(net[0](x), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(statistics["1"], (mean, var))


def test_bad_networks_and_options_are_refused():
    with pytest.raises(ValueError, match="has none"):
        DomainAdaptor(nn.Sequential(nn.Conv2d(3, 2, 1), nn.GroupNorm(1, 2)), multilabel=True)
    with pytest.raises(ValueError, match="running statistics"):
        DomainAdaptor(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)), multilabel=True)
    with pytest.raises(ValueError, match="affine"):
        DomainAdaptor(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, affine=False)), multilabel=True)
    with pytest.raises(ValueError, match="mix_lambda"):
        AdaMixBatchNorm(nn.BatchNorm2d(2), mix_lambda=1.5)
    with pytest.raises(ValueError, match="spatial"):
        DomainAdaptor(toy_net(), multilabel=False)(batch(2, 0)[:, :, :1, :1])
