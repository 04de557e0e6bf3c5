import copy

import torch

from monai_grata.tta import BatchNormStatistics, build_adapter

from .test_tta_grata import tiny_net


def test_norm_uses_batch_statistics_and_never_changes_weights():
    net = tiny_net()
    source = copy.deepcopy(net)
    adapter = build_adapter("norm", net)
    assert isinstance(adapter, BatchNormStatistics)
    x = torch.rand(2, 3, 16, 16) * 3 + 1  # far from the source running statistics
    before = copy.deepcopy(net.state_dict())
    out = adapter(x)
    with torch.no_grad():
        expected = source.train()(x)  # train-mode BatchNorm normalises with the batch's statistics
        unadapted = source.eval()(x)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, unadapted)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
