import math

import pytest
import torch
from torch import nn

from monai_grata.losses import GradientHarmonizedLoss, gh_weights


def expected_gh(g1, g2):
    d = float(g1 @ g2)
    if d >= 0 or float(g1 @ g1) == 0 or float(g2 @ g2) == 0:
        return 1.0, 1.0
    return 1 - d / float(g1 @ g1), 1 - d / float(g2 @ g2)


def expected_ghpp(g1, g2, lam):
    d = float(g1 @ g2)
    if d >= 0 or float(g1 @ g1) == 0 or float(g2 @ g2) == 0:
        return 1.0, 1.0
    theta = math.acos(d / (float(g1.norm()) * float(g2.norm())))
    return 1 + 2 * math.sin(lam * (theta - math.pi / 2) / 2), 1 + 2 * math.sin((lam - 1) * (theta - math.pi / 2) / 2)


CASES = {
    "acute": ([1.0, 0.0], [1.0, 1.0]),
    "orthogonal": ([1.0, 0.0], [0.0, 2.0]),
    "obtuse": ([1.0, 0.0], [-1.0, 1.0]),
    "opposite": ([2.0, 0.0], [-1.0, 0.0]),
    "zero": ([0.0, 0.0], [-1.0, 1.0]),
}


@pytest.mark.parametrize("case", CASES)
def test_gh_and_ghpp_2d(case):
    g1, g2 = (torch.tensor(v, dtype=torch.float64) for v in CASES[case])
    tau = gh_weights(g1, g2, "gh")
    assert [float(t) for t in tau] == pytest.approx(expected_gh(g1, g2), rel=1e-6)
    for lam in (0.0, 0.5, 1.0):
        tau = gh_weights(g1, g2, "gh++", lam)
        assert [float(t) for t in tau] == pytest.approx(expected_ghpp(g1, g2, lam), rel=1e-6)
    assert all(math.isfinite(float(t)) for t in gh_weights(g1, g2, "gh++"))
    if case in ("acute", "orthogonal", "zero"):
        assert [float(t) for t in gh_weights(g1, g2, "gh")] == [1.0, 1.0]


def test_known_values():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # <g1,g2> = -1, |g1|^2 = 1, |g2|^2 = 2
    assert [float(t) for t in gh_weights(g1, g2, "gh")] == pytest.approx([2.0, 1.5])
    # theta = 135 degrees: tau1 = 1 + 2 sin(0.5 * pi/4 / 2), tau2 = 1 + 2 sin(-0.5 * pi/4 / 2)
    s = math.sin(math.pi / 16)
    assert [float(t) for t in gh_weights(g1, g2, "gh++", 0.5)] == pytest.approx([1 + 2 * s, 1 - 2 * s])


def test_high_dimensional_and_harmonized_directions():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        g1 = torch.randn(10_000, generator=gen)
        g2 = -0.5 * g1 + torch.randn(10_000, generator=gen)
        assert float(g1 @ g2) < 0
        tau1, tau2 = gh_weights(g1, g2, "gh")
        assert [float(tau1), float(tau2)] == pytest.approx(expected_gh(g1.double(), g2.double()), rel=1e-5)
        combined = tau1.double() * g1.double() + tau2.double() * g2.double()
        assert float(combined @ g1.double()) >= -1e-6 * float(g1.norm() ** 2)
        assert float(combined @ g2.double()) >= -1e-6 * float(g2.norm() ** 2)
        tau = gh_weights(g1, g2, "gh++", 0.5)
        assert [float(t) for t in tau] == pytest.approx(expected_ghpp(g1.double(), g2.double(), 0.5), rel=1e-5)


def test_gh_strips_the_same_part_of_g2_whatever_the_weight_of_g1():
    # docs/results_uda.md: down-weighting the alignment loss (g1 -> k*g1) does not spare the segmentation
    # gradient; GH's update is k*(g1 without its g2 component) + (g2 without its g1 component) for every k
    gen = torch.Generator().manual_seed(1)
    g1 = torch.randn(1000, generator=gen, dtype=torch.float64)
    g2 = -0.8 * g1 + 0.3 * torch.randn(1000, generator=gen, dtype=torch.float64)
    g1_part = g1 - (g1 @ g2) / (g2 @ g2) * g2
    g2_part = g2 - (g1 @ g2) / (g1 @ g1) * g1
    for k in (0.01, 1.0, 100.0):
        tau1, tau2 = gh_weights(k * g1, g2, "gh")
        update = tau1.double() * k * g1 + tau2.double() * g2
        torch.testing.assert_close(update, k * g1_part + g2_part, rtol=1e-5, atol=1e-5 * float(g2.norm()))


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        gh_weights(torch.ones(2), torch.ones(2), "pcgrad")
    with pytest.raises(ValueError, match="lam"):
        gh_weights(torch.ones(2), torch.ones(2), "gh++", 1.5)
    with pytest.raises(ValueError, match="size"):
        gh_weights(torch.ones(2), torch.ones(3))


def _two_losses():
    torch.manual_seed(0)
    shared = nn.Linear(4, 3)
    x = torch.randn(8, 4)
    out = shared(x)
    return shared, (out[:, 0] - 1).pow(2).mean(), (out[:, 0] + 1).pow(2).mean() + out[:, 1].abs().mean()


@pytest.mark.parametrize("mode", ["gh", "gh++", "none"])
def test_wrapper_gradient_is_weighted_sum(mode):
    shared, l1, l2 = _two_losses()
    params = list(shared.parameters())
    g1 = torch.cat([g.flatten() for g in torch.autograd.grad(l1, params, retain_graph=True)])
    g2 = torch.cat([g.flatten() for g in torch.autograd.grad(l2, params, retain_graph=True)])
    harmonized = GradientHarmonizedLoss(params, mode=mode)
    loss = harmonized(l1, l2)
    loss.backward()
    got = torch.cat([p.grad.flatten() for p in params])
    tau1, tau2 = gh_weights(g1, g2, mode)
    torch.testing.assert_close(got, tau1 * g1 + tau2 * g2, rtol=1e-5, atol=1e-6)
    if mode != "none":
        assert float(harmonized.last_stats["conflict"]) == 1.0  # the pair is built to conflict
        assert float(harmonized.last_stats["tau1"]) == pytest.approx(float(tau1))
        assert float(harmonized.last_stats["cos"]) < 0
    if mode == "gh":
        assert float(got @ g1) >= -1e-6 and float(got @ g2) >= -1e-6


def test_wrapper_unused_parameter_and_scale_invariance():
    shared, l1, l2 = _two_losses()
    unused = nn.Parameter(torch.ones(3))
    wrapper = GradientHarmonizedLoss([*shared.parameters(), unused], mode="gh")
    wrapper(l1, l2)
    taus = (wrapper.last_stats["tau1"].clone(), wrapper.last_stats["tau2"].clone())
    scaled = GradientHarmonizedLoss([*shared.parameters(), unused], mode="gh", loss_scale=1024.0)
    scaled(l1, l2)
    torch.testing.assert_close(scaled.last_stats["tau1"], taus[0])
    torch.testing.assert_close(scaled.last_stats["tau2"], taus[1])
    with pytest.raises(ValueError, match="scalar"):
        wrapper(torch.ones(2, requires_grad=True), l2)


@pytest.mark.parametrize("mode", ["none", "gh", "gh++"])
def test_backward_matches_forward_then_backward_and_accumulates(mode):
    shared, l1, l2 = _two_losses()
    params = list(shared.parameters())
    reference = GradientHarmonizedLoss(params, mode=mode)
    reference(l1, l2).backward(retain_graph=True)
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)  # backward() adds, as autograd does
    harmonized = GradientHarmonizedLoss(params, mode=mode)
    loss = harmonized.backward(l1, l2)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e + 1, rtol=1e-5, atol=1e-6)
    assert not loss.requires_grad
    assert float(harmonized.last_stats["conflict"]) == 1.0  # measured in mode "none" too
    if mode == "none":
        assert float(harmonized.last_stats["tau1"]) == 1.0 and float(harmonized.last_stats["tau2"]) == 1.0


def test_backward_with_monai_metatensor_losses():
    from monai.data import MetaTensor

    torch.manual_seed(0)
    shared = nn.Linear(4, 3)
    out = shared(MetaTensor(torch.randn(8, 4)))
    l1, l2 = (out[:, 0] - 1).pow(2).mean(), (out[:, 0] + 1).pow(2).mean()
    GradientHarmonizedLoss(shared.parameters(), mode="gh").backward(l1, l2)
    assert all(type(p.grad) is torch.Tensor and p.grad.shape == p.shape for p in shared.parameters())
