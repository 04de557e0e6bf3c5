"""GraTa's strong intensity augmentation, batched, per sample and per channel, on the tensor's device."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = ["StrongIntensityAug", "StrongIntensityAugd"]

_EPS = 1e-8


def _minmax(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """1-D Gaussian kernels, one row per sigma; a sigma of 0 gives the identity (a delta)."""
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    safe = sigma.clamp_min(1e-3)[:, None]
    kernels = torch.exp(-0.5 * (offsets[None] / safe) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    delta = (offsets == 0).to(sigma.dtype)[None].expand_as(kernels)
    return torch.where(sigma[:, None] > 0, kernels, delta)


class StrongIntensityAug(Transform):
    """The strong intensity view of GraTa (Algorithm 1), drawn independently for every sample and channel.

    Steps, in order, each with its own probability and an independent draw per sample (and per channel
    where stated), on a (B, C, *spatial) batch:

    1. multiplicative brightness, factor in ``brightness`` (p ``prob_brightness`` per sample and channel);
    2. contrast around the channel mean, factor in ``contrast``, clipped to the channel's former range
       (p ``prob_contrast`` per sample and channel);
    3. gamma in ``gamma`` on the inverted image (p ``prob_gamma`` per sample and channel; like
       batchgenerators, half of the draws are below 1 and half above);
    4. additive Gaussian noise (p ``prob_noise`` per sample);
    5. Gaussian blur, sigma in ``blur_sigma`` (p ``prob_blur_sample`` per sample, then
       ``prob_blur_channel`` per channel, own sigma per channel), along ``blur_axes`` (every spatial axis by
       default; a side shorter than the kernel gets the kernel truncated to it);
    6. min-max rescale of every sample to [0, 1].

    Why not MONAI's ``RandScaleIntensity``/``RandAdjustContrast``/``RandGaussianNoise``/
    ``RandGaussianSmooth``: they draw one random value per call (the whole batch and all channels get
    the same augmentation) and draw with numpy, which forces a host round-trip per call. Here every
    draw is a tensor on the input's device, from a ``torch.Generator`` seeded by ``seed``.

    Deviation from the listed settings: the noise level ``noise_std`` is drawn in [0, 0.05] and used as
    the standard deviation, as batchgenerators (the authors' augmentation library) uses its
    ``noise_variance`` draw; blur pads by reflection.

    Works on images (B, C, H, W) and volumes (B, C, H, W, D) alike; for volumes of thick slices
    ``blur_axes=(-3, -2)`` keeps the blur in the axial plane.

    Args:
        brightness: range of the multiplicative brightness factor.
        contrast: range of the contrast factor.
        gamma: range of gamma.
        noise_std: range of the noise level (see above).
        blur_sigma: range of the blur sigma, in pixels.
        prob_brightness: probability per sample and channel.
        prob_contrast: probability per sample and channel.
        prob_gamma: probability per sample and channel.
        prob_noise: probability per sample.
        prob_blur_sample: probability per sample that blur is considered.
        prob_blur_channel: probability per channel of a considered sample.
        blur_axes: the spatial axes blurred, as negative axes of the batch (default ``None``: all of them).
        seed: seed of the generator; the same seed gives the same output on the same device.
    """

    def __init__(
        self,
        brightness: tuple[float, float] = (0.5, 1.5),
        contrast: tuple[float, float] = (0.5, 1.5),
        gamma: tuple[float, float] = (0.5, 2.0),
        noise_std: tuple[float, float] = (0.0, 0.05),
        blur_sigma: tuple[float, float] = (0.5, 1.5),
        prob_brightness: float = 0.75,
        prob_contrast: float = 0.75,
        prob_gamma: float = 0.75,
        prob_noise: float = 0.5,
        prob_blur_sample: float = 0.5,
        prob_blur_channel: float = 0.5,
        blur_axes: tuple[int, ...] | None = None,
        seed: int | None = 0,
    ) -> None:
        for name, (low, high) in {
            "brightness": brightness,
            "contrast": contrast,
            "gamma": gamma,
            "noise_std": noise_std,
            "blur_sigma": blur_sigma,
        }.items():
            if not 0 <= low <= high:
                raise ValueError(f"{name} range must satisfy 0 <= low <= high, got ({low}, {high})")
        if not gamma[0] <= 1 <= gamma[1]:
            raise ValueError(f"gamma range must contain 1, got {gamma}")
        self.brightness, self.contrast, self.gamma = brightness, contrast, gamma
        self.noise_std, self.blur_sigma = noise_std, blur_sigma
        self.prob_brightness, self.prob_contrast, self.prob_gamma = prob_brightness, prob_contrast, prob_gamma
        self.prob_noise, self.prob_blur_sample, self.prob_blur_channel = prob_noise, prob_blur_sample, prob_blur_channel
        if blur_axes is not None and any(a >= 0 for a in blur_axes):
            raise ValueError(f"blur_axes must be negative axes of the batch, e.g. (-3, -2), got {blur_axes}")
        self.blur_axes = None if blur_axes is None else tuple(blur_axes)
        self._generators: dict[torch.device, torch.Generator] = {}
        self.set_random_state(seed)

    def set_random_state(self, seed: int | None = None) -> StrongIntensityAug:
        """Reseed: the next calls repeat the draws made after any earlier call with the same seed.

        Args:
            seed: the seed; ``None`` draws one from torch's global generator.
        """
        self.seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else int(seed)
        self._generators.clear()
        return self

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _uniform(self, shape: tuple[int, ...], low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        u = torch.rand(shape, generator=self._generator(like.device), device=like.device, dtype=like.dtype)
        return low + (high - low) * u

    def _chance(self, shape: tuple[int, ...], prob: float, like: torch.Tensor) -> torch.Tensor:
        return self._uniform(shape, 0.0, 1.0, like) < prob

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: a batch of shape (B, C, *spatial), intensities in [0, 1].

        Returns:
            The augmented batch, same shape, every sample min-max rescaled to [0, 1].
        """
        if x.ndim < 3:
            raise ValueError(f"expected a batch (B, C, *spatial), got shape {tuple(x.shape)}")
        x = torch.as_tensor(x).float()
        b, c = x.shape[:2]
        per_channel = (b, c) + (1,) * (x.ndim - 2)
        per_sample = (b,) + (1,) * (x.ndim - 1)
        spatial = tuple(range(2, x.ndim))

        factor = self._uniform(per_channel, *self.brightness, x)
        x = torch.where(self._chance(per_channel, self.prob_brightness, x), x * factor, x)

        mean = x.mean(dim=spatial, keepdim=True)
        low, high = _minmax(x, spatial)
        factor = self._uniform(per_channel, *self.contrast, x)
        contrasted = torch.minimum(torch.maximum((x - mean) * factor + mean, low), high)
        x = torch.where(self._chance(per_channel, self.prob_contrast, x), contrasted, x)

        x = torch.where(self._chance(per_channel, self.prob_gamma, x), self._inverted_gamma(x, per_channel, spatial), x)

        std = self._uniform(per_sample, *self.noise_std, x)
        noise = torch.randn(x.shape, generator=self._generator(x.device), device=x.device, dtype=x.dtype)
        x = torch.where(self._chance(per_sample, self.prob_noise, x), x + noise * std, x)

        x = self._blur(x)

        low, high = _minmax(x, tuple(range(1, x.ndim)))
        return (x - low) / (high - low).clamp_min(_EPS)

    def _inverted_gamma(self, x: torch.Tensor, shape: tuple[int, ...], spatial: tuple[int, ...]) -> torch.Tensor:
        below = self._uniform(shape, self.gamma[0], 1.0, x)
        above = self._uniform(shape, max(self.gamma[0], 1.0), self.gamma[1], x)
        gamma = torch.where(self._chance(shape, 0.5, x), below, above)
        inverted = -x
        low, high = _minmax(inverted, spatial)
        rng = high - low
        out = ((inverted - low) / rng.clamp_min(_EPS)).clamp_min(0) ** gamma * rng + low
        return -out

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        sample = self._chance((b, 1), self.prob_blur_sample, x)
        channel = self._chance((b, c), self.prob_blur_channel, x)
        sigma = self._uniform((b, c), *self.blur_sigma, x) * (sample & channel)
        out = x.reshape(1, b * c, *x.shape[2:])
        n_spatial = x.ndim - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[n_spatial - 1]
        axes = range(n_spatial) if self.blur_axes is None else sorted({n_spatial + a for a in self.blur_axes})
        for axis in axes:
            radius = min(max(1, math.ceil(4 * self.blur_sigma[1])), x.shape[2 + axis] - 1)  # reflect pads < side
            if radius < 1:
                continue
            kernels = _gaussian_kernels(sigma.reshape(-1), radius)  # (B*C, K)
            shape = [b * c, 1] + [1] * n_spatial
            shape[2 + axis] = kernels.shape[1]
            pad = [0, 0] * n_spatial
            pad[2 * (n_spatial - 1 - axis)] = pad[2 * (n_spatial - 1 - axis) + 1] = radius
            out = conv(F.pad(out, pad, mode="reflect"), kernels.reshape(shape), groups=b * c)
        return out.reshape(x.shape)


class StrongIntensityAugd(MapTransform):
    """Dictionary version of :class:`StrongIntensityAug`; keyword arguments are passed through.

    Args:
        keys: keys of the batches to augment.
        allow_missing_keys: do not raise when a key is absent.
        kwargs: the arguments of :class:`StrongIntensityAug`.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = StrongIntensityAug(**kwargs)

    def set_random_state(self, seed: int | None = None) -> StrongIntensityAugd:
        self.transform.set_random_state(seed)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
