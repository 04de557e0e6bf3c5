import copy

import pytest
import torch
from torch import nn

from monai_grata.tta import DUA, dua_copies

from .test_tta_grata import tiny_net


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
            assert float(adapter.last_stats["momentum"]) == pytest.approx(0.1 * 0.94**step + 0.005)
        else:
            assert float(adapter.last_stats["momentum"]) == 0
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
    assert float(adapter.last_stats["momentum"]) == pytest.approx(0.1 * 0.94**3 + 0.005)
    assert any(not torch.equal(v, before[k]) for k, v in running_statistics(adapter.model).items())
