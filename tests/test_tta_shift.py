import pytest
import torch
from torch import nn

from monai_grata.tta import batch_norm_shift
from monai_grata.tta.shift import SettleSchedule, record_batch_norm_shift


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


def test_record_batch_norm_shift_reads_a_forward_with_gradients_as_batch_norm_shift_does():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), net_with_statistics(0.5, 2.0), nn.BatchNorm2d(2)).eval()
    model[0].weight.requires_grad_(True)
    x = torch.rand(2, 3, 8, 8)
    with record_batch_norm_shift(model) as record:
        out = model(x)
    assert out.requires_grad and record.n_layers == 2 and len(record.divergences) == 2
    shift = record.shift()
    assert not shift.requires_grad
    torch.testing.assert_close(shift, batch_norm_shift(model, x), rtol=0, atol=0)
    assert not model[1][0]._forward_pre_hooks and not model[2]._forward_pre_hooks
    with pytest.raises(RuntimeError, match="no BatchNorm input was recorded"):
        with record_batch_norm_shift(model) as empty:
            pass
        empty.shift()
    with pytest.raises(ValueError, match="running statistics"):
        with record_batch_norm_shift(nn.Conv2d(3, 2, 1)):
            pass


def test_record_reads_the_running_statistics_before_a_layer_updates_them():
    bn = nn.BatchNorm2d(3, momentum=1.0)  # train mode: the forward replaces the running statistics by the batch's
    x = torch.randn(4, 3, 8, 8) + 3
    with record_batch_norm_shift(bn) as record:
        bn(x)
    assert float(record.shift()) > 1  # against the source statistics (0, 1), not the batch's own


def test_settle_schedule_updates_every_kth_batch_once_settled_and_restarts_on_a_jump():
    schedule = SettleSchedule(after=2, every=2, tolerance=0.1)
    updates = []
    for shift in [0.30, 0.32, 0.31, 0.29, 0.30, 0.33]:
        update = schedule.wants_update(shift)
        if update:
            schedule.record_update()
        updates.append(update)
    assert updates == [True, True, False, True, False, True]
    assert schedule.settled and schedule.mean_shift == pytest.approx(0.308333, rel=1e-4)
    assert schedule.wants_update(0.6) and not schedule.settled  # a new site: restart, mean from the new batch
    assert schedule.mean_shift == pytest.approx(0.6)
    schedule.reset()
    assert schedule.mean_shift is None and schedule.wants_update(0.3)
    for bad in ({"after": 0}, {"after": 2, "every": 0}, {"after": 2, "tolerance": 0}):
        with pytest.raises(ValueError):
            SettleSchedule(**bad)
