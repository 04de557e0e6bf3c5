"""The authors' ResUnet (VPTTA's ``OPTIC/networks/ResUnet.py``, the network GraTa's code adapts), on MONAI's ResNet.

Encoder: a torchvision-style ResNet (7×7 stride-2 stem, BatchNorm, ReLU, max-pool, four stages; 1×1 convolution +
BatchNorm shortcuts where the shape changes), built as ``monai.networks.nets.ResNet``. Its five feature maps are
those of ``monai.networks.nets.resnet.ResNetFeatures`` (the encoder FlexibleUNet uses), but with the ``"B"``
(convolution + BatchNorm) shortcut of the authors' ResNet-34 instead of the zero-padding ``"A"`` shortcut MONAI
picks for ``resnet18``/``resnet34``.

Decoder (the authors' ``UnetBlock``): the upsampled input (2×2 transposed convolution to ``n_out / 2`` channels)
and the skip features (1×1 convolution to ``n_out / 2`` channels) are concatenated, then ReLU, then BatchNorm —
``BN(ReLU(concat))`` — at 256 channels in all four blocks; then a 2×2 transposed convolution to 32 channels at the
input resolution, BatchNorm, ReLU and a 1×1 segmentation head. Every BatchNorm has PyTorch's defaults (eps 1e-5,
momentum 0.1). For ResNet-34 that is 36 BatchNorm layers in the encoder and 5 in the decoder (41).

The state-dict keys are the authors' (``res.*``, ``up1.*`` … ``up4.*``, ``up5``, ``bnout``, ``seg_head``), so one of
their checkpoints loads after dropping its unused ImageNet classifier (``res.fc.*``, which this encoder does not
build). Unlike theirs, ``forward`` returns the logits only (not ``(logits, skip_features)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm
from monai.networks.nets.resnet import ResNet, ResNetFeatures, get_inplanes, resnet_params
from torch import nn

__all__ = ["AuthorsResUNet", "UnetBlock"]


class _ResNetFeaturesB(ResNet):
    """MONAI's ResNet without classifier, returning the five feature maps as ``ResNetFeatures`` does."""

    forward = ResNetFeatures.forward


class UnetBlock(nn.Module):
    """One decoder block of the authors' ResUnet: ``BN(ReLU(cat(up(x), conv1x1(skip))))``.

    Args:
        up_in: channels of the input to upsample.
        x_in: channels of the skip features.
        n_out: output channels (half from each path).
        spatial_dims: 2 or 3.
    """

    def __init__(self, up_in: int, x_in: int, n_out: int, spatial_dims: int = 2) -> None:
        super().__init__()
        half = n_out // 2
        self.x_conv = Conv[Conv.CONV, spatial_dims](x_in, half, 1)
        self.tr_conv = Conv[Conv.CONVTRANS, spatial_dims](up_in, half, 2, stride=2)
        self.bn = Norm[Norm.BATCH, spatial_dims](n_out)

    def forward(self, up_p: torch.Tensor, x_p: torch.Tensor) -> torch.Tensor:
        cat_p = torch.cat([self.tr_conv(up_p), self.x_conv(x_p)], dim=1)
        return self.bn(F.relu(cat_p))


class AuthorsResUNet(nn.Module):
    """The authors' ResUnet: a ResNet encoder and a U-Net decoder with BatchNorm after each concatenation.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: channels of the input image.
        out_channels: output channels (logits).
        backbone: ``"resnet18"``, ``"resnet34"`` (the authors'), ``"resnet50"``, ``"resnet101"`` or ``"resnet152"``.
        decoder_channels: channels of the four decoder blocks (256 in the authors' code).
        head_channels: channels of the output block before the 1×1 head (32 in the authors' code).

    Input sides must be multiples of 32. No pretrained weights (the authors initialise the encoder from ImageNet,
    which cannot be downloaded offline); the encoder's convolutions are Kaiming-normal (fan-out) and its BatchNorm
    weights 1 and biases 0, as in the authors' ResNet; the decoder keeps PyTorch's default initialisation, as theirs.

    Raises:
        ValueError: an unknown backbone.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 2,
        backbone: str = "resnet34",
        decoder_channels: int = 256,
        head_channels: int = 32,
    ) -> None:
        super().__init__()
        if backbone not in resnet_params or backbone == "resnet10" or backbone == "resnet200":
            raise ValueError(f"unknown backbone {backbone!r} for the authors' ResUnet; choose resnet18/34/50/101/152")
        block, layers = resnet_params[backbone][:2]
        self.res = _ResNetFeaturesB(
            block=block,
            layers=layers,
            block_inplanes=get_inplanes(),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_stride=2,
            shortcut_type="B",
            feed_forward=False,
            bias_downsample=False,
        )
        expansion = 1 if block == "basic" else 4
        skips = [64] + [c * expansion for c in get_inplanes()]  # stem, layer1 .. layer4
        self.up1 = UnetBlock(skips[4], skips[3], decoder_channels, spatial_dims)
        self.up2 = UnetBlock(decoder_channels, skips[2], decoder_channels, spatial_dims)
        self.up3 = UnetBlock(decoder_channels, skips[1], decoder_channels, spatial_dims)
        self.up4 = UnetBlock(decoder_channels, skips[0], decoder_channels, spatial_dims)
        self.up5 = Conv[Conv.CONVTRANS, spatial_dims](decoder_channels, head_channels, 2, stride=2)
        self.bnout = Norm[Norm.BATCH, spatial_dims](head_channels)
        self.seg_head = Conv[Conv.CONV, spatial_dims](head_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sfs = self.res(x)
        x = F.relu(sfs[4])
        x = self.up1(x, sfs[3])
        x = self.up2(x, sfs[2])
        x = self.up3(x, sfs[1])
        x = self.up4(x, sfs[0])
        return self.seg_head(F.relu(self.bnout(self.up5(x))))
