import pytest
import torch
from monai.data import MetaTensor

from monai_grata.transforms import (
    WEAK_VIEWS,
    WEAK_VIEWS_3D,
    DiscCupFromLabel,
    DiscCupFromLabeld,
    StrongIntensityAug,
    StrongIntensityAugd,
    WeakViews,
    WeakViewsd,
    weak_views,
)


def test_disc_cup_channels_are_nested():
    label = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    out = DiscCupFromLabel()(label)
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[0], torch.tensor([[0.0, 1, 1], [1, 1, 0]]))
    assert torch.equal(out[1], torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    assert bool((out[1] <= out[0]).all())
    assert DiscCupFromLabeld("label")({"label": label})["label"].shape == (2, 2, 3)


def test_disc_cup_rejects_other_values_and_names_file():
    label = MetaTensor(torch.tensor([[[0, 255]]]), meta={"filename_or_obj": "case7.png"})
    with pytest.raises(ValueError, match=r"\[255\].*case7.png"):
        DiscCupFromLabel()(label)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 1, 4, 8, 8)])
def test_weak_views_inverse_is_exact(shape):
    x = torch.rand(shape)
    views = WeakViews()
    stacked = views(x)
    assert stacked.shape == (6 * shape[0],) + shape[1:]
    back = views.inverse(stacked)
    assert back.shape == (6,) + shape
    for v in range(6):
        assert torch.equal(back[v], x)
    # the views differ from each other (a view that did nothing would hide a broken inverse)
    assert len({tuple(stacked[v * shape[0]].flatten()[:8].tolist()) for v in range(6)}) == 6


def test_weak_views_dict_and_errors():
    x = torch.rand(1, 3, 8, 8)
    d = WeakViewsd("image")({"image": x})
    assert torch.equal(WeakViewsd("image").inverse(d)["image"][3], x)
    with pytest.raises(ValueError, match="square"):
        WeakViews()(torch.rand(1, 3, 8, 16))
    with pytest.raises(ValueError, match="multiple of 6"):
        WeakViews().inverse(torch.rand(4, 3, 8, 8))


def test_strong_aug_range_device_and_per_sample_draws(device):
    x = torch.rand(1, 3, 32, 32, device=device).repeat(8, 1, 1, 1)
    out = StrongIntensityAug(seed=3)(x)
    assert out.device.type == device.type and out.shape == x.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.amin(dim=(1, 2, 3)), torch.zeros(8, device=device))
    torch.testing.assert_close(out.amax(dim=(1, 2, 3)), torch.ones(8, device=device))
    # identical inputs, independent draws: the samples must not all be augmented the same way
    distinct = {tuple(out[i].flatten()[:16].round(decimals=5).tolist()) for i in range(8)}
    assert len(distinct) > 4


def test_strong_aug_per_channel_draws():
    x = torch.rand(1, 1, 32, 32).repeat(64, 3, 1, 1)
    out = StrongIntensityAug(seed=0, prob_noise=0.0, prob_blur_sample=0.0)(x)
    # with the same input in every channel, per-channel draws make the channels differ in most samples
    differs = [(out[i, 0] - out[i, 1]).abs().max() > 1e-4 for i in range(64)]
    assert sum(differs) > 32


def test_strong_aug_seeding(device):
    # each device has its own generator: the same seed repeats the same draws on the same device
    x = torch.rand(4, 3, 16, 16, device=device)
    aug = StrongIntensityAug(seed=11)
    first, second = aug(x), aug(x)
    assert not torch.equal(first, second)
    aug.set_random_state(11)
    assert torch.equal(aug(x), first)
    assert torch.equal(StrongIntensityAug(seed=11)(x), first)
    assert not torch.equal(StrongIntensityAug(seed=12)(x), first)
    d = StrongIntensityAugd("image", seed=11)({"image": x})
    assert torch.equal(d["image"], first)


def test_strong_aug_3d_and_bad_input():
    out = StrongIntensityAug(seed=0)(torch.rand(2, 1, 8, 8, 8))
    assert out.shape == (2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="batch"):
        StrongIntensityAug()(torch.rand(16, 16))
    with pytest.raises(ValueError, match="gamma"):
        StrongIntensityAug(gamma=(1.2, 2.0))


def test_grayscale_becomes_rgb_and_rgba_loses_alpha():
    from monai_grata.transforms import EnsureImageChannels

    to_rgb = EnsureImageChannels(in_channels=3)
    gray = torch.full((1, 5, 6), 7.0)
    assert torch.equal(to_rgb(gray), torch.full((3, 5, 6), 7.0))
    rgba = torch.arange(4.0)[:, None, None].expand(4, 5, 6)
    assert torch.equal(to_rgb(rgba), rgba[:3])
    nifti_rgba = torch.arange(4.0).expand(1, 5, 6, 4)  # a 2-D NIfTI colour image loads as (1, H, W, C)
    assert torch.equal(to_rgb(nifti_rgba), rgba[:3])
    with pytest.raises(ValueError, match="has 2 channels, the network expects 3"):
        to_rgb(torch.zeros(2, 5, 6))


def test_weak_views_of_volumes_are_exact_and_configurable():
    x = torch.rand(2, 1, 6, 6, 4)  # (B, C, H, W, D): quarter turns in the axial plane (H, W)
    views = WeakViews(WEAK_VIEWS_3D)
    assert views.num_views == 7
    stacked = views(x)
    assert stacked.shape == (14, 1, 6, 6, 4)
    back = views.inverse(stacked)
    assert all(torch.equal(back[v], x) for v in range(7))
    assert len({tuple(stacked[2 * v].flatten()[:8].tolist()) for v in range(7)}) == 7
    assert torch.equal(stacked[8:10], torch.rot90(x, 1, (-3, -2)))  # view 4: a quarter turn in (H, W)
    assert WeakViews(weak_views(2)).views == WeakViews(WEAK_VIEWS[:1] + WEAK_VIEWS[2:0:-1] + WEAK_VIEWS[3:]).views
    assert len(weak_views(3, flip_axes=(), rotations=())) == 1
    with pytest.raises(ValueError, match="square sides"):
        views(torch.rand(1, 1, 6, 8, 6))
    with pytest.raises(ValueError, match="negative spatial axes"):
        weak_views(3, flip_axes=(0,))


def test_strong_aug_on_volumes_and_in_plane_blur():
    x = torch.rand(1, 1, 12, 12, 3).repeat(4, 1, 1, 1, 1)  # 3 slices: fewer than the blur kernel's radius
    out = StrongIntensityAug(seed=3)(x)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.amax(dim=(1, 2, 3, 4)), torch.ones(4))
    assert len({round(float(v), 5) for v in out.mean(dim=(1, 2, 3, 4))}) == 4  # a draw per sample
    # in-plane blur only: a volume constant along the slice axis stays constant along it
    flat = torch.rand(1, 1, 12, 12, 1).repeat(2, 1, 1, 1, 5)
    aug = StrongIntensityAug(seed=1, blur_axes=(-3, -2), prob_noise=0.0, prob_blur_sample=1.0, prob_blur_channel=1.0)
    blurred = aug(flat)
    torch.testing.assert_close(blurred, blurred[..., :1].expand_as(blurred), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="blur_axes"):
        StrongIntensityAug(blur_axes=(2,))
