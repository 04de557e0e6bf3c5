"""DLTTA against a hand-written version of the authors' update rule (med-air/DLTTA models/basemodel.py ``opt_ANet``,
memory.py; the adaptor and SRIP from He et al.'s models/adapmodel.py and utils/util.py), and its adapter contract."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import nn

from monai_grata.data.checks import BadInputError
from monai_grata.networks import resunet
from monai_grata.networks.slicewise import SliceWise
from monai_grata.tta import build_adapter
from monai_grata.tta.dltta import (
    DLTTA,
    FeatureAutoencoder,
    find_dltta_layers,
    save_autoencoders,
    srip,
    symmetric_kl,
    train_autoencoders,
)


def block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class Up(nn.Module):
    def __init__(self, c_in: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.block = block(c_in + c_skip, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([F.interpolate(x, size=skip.shape[2:]), skip], dim=1))


class ToyUNet(nn.Module):
    """The authors' task network in small: an input block, three down blocks, a bottleneck, up blocks with skips."""

    def __init__(self, out_channels: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inc = block(3, 4)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), block(4, 6))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), block(6, 8))
        self.down3 = nn.Sequential(nn.MaxPool2d(2), block(8, 8))
        self.bottleneck = block(8, 8)
        self.up3, self.up2, self.up1 = Up(8, 8, 8), Up(8, 6, 6), Up(6, 4, 4)
        self.head = nn.Conv2d(4, out_channels, 1)
        with torch.no_grad():  # source running statistics far from any test batch's
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
                    m.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.inc(x)
        d1 = self.down1(x0)
        d2 = self.down2(d1)
        b = self.bottleneck(self.down3(d2))
        return self.head(self.up1(self.up2(self.up3(b, d2), d1), x0))


def running(adapter: DLTTA) -> list[torch.Tensor]:
    return [t for _, mean, var in adapter.running_statistics for t in (mean, var)]


def stream(n: int, size: int = 32) -> list[torch.Tensor]:
    torch.manual_seed(5)
    return [torch.rand(1, 3, size, size) * (1 + i % 3) + 0.5 * (i % 2) for i in range(n)]


# --- the authors' rule, written out -----------------------------------------------------------------------------------


def run_tnet(net: ToyUNet, x: torch.Tensor, convs=None, key_only: bool = False):
    """models/adapmodel.py ANet.forward (convs at seq 1, 2: after the first two down blocks) / backends UNet.forward."""
    x0 = net.inc(x)
    d1 = net.down1(x0)
    d1 = convs[0](d1) if convs else d1
    d2 = net.down2(d1)
    d2 = convs[1](d2) if convs else d2
    b = net.bottleneck(net.down3(d2))
    if key_only:  # TNet(image, adaptive=True)
        return b
    u3 = net.up3(b, d2)
    u2 = net.up2(u3, d1)
    return {"d1": d1, "d2": d2, "u3": u3, "u2": u2, "logits": net.head(net.up1(u2, x0))}


def l2_reg_ortho(convs, generator):
    """utils/util.py l2_reg_ortho (He et al.), one random start vector per weight."""
    total = 0
    for conv in convs:
        w = conv.weight
        cols = w[0].numel()
        w1 = w.view(-1, cols)
        w_tmp = torch.matmul(torch.transpose(w1, 0, 1), w1) - torch.eye(cols)
        u = F.normalize(torch.randn(w_tmp.size(0), generator=generator), dim=0, eps=1e-12)
        v = F.normalize(torch.matmul(w_tmp.t(), u), dim=0, eps=1e-12)
        u = F.normalize(torch.matmul(w_tmp, v), dim=0, eps=1e-12)
        total = total + torch.dot(u, torch.matmul(w_tmp, v)) ** 2
    return total


def retrieve(memory: list, key: torch.Tensor, k: int, ensemble: str) -> torch.Tensor:
    """memory.py get_neighbours and _prepare_batch (with the typo for "authors")."""
    all_keys = np.stack([m[0] for m in memory])
    key = key.numpy()
    scores = np.dot(all_keys, key.T) / (np.linalg.norm(all_keys, axis=1) * np.linalg.norm(key.T))
    chosen = np.argpartition(scores, -k)[-k:]
    neighbours = [memory[i][1] for i in chosen]
    attention = np.array(scores[chosen] / 0.2)
    attention = np.exp(attention) / np.sum(np.exp(attention))
    ensemble_prediction = neighbours[0] * float(attention[0])
    if ensemble == "weighted_sum":
        for i in range(1, len(neighbours)):
            ensemble_prediction = ensemble_prediction + neighbours[i] * float(attention[i])
    return ensemble_prediction


def distributions(logits: torch.Tensor, multilabel: bool) -> list[torch.Tensor]:
    """(pixels, classes) probabilities: the softmax; for sigmoid outputs one Bernoulli pair per channel."""
    if not multilabel:
        return [F.softmax(logits, dim=1).squeeze(0).flatten(1).T]
    p = torch.sigmoid(logits).squeeze(0).flatten(1)
    return [torch.stack([1 - p[c], p[c]], dim=1) for c in range(p.shape[0])]


def discrepancy(past: torch.Tensor, current: torch.Tensor, multilabel: bool) -> float:
    """models/basemodel.py:252-264, per channel and summed for sigmoid outputs."""
    total = 0.0
    for p, q in zip(distributions(past, multilabel), distributions(current / 4, multilabel), strict=True):
        diff = F.kl_div(p.log(), q, None, None, "none") + F.kl_div(q.log(), p, None, None, "none")
        total += float(diff.sum(dim=1).mean())
    return total


def reference_dltta(net, autoencoders, images, lr, k, memory_size, ensemble, multilabel):
    """opt_ANet image by image (batch size 1), then SegANet.test on the image; yields (lr, convs, prediction)."""
    tnet = copy.deepcopy(net)
    convs = [nn.Conv2d(c, c, 1) for c in (6, 8)]
    for conv in convs:
        conv.weight.data = torch.eye(c := conv.in_channels).reshape(c, c, 1, 1)
        conv.bias.data.zero_()
    optimizer = torch.optim.SGD([p for c in convs for p in c.parameters()], lr)
    generator = torch.Generator().manual_seed(0)
    memory: list = []  # Memory(memory_size - 1): a dict in insertion order
    for x in images:
        with torch.no_grad():
            tnet.train()
            key = run_tnet(tnet, x, key_only=True).flatten(1)[0]
            values = run_tnet(tnet, x)["logits"]
        if len(memory) > k:
            past = retrieve(memory, key, k, ensemble)
            step_lr = math.exp(discrepancy(past[None], values, multilabel)) * lr
        else:
            step_lr = lr * len(memory)
        tnet.eval()
        side = run_tnet(tnet, x, convs)
        loss = 0.0
        levels = [torch.cat([side["d1"], side["u2"]], 1), torch.cat([side["d2"], side["u3"]], 1), side["logits"]]
        for ae, f in zip(autoencoders.nets, levels, strict=True):
            loss = loss + 0.05 * F.mse_loss(ae(f), f)
        loss = loss + 0.05 * l2_reg_ortho(convs, generator)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            tnet.train()
            key = run_tnet(tnet, x, key_only=True).flatten(1)[0]
            values = run_tnet(tnet, x)["logits"][0]
            if len(memory) > memory_size - 1:
                memory.pop(0)
            memory.append((key.numpy(), values))
            tester = copy.deepcopy(tnet).train()  # SegANet.test: train-mode BatchNorm (on a copy: no update here)
            prediction = run_tnet(tester, x, convs)["logits"]
        yield step_lr, [(c.weight.detach().clone(), c.bias.detach().clone()) for c in convs], prediction


@pytest.mark.parametrize("multilabel,ensemble", [(True, "authors"), (False, "authors"), (False, "weighted_sum")])
def test_matches_the_authors_update_rule_step_by_step(multilabel, ensemble, monkeypatch):
    monkeypatch.setattr(DLTTA, "MEMORY_SIZE", 5)  # a bank that drops entries within the stream
    net = ToyUNet(out_channels=2 if multilabel else 3)
    adapter = DLTTA(copy.deepcopy(net), lr=0.05, k=3, ensemble=ensemble, multilabel=multilabel)
    assert adapter.layers.adapted == ("down1", "down2") and adapter.layers.partners == ("up2", "up3")
    autoencoders = copy.deepcopy(adapter.autoencoders)
    images = stream(9)
    expected = reference_dltta(net, autoencoders, images, 0.05, 3, 5, ensemble, multilabel)
    lrs = []
    for x, (lr, convs, prediction) in zip(images, expected, strict=True):
        out = adapter(x)
        lrs.append(float(adapter.last_step.lr))
        assert lrs[-1] == pytest.approx(lr, rel=1e-5)
        for conv, (weight, bias) in zip(adapter.adaptor.convs, convs, strict=True):
            torch.testing.assert_close(conv.weight, weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(conv.bias, bias, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, prediction, rtol=1e-4, atol=1e-5)
    assert lrs[:4] == pytest.approx([0.0, 0.05, 0.1, 0.15])  # warm-up: lr = base * entries while <= k
    assert all(lr > 0.05 for lr in lrs[4:])  # exp(D) > 1
    assert len(adapter.memory) == 5
    moved = max(float((c.weight.flatten(1) - torch.eye(c.in_channels)).abs().max()) for c in adapter.adaptor.convs)
    assert moved > 1e-4  # the comparison is not vacuous


def test_the_authors_ensemble_is_the_kth_nearest_neighbours_weighted_logits():
    adapter = DLTTA(ToyUNet(), k=2, multilabel=False)
    key = torch.tensor([1.0, 0.0])
    bank = [
        (torch.tensor([1.0, 0.1]), torch.full((2, 1, 1), 1.0)),
        (torch.tensor([0.0, 1.0]), torch.full((2, 1, 1), 2.0)),
    ]
    bank.append((torch.tensor([1.0, 0.5]), torch.tensor([3.0, -3.0]).reshape(2, 1, 1)))
    adapter.memory.extend(bank)
    current = torch.tensor([0.5, 0.0]).reshape(2, 1, 1)
    d, n = adapter.discrepancy(key, current)
    cos = torch.tensor([1 / math.hypot(1, 0.1), 1 / math.hypot(1, 0.5)])  # the two nearest, nearest first
    w = torch.softmax(cos / 0.2, dim=0)
    assert n == 3
    torch.testing.assert_close(d, symmetric_kl((w[1] * bank[2][1])[None], current[None] / 4, False))
    adapter.ensemble = "weighted_sum"
    d, _ = adapter.discrepancy(key, current)
    torch.testing.assert_close(d, symmetric_kl((w[0] * bank[0][1] + w[1] * bank[2][1])[None], current[None] / 4, False))


# --- the adapter contract --------------------------------------------------------------------------------------------


def test_reset_restores_the_source_bit_exactly(monkeypatch):
    monkeypatch.setattr(DLTTA, "MEMORY_SIZE", 3)  # a bank that drops entries within the stream
    net = ToyUNet()
    adapter = DLTTA(net, k=2, multilabel=True)
    fresh = DLTTA(copy.deepcopy(ToyUNet()), k=2, multilabel=True)
    network, adaptor = copy.deepcopy(net.state_dict()), copy.deepcopy(adapter.adaptor.state_dict())
    statistics = [t.clone() for t in running(adapter)]
    images = stream(4)
    first = [adapter(x) for x in images]
    adapter.reset()
    assert all(torch.equal(v, network[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(v, adaptor[k]) for k, v in adapter.adaptor.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(statistics, running(adapter), strict=True))
    assert len(adapter.memory) == 0 and adapter.optimizer.state_dict()["state"] == {}
    for x, before in zip(images, first, strict=True):  # the same stream again gives the same predictions
        again = adapter(x)
        assert torch.equal(again, before) and torch.equal(again, fresh(x))


def test_a_batch_with_nan_is_skipped():
    adapter = DLTTA(ToyUNet(), k=1, multilabel=True)
    for x in stream(2):
        adapter(x)
    adaptor = copy.deepcopy(adapter.adaptor.state_dict())
    statistics = [t.clone() for t in running(adapter)]
    bad = stream(1)[0]
    bad[0, 1, 2, 2] = float("inf")
    adapter.adapt_batch(bad)
    assert adapter.n_skipped == 1 and adapter.last_step.skipped and len(adapter.memory) == 2
    assert all(torch.equal(v, adaptor[k]) for k, v in adapter.adaptor.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(statistics, running(adapter), strict=True))


def test_the_first_prediction_is_the_source_network_on_batch_statistics():
    net = ToyUNet()
    x = stream(1)[0]
    with torch.no_grad():
        source = copy.deepcopy(net).train()(x)  # the authors' test: TNet.train(); a fresh adaptor is the identity
    adapter = build_adapter("dltta", net, task="fundus")
    torch.testing.assert_close(adapter(x), source)
    assert float(adapter.last_step.lr) == 0.0
    with_image = DLTTA(ToyUNet(), image_adaptor=True, multilabel=True)  # the authors' random image network changes it
    assert not torch.allclose(with_image(x), source, atol=1e-3)


# --- the pieces ------------------------------------------------------------------------------------------------


def test_layers_found_on_our_networks():
    flexible = find_dltta_layers(resunet())
    assert flexible.adapted == ("encoder.layer1", "encoder.layer2", "encoder.layer3")
    assert flexible.partners == ("decoder.blocks.2", "decoder.blocks.1", "decoder.blocks.0")
    assert (flexible.key, flexible.logits) == ("encoder.layer4", "segmentation_head")
    unet = UNet(
        spatial_dims=2, in_channels=1, out_channels=3, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=2
    )
    slices = find_dltta_layers(SliceWise(unet))
    assert slices.adapted == ("network.model.1.submodule.0",)
    assert slices.key == "network.model.1.submodule.1.submodule.1.submodule" and slices.logits == "network"
    with pytest.raises(ValueError, match="no layer"):
        find_dltta_layers(ToyUNet(), adaptor_layers=["nope"])


def test_a_volume_run_slice_by_slice_is_adapted_per_slice_with_a_key_per_volume():
    unet = UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    adapter = DLTTA(SliceWise(unet), multilabel=False, k=1)
    for _ in range(3):
        out = adapter(torch.rand(1, 1, 16, 16, 3))
    assert out.shape == (1, 3, 16, 16, 3) and bool(torch.isfinite(out).all())
    key, values = adapter.memory[-1]
    assert key.ndim == 1 and values.shape == (3, 16, 16, 3)
    assert float(adapter.last_step.discrepancy) > 0


def test_srip_is_the_squared_spectral_norm_of_wtw_minus_identity():
    generator = torch.Generator().manual_seed(0)
    assert float(srip(torch.eye(4).reshape(4, 4, 1, 1), generator)) == 0.0
    assert float(srip(2 * torch.eye(4).reshape(4, 4, 1, 1), generator)) == pytest.approx(9.0)  # 4I - I = 3I


def test_autoencoder_has_the_authors_layout():
    def conv_block(c_in, c_out, k):  # models/backends.py _ResConvBlock: three convolutions, two PReLUs
        return c_in * c_out * k * k + c_out + 2 * (c_out * c_out * k * k + c_out) + 2

    c, (a, b, d) = 10, (64, 32, 16)
    expected = (
        conv_block(c, a, 3) + conv_block(a, b, 3) + conv_block(b, d, 3) + conv_block(d, d, 1)
        + conv_block(d, b, 3) + conv_block(b, a, 3) + a * c + c
    )  # fmt: skip
    net = FeatureAutoencoder(c)
    assert sum(p.numel() for p in net.parameters()) == expected
    assert net(torch.rand(1, c, 9, 7)).shape == (1, c, 9, 7)


def test_autoencoders_are_fitted_saved_and_found_beside_the_checkpoint(tmp_path):
    net = ToyUNet()
    torch.manual_seed(1)
    source = torch.rand(6, 3, 32, 32)
    untrained = train_autoencoders(net, source, epochs=0)
    fitted = train_autoencoders(net, source, epochs=15)
    x = source[:1]
    losses = []
    for autoencoders in (untrained, fitted):
        adapter = DLTTA(copy.deepcopy(net), autoencoders=autoencoders, multilabel=True)
        adapter(x)  # the first image takes no step (lr 0): its loss is the source network's
        losses.append(float(adapter.last_step.loss_reconstruction))
    assert losses[1] < 0.5 * losses[0]
    save_autoencoders(fitted, str(tmp_path / "dltta_toy.pt"))
    net.checkpoint_path = str(tmp_path / "source_toy.pt")
    found = DLTTA(net, multilabel=True).autoencoders.state_dict()
    assert all(torch.equal(v, fitted.state_dict()[k]) for k, v in found.items())
    with pytest.raises(BadInputError, match="need"):
        DLTTA(ToyUNet(out_channels=3), autoencoders=fitted, multilabel=True)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="k"):
        DLTTA(ToyUNet(), k=DLTTA.MEMORY_SIZE, multilabel=True)
    with pytest.raises(ValueError, match="ensemble"):
        DLTTA(ToyUNet(), ensemble="mean", multilabel=True)


def test_an_interrupted_fit_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(tmp_path):
    net = ToyUNet()
    source = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    whole = train_autoencoders(net, source, epochs=2, batch_size=2)
    resume_path = str(tmp_path / "fit.partial")

    def interrupt_after_first(epoch, loss):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_autoencoders(net, source, epochs=2, batch_size=2, resume_path=resume_path, on_epoch=interrupt_after_first)
    epochs = []
    resumed = train_autoencoders(
        net, source, epochs=2, batch_size=2, resume_path=resume_path, on_epoch=lambda e, loss: epochs.append(e)
    )
    assert epochs == [2]
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value)
    with pytest.raises(BadInputError, match="another fit"):
        train_autoencoders(net, source, epochs=3, batch_size=2, resume_path=resume_path)
