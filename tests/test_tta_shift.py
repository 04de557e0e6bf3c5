import pytest
import torch
from torch import nn

from monai_grata.tta import batch_norm_shift


def net_with_statistics(mean: float, var: float) -> nn.Module:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.fill_(mean)
        bn.running_var.fill_(var)
    return nn.Sequential(bn, nn.Conv2d(3, 2, 1)).eval()


def test_shift_is_the_gaussian_kl_to_the_running_statistics():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    at_home = batch_norm_shift(net_with_statistics(0.0, 1.0), x)
    assert 0 <= float(at_home) < 1e-2  # the batch's statistics are the running ones
    # a mean offset of 2 standard deviations: KL = 0.5 * 2**2 = 2; a variance 4x larger: 0.5 * (4 - 1 - ln 4)
    assert float(batch_norm_shift(net_with_statistics(0.0, 1.0), x + 2)) == pytest.approx(2.0, abs=0.02)
    expected = 0.5 * (4 - 1 - torch.log(torch.tensor(4.0)))
    assert float(batch_norm_shift(net_with_statistics(0.0, 1.0), x * 2)) == pytest.approx(float(expected), abs=0.02)


def test_shift_leaves_the_model_as_it_was_and_needs_running_statistics():
    model = net_with_statistics(0.5, 2.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shift = batch_norm_shift(model, torch.rand(1, 3, 8, 8))
    assert shift.ndim == 0 and not shift.requires_grad
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not model[0]._forward_hooks
    with pytest.raises(ValueError, match="running statistics"):
        batch_norm_shift(nn.Sequential(nn.Conv2d(3, 2, 1), nn.GroupNorm(1, 2)), torch.rand(1, 3, 8, 8))
