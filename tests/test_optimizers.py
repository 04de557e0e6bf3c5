import pytest
import torch

from monai_grata.optimizers import build_lr_scheduler, build_optimizer


def test_sgd_is_nesterov_with_weight_decay_on_every_parameter():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    opt = build_optimizer("sgd", net.parameters(), lr=1e-3, momentum=0.99, weight_decay=5e-4)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD) and group["nesterov"] and group["weight_decay"] == 5e-4
    assert len(group["params"]) == len(list(net.parameters()))  # BatchNorm weights decay too
    assert isinstance(build_optimizer("adam", net.parameters(), lr=1e-3), torch.optim.Adam)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("rmsprop", net.parameters(), lr=1e-3)


def test_poly_schedule_decays_to_zero():
    opt = build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_lr_scheduler("poly", opt, epochs=4, power=0.9)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor([(1 - e / 4) ** 0.9 for e in range(4)]))
    assert opt.param_groups[0]["lr"] == 0.0
    with pytest.raises(ValueError, match="lr schedule"):
        build_lr_scheduler("step", opt, epochs=4)
