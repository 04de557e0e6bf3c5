import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monai_grata.tta import DUA, dua_copies

from .test_tta_grata import tiny_net, tiny_net_3d


def images(n: int) -> list[torch.Tensor]:
    torch.manual_seed(3)
    return [torch.rand(1, 3, 16, 16) * 3 + 1 for _ in range(n)]


def reference_dua(model: nn.Module, stream: list[torch.Tensor], num_samples: int, seed: int) -> list[torch.Tensor]:
    """The authors' loop (jmiemirza/DUA ``methods/dua.py``): for images 1..num_samples, BatchNorm in train mode with
    momentum mom_pre · 0.94 + 0.005 (mom_pre from 0.1) on the augmented copies; every image predicted in eval mode."""
    model = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    mom_pre, outputs = 0.1, []
    for i, x in enumerate(stream, start=1):
        if i <= num_samples:
            mom_new = mom_pre * 0.94
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.train()
                    m.momentum = mom_new + 0.005
            mom_pre = mom_new
            with torch.no_grad():
                model(dua_copies(x[0], 8, generator))
            model.eval()
        with torch.no_grad():
            outputs.append(model(x))
    return outputs


def running_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def test_dua_adapts_on_the_first_images_then_keeps_the_statistics():
    stream = images(5)
    source = tiny_net()
    expected = reference_dua(source, stream, num_samples=3, seed=4)
    adapter = DUA(copy.deepcopy(source), n_augmentations=8, max_updates=3, seed=4)
    frozen = None
    for step, x in enumerate(stream, start=1):
        torch.testing.assert_close(adapter(x), expected[step - 1], msg=f"prediction {step}")
        if step <= 3:
            assert float(adapter.last_step.momentum) == pytest.approx(0.1 * 0.94**step + 0.005)
        else:
            assert float(adapter.last_step.momentum) == 0
        if step == 3:
            frozen = running_statistics(adapter.model)
    assert adapter.steps == 3
    assert all(torch.equal(v, frozen[k]) for k, v in running_statistics(adapter.model).items())
    adapter.reset()  # a new target domain adapts again
    adapter(stream[0])
    assert adapter.steps == 1


def test_dua_without_a_cap_adapts_on_every_image():
    stream = images(4)
    source = tiny_net()
    expected = reference_dua(source, stream, num_samples=len(stream), seed=1)
    adapter = DUA(copy.deepcopy(source), n_augmentations=8, max_updates=None, seed=1)
    for step, x in enumerate(stream):
        torch.testing.assert_close(adapter(x), expected[step])
    assert adapter.steps == 4
    assert DUA(tiny_net()).max_updates == 80  # the authors' --num_samples
    with pytest.raises(ValueError, match="max_updates"):
        DUA(tiny_net(), max_updates=-1)


def test_dua_counts_the_samples_of_a_batch():
    adapter = DUA(tiny_net(), n_augmentations=4, max_updates=3)
    adapter(torch.rand(2, 3, 16, 16))
    before = running_statistics(adapter.model)
    adapter(torch.rand(2, 3, 16, 16))  # one more update, from the first sample
    assert adapter.steps == 3
    assert float(adapter.last_step.momentum) == pytest.approx(0.1 * 0.94**3 + 0.005)
    assert any(not torch.equal(v, before[k]) for k, v in running_statistics(adapter.model).items())


def dua_copies_2d(image: torch.Tensor, n: int, generator: torch.Generator, pad_fraction: float = 0.125) -> torch.Tensor:
    """The copies as they were made before volumes had an in-plane axis: always in the last two axes."""
    h, w = image.shape[-2:]
    pad = max(1, round(pad_fraction * min(h, w)))
    padded = F.pad(image, (pad, pad, pad, pad))
    draws = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=generator.device).tolist()
    flips = torch.randint(0, 2, (n,), generator=generator, device=generator.device).tolist()
    turns = torch.randint(0, 4 if h == w else 2, (n,), generator=generator, device=generator.device).tolist()
    copies = []
    for (top, left), flip, turn in zip(draws, flips, turns, strict=True):
        view = padded[..., top : top + h, left : left + w]
        view = view.flip(-1) if flip else view
        copies.append(torch.rot90(view, turn if h == w else 2 * turn, dims=(-2, -1)))
    return torch.stack(copies)


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 12, 20), (2, 9, 7)])
def test_dua_copies_of_an_image_are_unchanged(shape):
    image = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    new, old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(dua_copies(image, 8, new), dua_copies_2d(image, 8, old))
    assert torch.equal(torch.rand(3, generator=new), torch.rand(3, generator=old))  # the same draws, in order


def layered_volume() -> torch.Tensor:
    """(C, H, W, D) = (2, 8, 8, 5): slice k holds k + 1 plus in-plane structure in [0, 0.5)."""
    structure = torch.rand(2, 8, 8, 5, generator=torch.Generator().manual_seed(2)) / 2
    return structure + torch.arange(1.0, 6.0)


def check_in_plane_copies(copies: torch.Tensor, volume: torch.Tensor, seed: int) -> None:
    assert copies.shape[1:] == volume.shape
    for k in range(volume.shape[-1]):
        content = copies[..., k][copies[..., k] != 0]  # zero: the padding
        assert ((content >= k + 1) & (content < k + 1.5)).all(), f"slice {k} holds another slice's voxels"
        # every copy's slice k is the same in-plane crop, flip and turn of slice k as the 2D copies draw
        expected = dua_copies_2d(volume[..., k], len(copies), torch.Generator().manual_seed(seed))
        torch.testing.assert_close(copies[..., k], expected, rtol=0, atol=0, msg=f"slice {k}")


def test_dua_copies_of_a_volume_keep_the_slice_axis():
    volume = layered_volume()
    copies = dua_copies(volume, 16, torch.Generator().manual_seed(7), plane=(-3, -2))
    check_in_plane_copies(copies, volume, seed=7)
    with pytest.raises(ValueError, match="in-plane axes are not known"):  # a volume's plane is never guessed
        dua_copies(volume, 16, torch.Generator())
    # the 2D behaviour in the last two axes augments the slice axis: the check above catches it
    with pytest.raises(AssertionError):
        check_in_plane_copies(dua_copies_2d(volume, 16, torch.Generator().manual_seed(7)), volume, seed=7)


def test_dua_copies_in_a_given_plane():
    volume = layered_volume()
    slices_first = volume.movedim(-1, 1)  # (C, D, H, W): the plane is the last two axes
    copies = dua_copies(slices_first, 16, torch.Generator().manual_seed(3), plane=(2, 3))
    check_in_plane_copies(copies.movedim(2, -1), volume, seed=3)
    non_square = torch.rand(1, 6, 8, 4)  # half turns only
    assert dua_copies(non_square, 4, torch.Generator(), plane=(-3, -2)).shape == (4, 1, 6, 8, 4)
    for bad, plane, match in [
        (volume, (0, 1), "channel axis"),
        (volume, (-4, -3), "channel axis"),
        (volume, (1, -3), "two different axes"),
        (volume, (1, 4), "out of range"),
        (volume, (1,), "two spatial axes"),
        (torch.rand(8, 8), None, "one image"),
        (torch.rand(1, 1, 8, 8, 4), None, "one image"),
    ]:
        with pytest.raises(ValueError, match=match):
            dua_copies(bad, 4, torch.Generator(), plane=plane)


def test_dua_adapts_a_3d_network_on_in_plane_copies():
    torch.manual_seed(6)
    stream = [torch.rand(2, 1, 8, 8, 5) for _ in range(2)]
    source = tiny_net_3d(3)
    adapter = DUA(copy.deepcopy(source), n_augmentations=4, max_updates=None, seed=2, plane=(-3, -2))
    for x in stream:
        assert adapter(x).shape == (2, 3, 8, 8, 5)
    assert adapter.steps == 4
    # the same statistics as BatchNorm3d's own running average over the in-plane copies
    reference, generator = copy.deepcopy(source), torch.Generator().manual_seed(2)
    for step, image in enumerate(torch.cat(stream), start=1):
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.train()
                m.momentum = 0.1 * 0.94**step + 0.005
        with torch.no_grad():
            reference(dua_copies(image, 4, generator, plane=(-3, -2)))
    want = running_statistics(reference)
    for name, value in running_statistics(adapter.model).items():
        torch.testing.assert_close(value, want[name], msg=name)
    assert any(not torch.equal(v, running_statistics(source)[k]) for k, v in want.items())
    assert DUA(tiny_net_3d(), plane=[-3, -2]).plane == (-3, -2)  # a bundle's JSON list
    with pytest.raises(ValueError, match="plane"):
        DUA(tiny_net_3d(), plane=(-2, -2))
