import copy

import pytest
import torch

from monai_grata.networks import (
    build_denoiser,
    default_denoiser_path,
    load_denoiser,
    load_weights,
    resunet,
    save_denoiser,
    save_half_precision,
    tap_features,
)
from monai_grata.tta import DeTTA, adapter_names, blind_spot, build_adapter, denoising_loss
from monai_grata.utils.train_denoiser import main as train_denoiser_main
from monai_grata.utils.train_denoiser import train_denoiser

from .test_tta_baselines import changed, images, is_affine, sharp_net
from .test_tta_grata import tiny_net_3d


def test_registered_and_builds_with_an_untrained_denoiser(caplog):
    assert "detta" in adapter_names()
    with caplog.at_level("WARNING"):
        adapter = build_adapter("detta", sharp_net())
    assert isinstance(adapter, DeTTA) and "untrained" in caplog.text
    out = adapter(images(1)[0])
    assert out.shape == (1, 2, 16, 16) and bool(torch.isfinite(out).all())
    assert set(adapter.last_step.scalars()) == {"loss_denoise"} and adapter.last_step.loss_denoise.ndim == 0


def test_blind_spot_masks_the_share_of_positions_with_neighbours():
    x = torch.rand(2, 3, 32, 32)
    masked, mask = blind_spot(x, 0.1, 5, torch.Generator().manual_seed(0))
    assert masked.shape == mask.shape == x.shape
    assert torch.equal(masked[mask == 0], x[mask == 0])  # only the masked positions change
    per_channel = mask.sum(dim=(2, 3))
    assert bool((per_channel <= int(32 * 32 * 0.1)).all()) and bool((per_channel > 0.08 * 32 * 32).all())
    # every masked value is a value of the 5x5 neighbourhood (wrapping at the borders)
    rolled = torch.stack([x.roll((dy, dx), (2, 3)) for dy in range(-2, 3) for dx in range(-2, 3)])
    assert bool((rolled == masked).any(dim=0)[mask == 1].all())
    again, _ = blind_spot(x, 0.1, 5, torch.Generator().manual_seed(0))
    assert torch.equal(masked, again)


def test_blind_spot_on_a_volume_takes_neighbours_from_the_same_slice():
    x = torch.arange(2 * 8 * 8 * 6, dtype=torch.float32).reshape(1, 2, 8, 8, 6)  # every value names its voxel
    masked, mask = blind_spot(x, 0.2, 5, torch.Generator().manual_seed(1), plane=(-3, -2))
    assert torch.equal(masked[mask == 0], x[mask == 0])
    channel, h, w, d = torch.nonzero(mask[0] == 1, as_tuple=True)
    source = masked[0][channel, h, w, d].long() - channel * 8 * 8 * 6  # the voxel each masked one copies
    src_h, src_w, src_d = source // (8 * 6), source // 6 % 8, source % 6
    assert torch.equal(src_d, d)  # never another slice
    assert bool(((src_h - h + 2) % 8 <= 4).all() and ((src_w - w + 2) % 8 <= 4).all())  # within the 5x5 window
    with pytest.raises(ValueError, match="in-plane axes are not known"):  # a volume's plane is never guessed
        blind_spot(x, 0.2, 5, torch.Generator())
    with pytest.raises(ValueError, match="two different spatial axes"):
        blind_spot(x, 0.2, 5, torch.Generator(), plane=(-2, -2))


def test_detta_takes_a_volumes_plane_from_the_task():
    adapter = build_adapter("detta", tiny_net_3d(3), task="spinalcord")
    assert adapter.plane == (-3, -2)
    assert adapter(torch.rand(1, 1, 8, 8, 4)).shape == (1, 3, 8, 8, 4)
    with pytest.raises(ValueError, match="blind_spot on a volume"):
        build_adapter("detta", tiny_net_3d(3))(torch.rand(1, 1, 8, 8, 4))


def test_denoising_loss_counts_only_masked_positions():
    image = torch.rand(1, 3, 8, 8)
    mask = torch.zeros_like(image)
    mask[..., 2, 3] = 1
    denoised = torch.rand_like(image)
    target = (image - image.min()) / (image.max() - image.min())  # the image min-max scaled
    exact = denoised.clone()
    exact[mask == 1] = target[mask == 1]
    assert float(denoising_loss(exact, image, mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(denoising_loss(denoised, image, mask)) == pytest.approx(
        float((denoised - target)[mask == 1].abs().sum() / image.numel())
    )


def test_one_step_changes_only_norm_affine_parameters_and_reset_is_bit_exact():
    adapter = build_adapter("detta", sharp_net(), lr=1e-3)
    source, denoiser_source = (copy.deepcopy(m.state_dict()) for m in (adapter.model, adapter.denoiser))
    adapter(images(1)[0])
    moved = changed(source, adapter.model.state_dict())
    assert moved and all(is_affine(k) for k in moved)
    moved_denoiser = changed(denoiser_source, adapter.denoiser.state_dict())
    assert moved_denoiser and all(k.rsplit(".", 1)[-1] in ("weight", "bias") for k in moved_denoiser)
    assert all(".adn.N." in k for k in moved_denoiser)  # the denoiser's BatchNorm, not its convolutions
    first = adapter.last_step.loss_denoise
    for x in images(2):
        adapter(x)
    adapter.reset()
    assert not changed(source, adapter.model.state_dict())
    assert not changed(denoiser_source, adapter.denoiser.state_dict())
    assert adapter.optimizer.state_dict()["state"] == {}
    adapter(images(1)[0])  # the masks start again from the seed
    assert torch.equal(adapter.last_step.loss_denoise, first)


def test_segmentation_decoder_gets_no_gradient():
    # the loss runs through the encoder only: FlexibleUNet's decoder BatchNorm stays at the source values
    model = resunet(backbone="resnet18")
    adapter = build_adapter("detta", model, lr=1e-2)
    decoder = copy.deepcopy(model.decoder.state_dict())
    encoder = copy.deepcopy(model.encoder.state_dict())
    adapter(torch.rand(1, 3, 64, 64))
    assert not changed(decoder, model.decoder.state_dict())
    assert changed(encoder, model.encoder.state_dict())


def test_tap_features_stops_at_the_layer_and_keeps_gradients():
    model = resunet(decoder="authors", backbone="resnet18").eval()
    calls = []
    model.up1.register_forward_hook(lambda *a: calls.append(1))
    features = tap_features(model, torch.rand(1, 3, 64, 64), "res")
    assert [f.shape[1] for f in features] == [64, 64, 128, 256, 512] and not calls
    assert features[-1].requires_grad
    with pytest.raises(ValueError, match="no layer"):
        tap_features(model, torch.rand(1, 3, 64, 64), "nope")


def test_denoiser_file_round_trip_and_found_beside_the_source_checkpoint(tmp_path):
    model = resunet(backbone="resnet18")
    source = tmp_path / "source_a.pt"
    save_half_precision(model, str(source))
    assert default_denoiser_path(str(source)) == str(tmp_path / "denoiser_a.pt")
    denoiser = build_denoiser(model, seed=3)
    save_denoiser(denoiser, str(tmp_path / "denoiser_a.pt"))
    loaded = load_denoiser(str(tmp_path / "denoiser_a.pt"))
    assert loaded.config == denoiser.config and loaded.layer == "encoder"
    for (k, a), b in zip(denoiser.state_dict().items(), loaded.state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a.half().float(), msg=k)
    adapter = build_adapter("detta", load_weights(resunet(backbone="resnet18"), str(source)))
    for name, p in adapter.denoiser.named_parameters():
        torch.testing.assert_close(p, loaded.get_parameter(name), msg=name)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_denoiser(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="not written by save_denoiser"):
        load_denoiser(str(source))


def test_training_runs_two_iterations_on_synthetic_data(tmp_path):
    model = resunet(backbone="resnet18")
    source = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    train, val = torch.rand(4, 3, 64, 64), torch.rand(2, 3, 64, 64)
    seen = []
    denoiser, history = train_denoiser(
        model, train, val, epochs=2, batch_size=2, max_iterations=1, on_epoch=lambda d, r: seen.append(r)
    )
    assert [r["epoch"] for r in history] == [1, 2] and seen == history
    assert all(r["train_loss"] > 0 and r["val_loss"] > 0 for r in history)
    assert not changed(source, model.state_dict())  # the source model stays frozen (running statistics too)
    assert not denoiser.training


def test_training_command_writes_a_loadable_denoiser(tmp_path):
    import json
    import os

    from PIL import Image

    root = tmp_path / "data"
    os.makedirs(root / "d" / "images")
    for i in range(3):
        Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(root / "d" / "images" / f"{i}.png")
    ckpt = tmp_path / "source_d.pt"
    save_half_precision(resunet(), str(ckpt))
    out = tmp_path / "denoiser_d.pt"
    history = tmp_path / "history.json"
    train_denoiser_main(
        [
            "--ckpt_path",
            str(ckpt),
            "--dataset_dir",
            str(root),
            "--source",
            "d",
            "--out_path",
            str(out),
            "--epochs",
            "1",
            "--max_iterations",
            "2",
            "--batch_size",
            "1",
            "--image_size",
            "64",
            "--history",
            str(history),
        ]
    )
    assert load_denoiser(str(out)).layer == "encoder"
    assert [r["epoch"] for r in json.loads(history.read_text())] == [1]
