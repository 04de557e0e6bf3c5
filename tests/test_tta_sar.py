import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monai_grata.tta import SAR, build_adapter

from .test_tta_grata import tiny_net


def sharp_net() -> nn.Module:
    """tiny_net with confident predictions: most pixels pass SAR's filter, the loss average stays above the reset."""
    net = tiny_net()
    with torch.no_grad():
        net[-1].weight.mul_(20)
    return net


def sar_with_reset(reset_constant: float) -> type[SAR]:
    """SAR with another :attr:`~monai_grata.tta.SAR.RESET_CONSTANT` (a fraction of ln K)."""
    return type("SARWithReset", (SAR,), {"RESET_CONSTANT": reset_constant})


def images(n: int) -> list[torch.Tensor]:
    torch.manual_seed(3)
    return [torch.rand(1, 3, 16, 16) * 3 + 1 for _ in range(n)]


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))  # log p, log(1 - p), finite when saturated


def reference_sar(
    model: nn.Module, stream: list[torch.Tensor], lr: float, reset: float, margins: list[float]
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], list[bool]]:
    """The authors' ``forward_and_adapt_sar`` and ``SAR.forward`` written out for sigmoid pixels (K = 2): SAM with
    rho 0.05 and SGD with momentum 0.9 by hand; thresholds margin · ln 2 and reset · ln 2."""
    model = copy.deepcopy(model).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:  # the authors' configure_model: batch statistics in train and eval mode
        m.track_running_stats, m.running_mean, m.running_var = False, None, None
    params = [p for m in bns for p in (m.weight, m.bias)]
    source = [p.detach().clone() for p in params]
    buffers, ema = None, None
    outputs, states, resets = [], [], []
    for x, margin in zip(stream, margins, strict=True):
        outputs_x = model(x)
        entropy = binary_entropy(outputs_x)
        filter_1 = entropy.detach() < margin * math.log(2)
        loss = entropy[filter_1].mean()  # NaN without any kept pixel; its gradient is then zero
        grads = torch.autograd.grad(loss, params)
        norm = torch.stack([g.norm() for g in grads]).norm()
        old = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(g * (0.05 / (norm + 1e-12)))
        entropy_2 = binary_entropy(model(x))[filter_1]
        loss_2 = entropy_2[entropy_2.detach() < margin * math.log(2)].mean()
        if not math.isnan(loss_2.item()):
            ema = loss_2.item() if ema is None else 0.9 * ema + 0.1 * loss_2.item()
        grads_2 = torch.autograd.grad(loss_2, params)  # zero without any kept pixel
        with torch.no_grad():
            if buffers is None:
                buffers = [g.clone() for g in grads_2]
            else:
                buffers = [0.9 * b + g for b, g in zip(buffers, grads_2, strict=True)]
            for p, o, b in zip(params, old, buffers, strict=True):
                p.copy_(o - lr * b)
        resets.append(ema is not None and ema < reset * math.log(2))
        if resets[-1]:  # model and optimizer back to the source; SAR.forward assigns the average again
            with torch.no_grad():
                for p, s in zip(params, source, strict=True):
                    p.copy_(s)
            buffers = None
        outputs.append(outputs_x.detach())
        states.append([p.detach().clone() for p in params])
    return outputs, states, resets


@pytest.mark.parametrize("reset", [SAR.RESET_CONSTANT, 0.086, 10.0], ids=["default", "late", "always"])
def test_sar_matches_the_authors_update_step_by_step(reset):
    stream = images(6)
    margins = [0.4, 0.4, 1e-30, 0.4, 0.4, 0.4]  # the third image keeps no pixel: a momentum-only step
    source = sharp_net()
    outputs, states, resets = reference_sar(source, stream, lr=1.0, reset=reset, margins=margins)
    adapter = sar_with_reset(reset)(copy.deepcopy(source), lr=1.0, multilabel=True)
    for step, (x, margin) in enumerate(zip(stream, margins, strict=True)):
        adapter.margin = margin
        got = adapter(x)
        torch.testing.assert_close(got, outputs[step], rtol=1e-5, atol=1e-5, msg=f"prediction {step}")
        for p, want in zip(adapter.params, states[step], strict=True):
            torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6, msg=f"parameters {step}")
        assert bool(adapter.last_step.reset) == resets[step]
        assert (float(adapter.last_step.kept) == 0) == (step == 2)
    expected_resets = {SAR.RESET_CONSTANT: [False] * 6, 0.086: [False] * 4 + [True] * 2, 10.0: [True] * 6}
    # "late": the average falls below the threshold at the fifth image; kept through the reset, it is still below
    # after the sixth, computed on the source model
    assert resets == expected_resets[reset]


def test_sar_adapts_where_the_unscaled_reset_kept_it_at_batch_statistics():
    stream = images(4)
    norm = build_adapter("norm", sharp_net())
    sar = SAR(sharp_net(), lr=0.1, multilabel=True)
    unscaled = sar_with_reset(0.2 / math.log(2))(sharp_net(), lr=0.1, multilabel=True)  # the authors' 0.2 unscaled
    differ = []
    for x in stream:
        expected = norm(x)
        differ.append(not torch.allclose(sar(x), expected, atol=1e-5))
        torch.testing.assert_close(unscaled(x), expected, rtol=0, atol=1e-6)  # reset after every step
        assert float(unscaled.last_step.reset) == 1 and float(sar.last_step.reset) == 0
        assert sar.ema > SAR.RESET_CONSTANT * math.log(2)
    assert differ == [False, True, True, True]  # the first prediction is the source's, before any update


def test_sar_predicts_after_the_update_on_request():
    x = images(1)[0]
    before, after = (
        SAR(sharp_net(), lr=0.1, multilabel=True),
        SAR(sharp_net(), lr=0.1, predict="after", multilabel=True),
    )
    first = before(x)
    second = after(x)
    with torch.no_grad():
        torch.testing.assert_close(second, after.model(x))
        torch.testing.assert_close(first, build_adapter("norm", sharp_net())(x))
    assert not torch.allclose(first, second, atol=1e-5)
    with pytest.raises(ValueError, match="predict"):
        SAR(sharp_net(), predict="during", multilabel=True)


def test_the_default_reset_is_the_authors_fraction_of_the_entropy_range():
    assert SAR.RESET_CONSTANT * math.log(1000) == pytest.approx(0.2)
    assert SAR.RESET_CONSTANT * math.log(2) == pytest.approx(0.0201, abs=1e-4)
