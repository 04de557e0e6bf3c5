import pytest
import torch

from monai_grata.networks import load_weights, resunet, save_half_precision


def test_resunet_2d_shape_and_norm_layers():
    net = resunet(in_channels=3, out_channels=2).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 64, 96))
    assert out.shape == (1, 2, 64, 96)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 43


def test_resunet_3d_and_other_channels():
    net = resunet(spatial_dims=3, in_channels=1, out_channels=3, backbone="resnet18").eval()
    with torch.no_grad():
        out = net(torch.rand(1, 1, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32)


def test_half_precision_round_trip(tmp_path):
    net = resunet(backbone="resnet18")
    path = str(tmp_path / "model.pt")
    save_half_precision(net, path)
    saved = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in saved.values() if v.is_floating_point())
    other = load_weights(resunet(backbone="resnet18"), path)
    for (k, a), b in zip(net.state_dict().items(), other.state_dict().values(), strict=True):
        assert b.dtype == a.dtype, k
        if a.is_floating_point():
            torch.testing.assert_close(b, a.half().float())


def test_load_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_weights(resunet(backbone="resnet18"), str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_weights(resunet(backbone="resnet18"), str(bad))
    other = tmp_path / "other.pt"
    save_half_precision(resunet(backbone="resnet18", out_channels=3), str(other))
    with pytest.raises(ValueError, match="does not match"):
        load_weights(resunet(backbone="resnet18"), str(other))


def test_checkpoint_errors_are_one_line_bad_inputs(tmp_path):
    from monai_grata.data import BadInputError, MissingInputError

    good = tmp_path / "good.pt"
    save_half_precision(resunet(backbone="resnet18"), str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    other = tmp_path / "other.pt"
    save_half_precision(resunet(backbone="resnet18", in_channels=1, out_channels=3), str(other))
    cases = [
        (tmp_path / "missing.pt", MissingInputError, r"checkpoint not found: '.*missing.pt'"),
        (truncated, BadInputError, r"cannot read checkpoint '.*truncated.pt' \(truncated or not a torch file\?\)"),
        (other, BadInputError, r"'.*other.pt' does not match the network: 3 of another shape \(e.g. '.*'\); was it"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message) as info:
            load_weights(resunet(backbone="resnet18"), str(path))
        assert "\n" not in str(info.value)
