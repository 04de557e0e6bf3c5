import copy

import pytest
import torch
from torch import nn

from monai_grata.tta import BatchNormPolicy, MedBN, Tent, build_adapter, convert_to_adaptive_batch_norm

from .test_tta_grata import tiny_net


def images(n: int) -> list[torch.Tensor]:
    torch.manual_seed(3)
    return [torch.rand(1, 3, 16, 16) * 3 + 1 for _ in range(n)]


def reference_tent(
    model: nn.Module, stream: list[torch.Tensor], lr: float
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The authors' ``forward_and_adapt`` (DequanWang/tent): forward, entropy, backward, Adam step, and the outputs of
    that forward returned; BatchNorm on batch statistics, Adam by hand, GraTa's sigmoid entropy as the loss."""
    model = copy.deepcopy(model).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.track_running_stats, m.running_mean, m.running_var = False, None, None
    params = [p for m in bns for p in (m.weight, m.bias)]
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    outputs, states = [], []
    for step, x in enumerate(stream, start=1):
        out = model(x)
        p = torch.sigmoid(out)
        loss = -(p * torch.log(p + 1e-6)).sum(dim=1).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for i, (q, g) in enumerate(zip(params, grads, strict=True)):
                m1[i] = 0.9 * m1[i] + 0.1 * g
                m2[i] = 0.999 * m2[i] + 0.001 * g * g
                m_hat, v_hat = m1[i] / (1 - 0.9**step), m2[i] / (1 - 0.999**step)
                q -= lr * m_hat / (v_hat.sqrt() + 1e-8)
        outputs.append(out.detach())
        states.append([q.detach().clone() for q in params])
    return outputs, states


def test_tent_matches_the_authors_forward_and_adapt_step_by_step():
    stream = images(3)
    source = tiny_net()
    outputs, states = reference_tent(source, stream, lr=1e-2)
    adapter = Tent(copy.deepcopy(source), lr=1e-2, multilabel=True)
    assert adapter.prediction_order == "before"
    for step, x in enumerate(stream):
        torch.testing.assert_close(adapter(x), outputs[step], rtol=1e-5, atol=1e-6, msg=f"prediction {step}")
        for p, want in zip(adapter.params, states[step], strict=True):
            torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6, msg=f"parameters {step}")


def count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_predict_before_saves_the_second_forward_and_after_predicts_with_the_update():
    x = images(1)[0]
    before, after = (
        Tent(tiny_net(), lr=1e-2, multilabel=True),
        Tent(tiny_net(), lr=1e-2, predict="after", multilabel=True),
    )
    calls_before, calls_after = count_forwards(before.model), count_forwards(after.model)
    first, second = before(x), after(x)
    assert calls_before == [1] and calls_after == [2]
    with torch.no_grad():
        torch.testing.assert_close(second, after.model(x))  # the updated weights' prediction
        torch.testing.assert_close(first, build_adapter("norm", tiny_net())(x))  # the source weights'
    assert not torch.allclose(first, second, atol=1e-5)
    assert before.logits_before is None  # nothing kept past the call
    with pytest.raises(ValueError, match="predict"):
        Tent(tiny_net(), predict="later", multilabel=True)


def test_predict_before_after_a_skipped_or_rolled_back_update():
    adapter = Tent(tiny_net(), lr=1e-2, multilabel=True)
    calls = count_forwards(adapter.model)
    bad = images(1)[0]
    bad[0, 0, 3, 3] = float("nan")
    out = adapter(bad)  # skipped: no loss forward, a fresh one predicts
    assert calls == [1] and adapter.n_skipped == 1 and out.shape == (1, 2, 16, 16)
    original = adapter.adapt

    def diverging(x):
        stats = original(x)
        with torch.no_grad():
            adapter.params[0].fill_(float("nan"))
        return stats

    adapter.adapt = diverging
    x = images(1)[0]
    out = adapter(x)
    assert adapter.n_rolled_back == 1
    with torch.no_grad():  # the loss forward's logits are the restored weights' prediction
        torch.testing.assert_close(out, adapter.model(x), rtol=0, atol=0)


@pytest.mark.parametrize("predict", ["before", "after"])
def test_a_following_prior_moves_once_per_batch_in_either_order(predict):
    net = tiny_net()
    source_mean = net[1].running_mean.clone()
    adapter = Tent(
        net, lr=1e-2, normalization=BatchNormPolicy(prior=4.0, momentum=0.5), predict=predict, multilabel=True
    )
    x = images(1)[0]
    adapter(x)
    with torch.no_grad():  # the first BatchNorm sees the (not adapted) first convolution's output
        expected = 0.5 * source_mean + 0.5 * net[0](x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(net[1].running_mean, expected, rtol=1e-5, atol=1e-5)
    adapter.adapt_batch(x)  # outside a prediction (an evaluator's handler): the prior stays
    torch.testing.assert_close(net[1].running_mean, expected, rtol=1e-5, atol=1e-5)


def test_medbn_returns_the_median_normalised_prediction_before_its_update():
    net = tiny_net()
    x = images(1)[0]
    with torch.no_grad():
        expected = convert_to_adaptive_batch_norm(copy.deepcopy(net), BatchNormPolicy(statistic="median"))(x)
    adapter = MedBN(net, lr=1e-2, multilabel=True)
    assert adapter.prediction_order == "before"
    torch.testing.assert_close(adapter(x), expected)
    after = MedBN(tiny_net(), lr=1e-2, predict="after", multilabel=True)
    got = after(x)
    with torch.no_grad():
        torch.testing.assert_close(got, after.model(x))
    assert not torch.allclose(got, expected, atol=1e-5)
