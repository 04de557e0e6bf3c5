import copy

import pytest
import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

from monai_grata.tta import (
    AdaptiveBatchNorm,
    BatchNormPolicy,
    GraTa,
    PatchAdaptation,
    build_adapter,
    convert_to_adaptive_batch_norm,
    frozen_statistics,
    normalisation_statistics,
    patch_positions,
    sample_patches,
)

from .test_tta_grata import tiny_net_3d


def test_patch_positions_are_evenly_spaced_windows_of_the_inferer_grid():
    grid = patch_positions((20, 20, 6), (8, 8, -1), num_patches=100, overlap=0.25)
    assert len(grid) == 9  # 3 x 3 windows of 8 at interval 6, the last one flush with the edge; full depth
    assert all(tuple(s.stop - s.start for s in where) == (8, 8, 6) for where in grid)
    picked = patch_positions((20, 20, 6), (8, 8, -1), num_patches=3, overlap=0.25)
    assert picked == [grid[0], grid[4], grid[8]]  # first, middle, last in scan order
    assert patch_positions((6, 6, 3), (8, 8, 8), num_patches=2) == [(slice(0, 6), slice(0, 6), slice(0, 3))]
    with pytest.raises(ValueError, match="num_patches"):
        patch_positions((8, 8, 8), (4, 4, 4), num_patches=0)


def test_sample_patches_stacks_patch_major():
    x = torch.arange(2 * 4 * 4 * 2, dtype=torch.float32).reshape(2, 1, 4, 4, 2)
    positions = patch_positions((4, 4, 2), (2, 2, 2), num_patches=4, overlap=0.0)
    patches = sample_patches(x, positions)
    assert patches.shape == (8, 1, 2, 2, 2)
    assert torch.equal(patches[1], x[1, :, :2, :2, :]) and torch.equal(patches[2], x[0, :, :2, 2:, :])


@pytest.mark.parametrize("configure", ["batch", "prior", "median", "eval"])
def test_frozen_statistics_reproduce_the_recorded_forward(configure):
    net = tiny_net_3d()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    if configure == "batch":
        convert_to_adaptive_batch_norm(net)
    elif configure == "prior":
        convert_to_adaptive_batch_norm(net.eval(), BatchNormPolicy(prior=3.0))
    elif configure == "median":
        convert_to_adaptive_batch_norm(net, BatchNormPolicy(prior=2.0, statistic="median"))
    net.eval()
    x, other = torch.rand(4, 1, 6, 6, 3), torch.rand(2, 1, 6, 6, 3) * 5
    with torch.no_grad():
        expected = net(x)
        stats = normalisation_statistics(net, x)
        with frozen_statistics(net, stats):
            torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-5)
            # any other batch is normalised with the same statistics, sample by sample
            torch.testing.assert_close(net(other)[:1], net(other[:1]), rtol=0, atol=1e-5)
    kinds = {type(m) for m in net.modules() if isinstance(m, (nn.BatchNorm3d, AdaptiveBatchNorm))}
    assert kinds == ({nn.BatchNorm3d} if configure == "eval" else {AdaptiveBatchNorm})  # plain layers put back
    assert all(m.frozen is None for m in net.modules() if isinstance(m, AdaptiveBatchNorm))
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)  # the layers' own forward is back


def test_frozen_statistics_need_every_layer():
    net = tiny_net_3d()
    with pytest.raises(ValueError, match="no frozen statistics"), frozen_statistics(net, {}):
        pass


def test_one_window_equals_adapting_on_the_whole_volume():
    # a window as large as the volume: patch adaptation is the adapter's own step and prediction
    torch.manual_seed(2)
    x = torch.rand(1, 1, 8, 8, 4)
    whole = build_adapter("grata", tiny_net_3d(), task="spinalcord", beta=1e-2, seed=1)
    expected = whole(x)
    patches = PatchAdaptation(
        build_adapter("grata", tiny_net_3d(), task="spinalcord", beta=1e-2, seed=1), (8, 8, -1), num_patches=4
    )
    got = patches(x, SlidingWindowInferer(roi_size=(8, 8, -1), sw_batch_size=1))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert patches.positions == [(slice(0, 8), slice(0, 8), slice(0, 4))]


@pytest.mark.parametrize("method", ["grata", "tent", "norm"])
def test_the_adapter_sees_only_patches_and_every_window_the_same_statistics(method):
    adapter = build_adapter(method, tiny_net_3d(), task="spinalcord")
    seen = []
    original = adapter.adapt_batch
    adapter.adapt_batch = lambda x: (seen.append(tuple(x.shape)), original(x))[1]
    patches = PatchAdaptation(adapter, (8, 8, -1), num_patches=3)
    x = torch.rand(1, 1, 20, 20, 4)
    inferer = SlidingWindowInferer(roi_size=(8, 8, -1), sw_batch_size=2, overlap=0.25)
    out = patches(x, inferer)
    assert seen == [(3, 1, 8, 8, 4)]  # three windows, never the volume
    assert out.shape == (1, 3, 20, 20, 4) and bool(torch.isfinite(out).all())
    one_by_one = SlidingWindowInferer(roi_size=(8, 8, -1), sw_batch_size=1, overlap=0.25)
    with torch.no_grad(), patches.frozen() as model:  # fixed statistics: windows batched or alone agree
        torch.testing.assert_close(out, one_by_one(x, model), rtol=0, atol=1e-5)
    with torch.no_grad():  # without them, each window would be normalised by its own statistics
        assert not torch.allclose(out, one_by_one(x, adapter.model), atol=1e-3)
    assert not adapter.last_step.skipped


def test_patch_adaptation_checks():
    adapter = GraTa(tiny_net_3d(), multilabel=False)
    with pytest.raises(ValueError, match="num_patches"):
        PatchAdaptation(adapter, (8, 8, 8), num_patches=0)
    with pytest.raises(RuntimeError, match="adapt"), PatchAdaptation(adapter, (8, 8, 8)).frozen():
        pass
    copy.deepcopy(adapter)  # an adapter used for patches stays an ordinary module
