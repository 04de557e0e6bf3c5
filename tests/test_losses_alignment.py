import pytest
import torch
from monai.networks.nets import PatchDiscriminator

from monai_grata.losses import (
    AdversarialAlignmentLoss,
    EntropyAlignmentLoss,
    build_alignment_loss,
    discriminator_loss,
)


def test_entropy_alignment_is_normalised():
    loss = EntropyAlignmentLoss(multilabel=True)
    assert float(loss(torch.zeros(1, 2, 4, 4))) == pytest.approx(1.0)  # p = 0.5 everywhere: maximal
    assert float(loss(torch.full((1, 2, 4, 4), 20.0))) < 1e-6
    softmax = EntropyAlignmentLoss(multilabel=False, weight=0.5)
    assert float(softmax(torch.zeros(1, 3, 4, 4))) == pytest.approx(0.5)


def test_adversarial_alignment_trains_only_the_segmenter():
    torch.manual_seed(0)
    disc = PatchDiscriminator(spatial_dims=2, channels=8, in_channels=2, num_layers_d=2)
    loss = AdversarialAlignmentLoss(disc, weight=0.1, multilabel=True)
    target_logits = torch.randn(2, 2, 32, 32, requires_grad=True)
    loss(target_logits).backward()
    assert target_logits.grad is not None and target_logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())
    d_loss = discriminator_loss(loss, torch.randn(2, 2, 32, 32), target_logits)
    d_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_build_alignment_loss():
    adversarial = build_alignment_loss("adversarial", out_channels=2, weight=0.1, multilabel=True)
    assert isinstance(adversarial, AdversarialAlignmentLoss) and adversarial.weight == 0.1
    assert isinstance(adversarial.discriminator, PatchDiscriminator)
    assert isinstance(build_alignment_loss("entropy", multilabel=True), EntropyAlignmentLoss)
    with pytest.raises(ValueError, match="alignment must be adversarial or entropy, got 'mmd'"):
        build_alignment_loss("mmd", multilabel=True)


def test_the_outputs_activation_has_no_default():
    for build in (EntropyAlignmentLoss, lambda: build_alignment_loss("entropy")):
        with pytest.raises(ValueError, match="multilabel=True for sigmoid.*multilabel=False for softmax"):
            build()
