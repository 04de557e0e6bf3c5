import copy
import math

import pytest
import torch

from monai_grata.tta import BatchNormStatistics, build_adapter, entropy_loss

from .test_tta_grata import tiny_net, tiny_net_3d


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


def test_norm_select_predicts_with_the_most_confident_candidate():
    net = tiny_net()
    source = copy.deepcopy(net)
    x = torch.rand(1, 3, 16, 16) * 3 + 1
    with torch.no_grad():
        candidates = {math.inf: source.eval()(x), 0.0: copy.deepcopy(source).train()(x)}
    entropy = {k: float(entropy_loss(v, multilabel=True)) for k, v in candidates.items()}
    adapter = build_adapter("norm_select", net, priors=[math.inf, 0.0], task="fundus")
    before = copy.deepcopy(net.state_dict())
    out = adapter(x)
    chosen = min(entropy, key=entropy.get)
    assert float(adapter.last_step.prior) == chosen
    torch.testing.assert_close(out, candidates[chosen], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="priors"):
        build_adapter("norm_select", tiny_net(), priors=[-1.0], task="fundus")


def test_norm_select_consistency_keeps_to_a_volumes_plane():
    volume = torch.rand(1, 1, 8, 8, 4)
    guessing = build_adapter("norm_select", tiny_net_3d(), criterion="consistency", multilabel=False)
    with pytest.raises(ValueError, match=r"norm_select's consistency on a volume .*views=weak_views"):
        guessing(volume)
    tasked = build_adapter("norm_select", tiny_net_3d(), criterion="consistency", task="spinalcord")
    assert all(-1 not in flip for flip, _, _ in tasked.views.views)
    assert tasked(volume).shape == (1, 3, 8, 8, 4)
