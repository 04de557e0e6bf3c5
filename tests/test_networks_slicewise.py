import pytest
import torch
from torch import nn

from monai_grata.networks.slicewise import SliceWise
from monai_grata.tta import FeatureTap


def net_2d() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()


@pytest.mark.parametrize("axis", [-1, -3])
def test_slicewise_equals_the_2d_network_on_every_slice(axis):
    net = net_2d()
    volume = torch.rand(2, 1, 6, 5, 4)
    out = SliceWise(net, slice_axis=axis)(volume)
    assert out.shape == (2, 3, 6, 5, 4)
    with torch.no_grad():
        for d in range(volume.shape[axis]):
            torch.testing.assert_close(out.select(axis, d), net(volume.select(axis, d)), rtol=0, atol=1e-6)


def test_batch_statistics_are_taken_over_every_slice_of_the_volume():
    net = net_2d().train()
    volume = torch.rand(1, 1, 6, 6, 4)
    out = SliceWise(net)(volume)
    folded = volume.movedim(-1, 1).reshape(4, 1, 6, 6)
    torch.testing.assert_close(out, net(folded).reshape(1, 4, 3, 6, 6).movedim(1, -1), rtol=0, atol=1e-6)


def test_feature_tap_sees_volumes_and_errors():
    model = SliceWise(net_2d())
    tap = FeatureTap(model)
    model(torch.rand(2, 1, 6, 5, 3))
    assert tap.features.shape == (2, 4, 6, 5, 3)
    with pytest.raises(ValueError, match="volumes"):
        model(torch.rand(1, 6, 5))
    with pytest.raises(ValueError, match="slice_axis"):
        SliceWise(net_2d(), slice_axis=0)


def test_a_source_prior_counts_volumes_not_slices():
    from monai_grata.tta.normalization import BatchNormPolicy, convert_to_adaptive_batch_norm

    net = net_2d()
    net[1].running_mean.fill_(0.3)
    net[1].running_var.fill_(2.0)
    volume = torch.rand(2, 1, 6, 5, 4) * 3
    adapted = SliceWise(convert_to_adaptive_batch_norm(net, BatchNormPolicy(prior=3.0)))
    with torch.no_grad():
        out = adapted(volume)
        # reference: 8 slices (2 volumes of 4) against a prior of 3 volumes, i.e. 12 slices: batch weight 8 / 20
        features = net[0](volume.movedim(-1, 1).reshape(8, 1, 6, 5))
        batch_var, batch_mean = torch.var_mean(features, dim=(0, 2, 3), correction=0)
        w = 8 / (8 + 3 * 4)
        mean, var = w * batch_mean + (1 - w) * 0.3, w * batch_var + (1 - w) * 2.0
        normed = (features - mean[:, None, None]) / torch.sqrt(var[:, None, None] + net[1].eps)
        normed = normed * net[1].weight[:, None, None] + net[1].bias[:, None, None]
        expected = net[3](net[2](normed)).reshape(2, 4, 3, 6, 5).movedim(1, -1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert adapted.network[1].samples_per_input == 1  # only inside the forward
