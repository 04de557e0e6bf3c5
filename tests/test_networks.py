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


def test_authors_resunet_shape_norm_layers_and_keys():
    # the authors' ResUnet (VPTTA OPTIC/networks/ResUnet.py): 36 BatchNorm layers in the ResNet-34 encoder
    # (stem 1, blocks 32, 1x1-conv shortcuts 3) + 4 decoder blocks + the 32-channel output block = 41, eps 1e-5
    net = resunet(decoder="authors").eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 64, 96))
    assert out.shape == (1, 2, 64, 96)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 41 and all(m.eps == 1e-5 for m in bns)
    assert [m.num_features for m in (net.up1.bn, net.up2.bn, net.up3.bn, net.up4.bn, net.bnout)] == [256] * 4 + [32]
    # encoder parameters = torchvision's ResNet-34 without its classifier; decoder 756,898
    encoder = sum(p.numel() for p in net.res.parameters())
    assert encoder == 21_284_672
    assert sum(p.numel() for p in net.parameters()) - encoder == 756_898
    keys = net.state_dict().keys()
    for key in (
        "res.conv1.weight",
        "res.layer2.0.downsample.1.running_var",
        "up1.x_conv.bias",
        "up1.tr_conv.weight",
        "up4.bn.weight",
        "up5.weight",
        "bnout.bias",
        "seg_head.weight",
    ):
        assert key in keys, key
    with pytest.raises(ValueError, match="unknown decoder"):
        resunet(decoder="other")


def test_authors_resunet_state_dict_round_trip_and_detection(tmp_path):
    from monai_grata.networks import checkpoint_decoder

    net = resunet(decoder="authors", backbone="resnet18")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = str(tmp_path / "authors.pt")
    torch.save(net.state_dict(), path)
    other = load_weights(resunet(decoder="authors", backbone="resnet18"), path)
    for (k, a), b in zip(net.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    flexible = str(tmp_path / "flexible.pt")
    save_half_precision(resunet(backbone="resnet18"), flexible)
    assert checkpoint_decoder(path) == "authors"
    assert checkpoint_decoder(flexible) == "flexible"
    assert checkpoint_decoder(str(tmp_path / "missing.pt")) == "flexible"
    with pytest.raises(ValueError, match="--decoder"):
        load_weights(resunet(backbone="resnet18"), path)


@pytest.mark.parametrize("method", ["grata", "tent"])
def test_adapters_step_on_the_authors_resunet(method):
    from monai_grata.tta import build_adapter

    torch.manual_seed(0)
    adapter = build_adapter(method, resunet(decoder="authors"), task="fundus")
    before = [p.detach().clone() for p in adapter.params]
    logits = adapter(torch.rand(1, 3, 64, 64))
    assert logits.shape == (1, 2, 64, 64) and torch.isfinite(logits).all()
    assert len(adapter.params) == 82  # weight and bias of the 41 BatchNorm layers
    assert any(not torch.equal(a, b) for a, b in zip(before, adapter.params, strict=True))
    assert all(torch.isfinite(v).all() for v in adapter.last_step.scalars().values())
