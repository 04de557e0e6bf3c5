"""DLTTA (Yang et al., IEEE TMI 2022, "DLTTA: Dynamic Learning Rate for Test-Time Adaptation on Cross-Domain Medical
Images") as the authors' segmentation code runs it (github.com/med-air/DLTTA, whose adaptor and autoencoders come from
He et al.'s github.com/heyufan1995/self-domain-adapted-network): 1×1-convolution adaptors inside the frozen task
network, trained by the reconstruction error of autoencoders fitted to the source network's features plus an
orthogonality term, with a learning rate that grows with the discrepancy between the current prediction and a memory
bank of past ones.

File references below are to those two repositories: ``models/basemodel.py``, ``memory.py``, ``train.py``,
``models/segmodel.py`` (DLTTA) and ``models/adapmodel.py``, ``utils/util.py`` (He et al., imported by DLTTA).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv, Norm, Pool, SkipConnection
from torch import nn

from monai_grata.data.checks import BadInputError, MissingInputError
from monai_grata.networks.denoiser import tap_features
from monai_grata.utils.files import atomic_write

from .base import GradientAdapter, register_adapter, require_multilabel
from .normalization import AdaptiveBatchNorm, BatchNormPolicy, adaptive_batch_norms, convert_to_adaptive_batch_norm
from .steps import AdaptationStep

__all__ = [
    "DLTTA",
    "DLTTALayers",
    "DLTTAStep",
    "FeatureAdaptor",
    "FeatureAutoencoder",
    "FeatureAutoencoders",
    "default_autoencoder_path",
    "find_dltta_layers",
    "load_autoencoders",
    "save_autoencoders",
    "srip",
    "symmetric_kl",
    "train_autoencoders",
]

logger = logging.getLogger(__name__)

#: the name of the image level of the reconstruction (the adapted input, with ``image_adaptor``)
IMAGE = "<image>"
#: the authors' autoencoder widths (``aenet_dim`` 64, models/basemodel.py:78-87): feature levels, image and logits
FEATURE_HIDDEN, SINGLE_HIDDEN = (64, 32, 16), (32, 16, 8)
ENSEMBLES = ("authors", "weighted_sum")


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Mean over pixels of KL(p||q) + KL(q||p), summed over the classes (softmax) or over the channels' Bernoulli
    distributions (sigmoid).

    Args:
        p_logits: logits (B, C, *spatial).
        q_logits: logits of the same shape.
        multilabel: sigmoid per channel (True) or softmax over the channels (False).
    """
    if multilabel:
        log_p = torch.stack([F.logsigmoid(-p_logits), F.logsigmoid(p_logits)])
        log_q = torch.stack([F.logsigmoid(-q_logits), F.logsigmoid(q_logits)])
        dim = (0, 2)
    else:
        log_p, log_q, dim = F.log_softmax(p_logits, dim=1), F.log_softmax(q_logits, dim=1), 1
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=dim).mean()


def srip(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The orthogonality term of the authors' adaptor (SRIP, He et al.'s ``utils/util.py`` ``l2_reg_ortho``): the
    square of the spectral norm of WᵀW − I, estimated by one power iteration from a random unit vector, with the
    gradient flowing through the iteration as in their code.

    Args:
        weight: a convolution weight (out, in, *kernel); W is it reshaped to (out, in · kernel).
        generator: the random generator of the start vector (CPU).
    """
    cols = weight[0].numel()
    w = weight.reshape(-1, cols)
    gram = w.t() @ w - torch.eye(cols, dtype=w.dtype, device=w.device)
    start = torch.randn(cols, generator=generator).to(w)
    u = F.normalize(start, dim=0, eps=1e-12)
    v = F.normalize(gram.t() @ u, dim=0, eps=1e-12)
    u = F.normalize(gram @ v, dim=0, eps=1e-12)
    return torch.dot(u, gram @ v) ** 2


# --- where the adaptor sits -------------------------------------------------------------------------------------------


@dataclass
class DLTTALayers:
    """Where DLTTA reads and changes a network (names as in ``model.named_modules()``).

    Args:
        adapted: the layers whose output a 1×1 convolution of the adaptor transforms.
        partners: per adapted layer, the decoder layer at the same resolution whose output its autoencoder also
            reconstructs (concatenated), or ``None``.
        key: the layer whose output (the bottleneck) is the memory key.
        logits: the layer whose output is the network's logits (the last one to run).
        channels: output channels of every layer above, and of the image under :data:`IMAGE`.
        spatial_dims: spatial dimensions of those outputs (of the image under :data:`IMAGE`).
    """

    adapted: tuple[str, ...]
    partners: tuple[str | None, ...]
    key: str
    logits: str
    channels: dict[str, int] = field(default_factory=dict)
    spatial_dims: dict[str, int] = field(default_factory=dict)


def _first_conv(model: nn.Module) -> nn.modules.conv._ConvNd:
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None:
        raise ValueError(f"{type(model).__name__} has no convolution: cannot tell its input")
    return first


def _input_module(model: nn.Module) -> nn.Module:
    """The module that takes the image: the 2D network inside a slice-by-slice wrapper (SliceWise), else the model."""
    return model.network if hasattr(model, "as_volumes") and hasattr(model, "network") else model


@dataclass
class _Run:
    """One module's run in a forward: its output, when it started and finished (one clock for all modules), and
    whether it upsamples (a tensor input of fewer pixels than its output)."""

    name: str
    output: torch.Tensor
    start: int
    end: int
    upsamples: bool


def _spatial_size(t: object) -> int | None:
    return math.prod(t.shape[2:]) if torch.is_tensor(t) and t.ndim >= 3 else None


def _probe_forward(model: nn.Module, probe: torch.Tensor, handles: list) -> None:
    """One no-grad eval-mode forward of ``probe`` for the hooks in ``handles``; the hooks are removed and the
    model's train/eval mode restored afterwards, whatever happens."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(probe)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _layer_runs(model: nn.Module, probe: torch.Tensor) -> tuple[list[_Run], float]:
    """The runs of every named module with a tensor output (at least one spatial axis), in the order they finish,
    and the clock at which the first upsampling module started (the decoder); a container that returns its last
    child's tensor is kept once, under its own name. MONAI's SkipConnection is left out (its output concatenates a
    skip with its submodule's)."""
    clock, started, runs = [0], {}, []

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    def before(name: str, args: tuple) -> None:
        started[name] = (tick(), _spatial_size(args[0]) if args else None)

    def after(name: str, out: object) -> None:
        begin, size_in = started.pop(name)
        size_out = _spatial_size(out)
        if size_out is not None:
            runs.append(_Run(name, out, begin, tick(), size_in is not None and size_out > size_in))

    handles = []
    for name, module in model.named_modules():
        if name and not isinstance(module, SkipConnection):
            handles.append(module.register_forward_pre_hook(lambda m, args, n=name: before(n, args)))
            handles.append(module.register_forward_hook(lambda m, args, out, n=name: after(n, out)))
    _probe_forward(model, probe, handles)
    rise = min((run.start for run in runs if run.upsamples), default=math.inf)
    kept: list[_Run] = []
    for run in runs:
        if kept and kept[-1].output is run.output:  # the container's output is an upsampling child's, it upsamples
            kept[-1] = _Run(run.name, run.output, run.start, run.end, run.upsamples or kept[-1].upsamples)
        else:
            kept.append(run)
    return kept, rise


def find_dltta_layers(
    model: nn.Module,
    adaptor_layers: Sequence[str] | None = None,
    key_layer: str | None = None,
    probe_size: int = 64,
) -> DLTTALayers:
    """Find where DLTTA's adaptor sits in ``model``, from one forward of a probe (eval mode, no gradient).

    The authors' task network (models/backends.py ``UNet``: an input block, three down blocks, a bottleneck) gets
    its 1×1 convolutions after the three down blocks (``--seq=1,2,3``, scripts/test_oct.sh; models/adapmodel.py
    ``ANet.forward``), not after the input block nor after the bottleneck, and its memory key is the bottleneck's
    output (models/backends.py ``UNet.forward`` with ``adaptive=True``). Here the encoder's levels are read from the
    probe: the modules that finish before the first upsampling module (one whose output has more pixels than its
    input) starts form the encoder; each resolution on its way down is one level, ending at the last module that
    outputs it. The adaptor goes after every level but the first and the deepest; the deepest is the key. So
    FlexibleUNet's ResNet encoder (stem, ``layer1`` … ``layer4``: five levels as the authors' network has) is adapted
    after ``layer1`` to ``layer3`` with ``layer4`` as key, and MONAI's ``UNet`` after its second down unit with its
    bottom unit as key. (On the authors' own network the rule would leave out their third down block, which shares
    the bottleneck's resolution.) A network with fewer than three levels is adapted after its deepest level, which is
    also the key.

    Each adapted level is reconstructed together with the decoder's output at the same resolution (the authors'
    levels concatenate a down feature with the up feature of its size, models/basemodel.py:73-76): the output of the
    last upsampling module (or its container) at that resolution.

    Args:
        model: the network (2D, 3D, or 2D slice by slice).
        adaptor_layers: the layers to adapt instead (their outputs).
        key_layer: the layer whose output is the key instead.
        probe_size: side of the probe input (the network must accept it).

    Raises:
        ValueError: a name that is not a module whose tensor output the forward computes, or a network without levels.
    """
    first = _first_conv(model)
    spatial = len(first.kernel_size)
    device = next(model.parameters()).device
    probe = torch.rand((2, first.in_channels) + (probe_size,) * spatial, generator=torch.Generator().manual_seed(0))
    runs, rise = _layer_runs(model, probe.to(device))
    if len(runs) < 2:
        raise ValueError(f"{type(model).__name__} has too few layers for DLTTA: name adaptor_layers and key_layer")
    logits_name = runs[-1].name
    levels: list[_Run] = []
    for run in runs[:-1]:
        if run.end > rise:  # the decoder has begun
            break
        if all(s == 1 for s in run.output.shape[2:]):  # a global pooling, not a level
            continue
        if levels and _spatial_size(run.output) == _spatial_size(levels[-1].output):
            levels[-1] = run
        elif not levels or _spatial_size(run.output) < _spatial_size(levels[-1].output):
            levels.append(run)
    if not levels:
        raise ValueError(f"{type(model).__name__} has no encoder level DLTTA can find: name adaptor_layers, key_layer")
    names = [run.name for run in levels]
    adapted = list(adaptor_layers) if adaptor_layers is not None else (names[1:-1] if len(names) >= 3 else names[-1:])
    key = key_layer if key_layer is not None else names[-1]
    known = {run.name: run.output for run in runs}
    all_named = {name for name, _ in model.named_modules()}
    for name in [*adapted, key]:
        if name not in all_named:
            raise ValueError(f"{type(model).__name__} has no layer {name!r}")
    missing = [n for n in [*adapted, key] if n not in known]
    if missing:  # a layer inside a container kept under the container's name: probe its own output
        known.update(_named_outputs(model, probe.to(device), missing))
    partners = []
    for name in adapted:
        shape = known[name].shape[2:]
        ups = [run.name for run in runs if run.upsamples and run.output.shape[2:] == shape]
        partners.append(ups[-1] if ups else None)
    named = [*adapted, *(p for p in partners if p), key, logits_name]
    channels = {n: int(known[n].shape[1]) for n in named}
    dims = {n: known[n].ndim - 2 for n in named}
    channels[IMAGE], dims[IMAGE] = first.in_channels, spatial
    return DLTTALayers(tuple(adapted), tuple(partners), key, logits_name, channels, dims)


def _named_outputs(model: nn.Module, probe: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    taken: dict[str, object] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: taken.setdefault(n, out)) for n in names]
    _probe_forward(model, probe, handles)
    bad = [n for n in names if not torch.is_tensor(taken.get(n)) or taken[n].ndim < 3]
    if bad:
        raise ValueError(f"{type(model).__name__}'s forward gives no feature map from {bad}: name other layers")
    return taken


# --- the adaptor --------------------------------------------------------------------------------------------------


def _identity_conv(channels: int, spatial_dims: int) -> nn.Module:
    """A 1×1 convolution initialised to the identity (models/adapmodel.py ``init_weights_eye``)."""
    conv = Conv[Conv.CONV, spatial_dims](channels, channels, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).reshape(channels, channels, *(1,) * spatial_dims))
        conv.bias.zero_()
    return conv


def _image_network(channels: int, spatial_dims: int, width: int = 64) -> nn.Sequential:
    """The authors' image-level adaptor (models/adapmodel.py ``ANet.adpNet``): three 1×1 convolutions, each followed
    by LeakyReLU(0.2) and instance normalisation, initialised by Kaiming-normal weights drawn from seed 0 each and zero
    biases (``init_weights``)."""
    conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.INSTANCE, spatial_dims]
    layers: list[nn.Module] = []
    for c_in, c_out in ((channels, width), (width, width), (width, channels)):
        layers += [conv(c_in, c_out, 1), nn.LeakyReLU(0.2), norm(c_out)]
    for module in layers:
        if isinstance(module, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(module.weight, generator=torch.Generator().manual_seed(0))
            nn.init.zeros_(module.bias)
    return nn.Sequential(*layers)


class FeatureAdaptor(nn.Module):
    """DLTTA's adaptor: a 1×1 convolution (identity at the start) on the output of each adapted layer of the frozen
    network, and optionally the authors' image-level network on its input, attached by forward hooks so that every
    forward of the network — an evaluator's prediction included — runs through it.

    While :attr:`record` is a dict, the hooks also keep each adapted output, each partner's and the logits (and the
    adapted image) in it, for the reconstruction loss; with :attr:`enabled` False the network runs as the source.

    Args:
        layers: where it sits (:func:`find_dltta_layers`).
        image_adaptor: add the image-level network.
    """

    def __init__(self, layers: DLTTALayers, image_adaptor: bool = False) -> None:
        super().__init__()
        self.layers = layers
        self.convs = nn.ModuleList(_identity_conv(layers.channels[n], layers.spatial_dims[n]) for n in layers.adapted)
        self.image = _image_network(layers.channels[IMAGE], layers.spatial_dims[IMAGE]) if image_adaptor else None
        self.enabled = True
        self.record: dict[str, torch.Tensor] | None = None
        self._handles: list = []

    def attach(self, model: nn.Module) -> None:
        """Hook the adaptor into ``model`` (the network :attr:`layers` describes)."""
        modules = dict(model.named_modules())
        self._handles.append(_input_module(model).register_forward_pre_hook(self._adapt_image))
        for index, name in enumerate(self.layers.adapted):
            self._handles.append(modules[name].register_forward_hook(self._adapt_output(index, name)))
        for name in {p for p in self.layers.partners if p} | {self.layers.logits}:
            self._handles.append(modules[name].register_forward_hook(self._keep(name)))

    def remove(self) -> None:
        """Take the hooks out of the network."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside, the network runs without the adaptor (the authors' frozen task network)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def _adapt_image(self, module: nn.Module, args: tuple) -> tuple | None:
        adapt = self.enabled and self.image is not None
        image = self.image(args[0]) if adapt else args[0]
        if self.record is not None:
            self.record[IMAGE] = image
        return (image, *args[1:]) if adapt else None

    def _adapt_output(self, index: int, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            adapted = self.convs[index](output) if self.enabled else output
            if self.record is not None:
                self.record[name] = adapted
            return adapted

        return hook

    def _keep(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.record is not None:
                self.record[name] = output

        return hook


# --- the autoencoders ------------------------------------------------------------------------------------------


class _ResidualBlock(nn.Module):
    """The authors' ``ConvBlock`` (models/backends.py ``_ResConvBlock``): a convolution, then PReLU of the sum of it and
    conv → norm → PReLU → conv → norm of it (instance normalisation in the autoencoders)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, spatial_dims: int) -> None:
        super().__init__()
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.INSTANCE, spatial_dims]
        pad = kernel // 2
        self.conv = conv(in_channels, out_channels, kernel, padding=pad)
        self.body = nn.Sequential(
            conv(out_channels, out_channels, kernel, padding=pad),
            norm(out_channels),
            nn.PReLU(),
            conv(out_channels, out_channels, kernel, padding=pad),
            norm(out_channels),
        )
        self.act = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv(x)
        return self.act(self.body(residual) + residual)


class FeatureAutoencoder(nn.Module):
    """The authors' autoencoder of one level (models/basemodel.py ``def_AENet``: backends ``UNet`` with ``skip=False,
    isn=True``): a U-Net without skip connections — an input block, a max-pooled block per further width, a 1×1
    bottleneck block, and back up by (bi/tri)linear resizing to the sizes on the way down — then a 1×1 convolution to
    the input's channels. Max pooling rounds up (``ceil_mode``) and skips maps under 4 pixels a side, so odd and small
    sizes work (the same as the authors' for even sizes of at least 4 · 2^(depth - 1)).

    Args:
        channels: channels of the reconstructed tensor.
        hidden: widths from the top down (the authors': (64, 32, 16) for feature levels, (32, 16, 8) for the image and
            the logits).
        spatial_dims: 2 or 3.
    """

    def __init__(self, channels: int, hidden: Sequence[int] = FEATURE_HIDDEN, spatial_dims: int = 2) -> None:
        super().__init__()
        h = [int(c) for c in hidden]
        self.inblock = _ResidualBlock(channels, h[0], 3, spatial_dims)
        self.down = nn.ModuleList(_ResidualBlock(h[i], h[i + 1], 3, spatial_dims) for i in range(len(h) - 1))
        self.bottleneck = _ResidualBlock(h[-1], h[-1], 1, spatial_dims)
        self.up = nn.ModuleList(_ResidualBlock(h[i + 1], h[i], 3, spatial_dims) for i in range(len(h) - 1))
        self.head = Conv[Conv.CONV, spatial_dims](h[0], channels, 1)
        self.pool = Pool[Pool.MAX, spatial_dims](2, ceil_mode=True)
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inblock(x)
        sizes = [x.shape[2:]]
        for block in self.down:
            x = block(self.pool(x) if min(x.shape[2:]) >= 4 else x)  # instance norm needs more than one pixel
            sizes.append(x.shape[2:])
        x = self.bottleneck(x)
        for i in reversed(range(len(self.up))):
            x = self.up[i](F.interpolate(x, size=sizes[i], mode=self.mode, align_corners=True))
        return self.head(x)


def _level_specs(layers: DLTTALayers, image_adaptor: bool) -> list[dict]:
    """The reconstruction levels: the adapted image (with ``image_adaptor``), each adapted layer with its partner,
    the logits (the authors' ``--wt=1,0,1,1,1,1``: image, adapted levels and logits weigh 1, the input block's 0)."""
    specs = []
    if image_adaptor:
        specs.append({"layers": [IMAGE], "hidden": list(SINGLE_HIDDEN)})
    for name, partner in zip(layers.adapted, layers.partners, strict=True):
        specs.append({"layers": [name, partner] if partner else [name], "hidden": list(FEATURE_HIDDEN)})
    specs.append({"layers": [layers.logits], "hidden": list(SINGLE_HIDDEN)})
    for spec in specs:
        spec["channels"] = sum(layers.channels[n] for n in spec["layers"])
        spec["spatial_dims"] = layers.spatial_dims[spec["layers"][0]]
    return specs


class FeatureAutoencoders(nn.Module):
    """One :class:`FeatureAutoencoder` per reconstruction level, and the loss they give: the sum over levels of the
    mean squared error between a level's features (the named outputs concatenated over channels) and their
    reconstruction (the authors' ``AELoss`` and ``AELoss_out``, both MSE, models/segmodel.py ``def_loss``).

    Args:
        levels: per level, ``layers`` (the names whose outputs it concatenates; :data:`IMAGE` for the adapted image),
            ``channels``, ``spatial_dims`` and ``hidden`` (widths).
    """

    def __init__(self, levels: Sequence[dict]) -> None:
        super().__init__()
        self.levels = [dict(level) for level in levels]
        self.nets = nn.ModuleList(
            FeatureAutoencoder(level["channels"], level["hidden"], level["spatial_dims"]) for level in self.levels
        )

    def loss(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum over levels of MSE(autoencoder(f), f), f the level's features taken from ``features`` (name → tensor);
        the gradient flows through both f's (the input and the target, as in the authors' code)."""
        total = torch.zeros(())
        for level, net in zip(self.levels, self.nets, strict=True):
            parts = [features[n] for n in level["layers"]]
            if len({p.shape[2:] for p in parts}) > 1:
                raise ValueError(f"the outputs of {level['layers']} differ in size: {[tuple(p.shape) for p in parts]}")
            f = torch.cat(parts, dim=1)
            total = total.to(f) + F.mse_loss(net(f), f)
        return total


def default_autoencoder_path(ckpt_path: str) -> str:
    """The autoencoders shipped beside a source checkpoint: ``source_<name>.pt`` → ``dltta_<name>.pt``."""
    folder, name = os.path.split(ckpt_path)
    name = name[len("source_") :] if name.startswith("source_") else name
    return os.path.join(folder, "dltta_" + name)


def save_autoencoders(autoencoders: FeatureAutoencoders, path: str) -> None:
    """Save the autoencoders' levels and weights to one file (read by :func:`load_autoencoders`); an interrupted
    save leaves the previous file, or none."""
    with atomic_write(path, "wb") as f:
        torch.save({"levels": autoencoders.levels, "state_dict": autoencoders.state_dict()}, f)


def load_autoencoders(path: str) -> FeatureAutoencoders:
    """Rebuild the autoencoders :func:`save_autoencoders` wrote.

    Raises:
        MissingInputError: (a ``FileNotFoundError``) no such file.
        BadInputError: (a ``ValueError``) a file that :func:`save_autoencoders` did not write.
    """
    if not os.path.isfile(path):
        raise MissingInputError(f"DLTTA autoencoders not found: {path!r}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        autoencoders = FeatureAutoencoders(saved["levels"])
        autoencoders.load_state_dict(saved["state_dict"])
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        first = (str(err).strip().splitlines() or [""])[0]
        raise BadInputError(
            f"cannot read DLTTA autoencoders {path!r} (not written by save_autoencoders?): {first}"
        ) from err
    return autoencoders


def _resolve_autoencoders(
    autoencoders: str | FeatureAutoencoders | None, model: nn.Module, specs: list[dict], seed: int
) -> FeatureAutoencoders:
    """The given autoencoders, a file, the file beside the source checkpoint, or (with a warning) untrained ones."""
    if autoencoders is None:
        checkpoint = getattr(model, "checkpoint_path", None)
        beside = default_autoencoder_path(checkpoint) if checkpoint else None
        if beside is None or not os.path.isfile(beside):
            logger.warning(
                "DLTTA without trained autoencoders (none given%s): the reconstruction loss comes from untrained ones; "
                "train them on the source images with python -m monai_grata.utils.train_dltta",
                f", no {beside}" if beside else "",
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return FeatureAutoencoders(specs)
        autoencoders = beside
    if isinstance(autoencoders, str):
        autoencoders = load_autoencoders(autoencoders)
    expected = [(s["layers"], s["channels"]) for s in specs]
    found = [(list(level["layers"]), level["channels"]) for level in autoencoders.levels]
    if found != expected:
        raise BadInputError(f"the autoencoders reconstruct {found}, this network and adaptor need {expected}")
    return autoencoders


def train_autoencoders(
    model: nn.Module,
    images: torch.Tensor,
    epochs: int = 20,
    batch_size: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    image_adaptor: bool = False,
    adaptor_layers: Sequence[str] | None = None,
    key_layer: str | None = None,
    max_iterations: int | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    resume_path: str | None = None,
) -> FeatureAutoencoders:
    """Fit DLTTA's autoencoders to the source network's features on source images, as the authors' ``aenet`` stage
    does (models/basemodel.py ``opt_AENet``; scripts/train_oct.sh: 20 epochs, batches of 2): the network in eval mode
    (its running statistics) without adaptor, no gradient into it, Adam lr 1e-3 on the sum of the levels' MSE.

    Args:
        model: the source network (not changed).
        images: (N, C, *spatial) source images, scaled as the network's inputs are.
        epochs: passes over ``images`` (shuffled).
        batch_size: images per step.
        lr: Adam's learning rate (the authors' ``aelr``).
        seed: seed of the initial weights and the order.
        image_adaptor: also fit the image level (for ``DLTTA(image_adaptor=True)``).
        adaptor_layers: as :class:`DLTTA` takes them.
        key_layer: as :class:`DLTTA` takes it.
        max_iterations: steps per epoch at most (short runs).
        on_epoch: called after every epoch with its number (from 1) and the mean loss of its steps (e.g. to log it).
        resume_path: a file the state of the fit (weights, Adam, the order's generator, the epoch) is written to
            after every epoch and, when it exists, continued from: an interrupted fit resumes at its next epoch and
            ends as an uninterrupted one would. None: nothing is written.

    Returns:
        The autoencoders, in eval mode; save them with :func:`save_autoencoders` (as :func:`default_autoencoder_path`
        names them, :class:`DLTTA` finds them beside the checkpoint).

    Raises:
        BadInputError: a ``resume_path`` of another fit (other levels or other ``epochs``, ``batch_size``, ``lr``,
            ``seed`` or number of images).
    """
    network = copy.deepcopy(model).eval().requires_grad_(False)
    layers = find_dltta_layers(network, adaptor_layers, key_layer)
    device = next(network.parameters()).device
    recorder = FeatureAdaptor(layers, image_adaptor=False).to(device)
    recorder.attach(network)
    recorder.enabled = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoders = FeatureAutoencoders(_level_specs(layers, image_adaptor)).to(device)
    optimizer = torch.optim.Adam(autoencoders.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "images": len(images)}
    first_epoch = 1
    if resume_path is not None and os.path.isfile(resume_path):
        first_epoch = _resume_fit(resume_path, autoencoders, optimizer, generator, settings) + 1
    autoencoders.train()
    for epoch in range(first_epoch, epochs + 1):
        order, losses = torch.randperm(len(images), generator=generator), []
        for step, start in enumerate(range(0, len(images), batch_size)):
            if max_iterations is not None and step >= max_iterations:
                break
            batch = images[order[start : start + batch_size]].to(device)
            recorder.record = {}
            with torch.no_grad():
                network(batch)
            features, recorder.record = recorder.record, None
            loss = autoencoders.loss(features)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        if resume_path is not None:
            _save_fit(resume_path, autoencoders, optimizer, generator, settings, epoch)
        if on_epoch is not None:
            on_epoch(epoch, sum(losses) / max(len(losses), 1))
    recorder.remove()
    return autoencoders.eval()


def _save_fit(
    path: str,
    autoencoders: FeatureAutoencoders,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    settings: dict,
    epoch: int,
) -> None:
    """Write the fit's state after ``epoch`` to ``path`` (an interruption leaves the previous epoch's state)."""
    state = {
        "levels": autoencoders.levels,
        "settings": settings,
        "epoch": epoch,
        "autoencoders": autoencoders.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
    }
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def _resume_fit(
    path: str,
    autoencoders: FeatureAutoencoders,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    settings: dict,
) -> int:
    """Load the state :func:`_save_fit` wrote into the fit's objects; return the epoch it was written after."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("levels") != autoencoders.levels or state.get("settings") != settings:
        raise BadInputError(
            f"{path!r} is the state of another fit ({state.get('settings')}, not {settings}): delete it to start over"
        )
    autoencoders.load_state_dict(state["autoencoders"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return int(state["epoch"])


# --- the adapter ---------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class DLTTAStep(AdaptationStep):
    """A DLTTA step (``updated``: its learning rate was above 0, i.e. after the first image).

    Args:
        loss_reconstruction: the autoencoders' reconstruction loss (before :attr:`DLTTA.LOSS_WEIGHT`).
        loss_orthogonality: the adaptor's orthogonality term (before :attr:`DLTTA.LOSS_WEIGHT`).
        lr: the step's learning rate.
        discrepancy: D (0 in the warm-up).
    """

    loss_reconstruction: torch.Tensor
    loss_orthogonality: torch.Tensor
    lr: torch.Tensor
    discrepancy: torch.Tensor


@register_adapter("dltta")
class DLTTA(GradientAdapter):
    """DLTTA as the authors' segmentation code runs it. Per test batch x (models/basemodel.py ``opt_ANet``, lines
    239-332):

    1. keys and values from the frozen task network (no adaptor, no gradient, BatchNorm in train mode: batch
       statistics, running statistics moved by its momentum, 0.1): an encoder-only forward for the key — the
       bottleneck's output, flattened (``TNet(image, adaptive=True)``) — then a full forward for the values, the
       logits (lines 242-245);
    2. the learning rate: with more than ``k`` (8) entries in the bank (``retri_size`` 8, train.py:74), the ``k``
       entries with the most cosine-similar keys are retrieved, weighted by softmax(cos / 0.2) (memory.py:38-47,
       60-72; :attr:`ATTENTION_TEMPERATURE`), and D = pixel-mean symmetric KL between softmax(past) and
       softmax(current values / 4) (:attr:`TEMPERATURE`), lr = ``lr`` · exp(D) (lines 248-268); otherwise the
       warm-up lr = ``lr`` · (entries in the bank), 0 for the first image (line 271);
    3. one SGD step (no momentum, ``--alr=1e-3``) on the adaptor (:class:`FeatureAdaptor`: identity-initialised
       1×1 convolutions after the encoder's down levels, :func:`find_dltta_layers`) with the loss
       :attr:`LOSS_WEIGHT` · (Σ_levels MSE(AE(f), f) + Σ_convs :func:`srip`) — ``or_weight`` 0.05 (config.py)
       multiplies both (lines 281-317) — where f are the adapted network's features at each adapted level
       concatenated with the decoder's at that resolution, and its logits, in a forward with BatchNorm in eval mode
       (the running statistics of step 1, line 274); the autoencoders are fitted beforehand to the source network's
       features (:func:`train_autoencoders`) and stay frozen;
    4. the authors' push forwards (lines 325-329): the frozen network again in train mode — the same keys and values
       as in step 1 (the task network is frozen and normalises with batch statistics), the running statistics moved
       again — and (key, values) of each image enters the bank, which holds :attr:`MEMORY_SIZE` (21) entries,
       dropping the oldest (memory.py:32-36; ``Memory(20)``, train.py:29,58, drops one only once it holds more
       than 20).

    The prediction is the adapted network (through the adaptor) with BatchNorm on the batch's statistics (the
    authors' ``test``: ``TNet.train()``, models/segmodel.py ``SegANet.test``), running statistics untouched.

    ``ensemble``: the authors' ``_prepare_batch`` (memory.py:43-45) writes the sum into ``nsemble_prediction`` (a typo)
    and returns ``ensemble_prediction`` = the first neighbour's weighted logits; their first neighbour is the first of
    ``np.argpartition(scores, -k)[-k:]``, which partitions at position n - k, i.e. the k-th most similar entry. So
    ``"authors"`` (the default, as their code runs) takes w_k · z_k of the k-th nearest neighbour alone — logits
    shrunk by its weight (about 1/k), which flattens softmax(past); ``"weighted_sum"`` takes Σ_i w_i z_i, as the paper
    describes.

    Departures, each unavoidable here:

    - Outputs: for a sigmoid network (``multilabel``) D is the symmetric KL of the channels' Bernoulli distributions
      (:func:`symmetric_kl`), summed over channels; the authors' network is softmax (line 261).
    - Network: the adaptor positions and the key are found on our networks by :func:`find_dltta_layers` (the
      authors' ``UNet`` names them: ``seq`` 1, 2, 3 and the bottleneck); a 2D network run slice by slice gets 2D
      adaptors and autoencoders per slice and a key per volume.
    - Batches: the authors run batch size 1 (scripts/test_oct.sh ``--batch-size=1``; their D code assumes it, line
      256); for a larger batch D is averaged over its samples and every sample enters the bank.
    - Image sizes: their keys have one fixed size (memory.py:27); here only bank entries of the current key and
      value shapes count (for retrieval and the warm-up).
    - Order: the authors adapt on a whole test subject first and then predict it (train.py:84-100); here each batch is
      predicted right after its update, and the prediction does not move the running statistics (so that the
      adaptation sees the same running statistics as in their adaptation pass).
    - ``image_adaptor``: the authors' ANet also passes the image through a randomly initialised 1×1-convolution
      network ending in instance normalisation (models/adapmodel.py ``ANet.adpNet``, lines 66-78), trained with the
      rest and reconstructed by an image autoencoder. It outputs a z-scored image, as their inputs are (their dataset's
      ``normalize``); our inputs are min-max scaled to [0, 1], so before any update it would replace the image by a
      random z-scored intensity (colour) mapping the source network never saw. Off by default; ``True`` adds it as
      they have it.
    - The autoencoders must be fitted to the source network first (:func:`train_autoencoders`; without them, from
      ``dltta_<name>.pt`` beside the source checkpoint, untrained ones are used with a warning).

    After each call ``last_step`` (a :class:`DLTTAStep`) holds ``loss_reconstruction``, ``loss_orthogonality`` (both
    before :attr:`LOSS_WEIGHT`), ``lr`` and ``discrepancy`` (0 in the warm-up).

    Args:
        model: the source network (frozen; its BatchNorm running statistics are kept by the adapter, hooks added).
        autoencoders: fitted :class:`FeatureAutoencoders`, a file written by :func:`save_autoencoders`, or ``None``:
            the file :func:`default_autoencoder_path` names beside the checkpoint ``model`` was loaded from.
        lr: the base learning rate (the authors' 1e-3).
        k: the neighbours retrieved (8); retrieval starts once the bank holds more than ``k`` entries.
        ensemble: ``"authors"`` (the k-th nearest neighbour's weighted logits) or ``"weighted_sum"``.
        image_adaptor: add the authors' image-level adaptor (see above).
        adaptor_layers: the layers whose outputs are adapted (default: :func:`find_dltta_layers`).
        key_layer: the layer whose output is the memory key (default: :func:`find_dltta_layers`).
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs; no default (``build_adapter``'s
            ``task`` fills it).
        episodic: reset adaptor, statistics and bank before every batch (then every batch is a first image: lr 0).
        seed: seed of the orthogonality term's random vectors, drawn from a generator of their own (the authors' from
            the global random state), and of untrained autoencoders.
    """

    stochastic = True  # the power iteration of the orthogonality term starts from a random vector
    #: the weight of the reconstruction and orthogonality terms (the authors' ``or_weight``, 0.05, config.py)
    LOSS_WEIGHT: float = 0.05
    #: the entries the bank holds (21: ``Memory(20)``, train.py:29,58, drops one only once it holds more than 20)
    MEMORY_SIZE: int = 21
    #: the temperature of the current logits in D (the authors' 4, models/basemodel.py lines 248-268)
    TEMPERATURE: float = 4.0
    #: the temperature of the neighbours' cosine weights (the authors' 0.2, memory.py:38-47)
    ATTENTION_TEMPERATURE: float = 0.2

    def __init__(
        self,
        model: nn.Module,
        autoencoders: str | FeatureAutoencoders | None = None,
        lr: float = 1e-3,
        k: int = 8,
        ensemble: str = "authors",
        image_adaptor: bool = False,
        adaptor_layers: Sequence[str] | None = None,
        key_layer: str | None = None,
        multilabel: bool | None = None,
        episodic: bool = False,
        seed: int = 0,
    ) -> None:
        multilabel = require_multilabel(multilabel, type(self).__name__)
        if not 1 <= k < self.MEMORY_SIZE:
            raise ValueError(f"need 1 <= k < MEMORY_SIZE ({self.MEMORY_SIZE}), got k={k}")
        if ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
        if not lr >= 0:
            raise ValueError(f"need lr >= 0, got {lr}")
        super().__init__(model, episodic=episodic)
        self.lr, self.k = float(lr), int(k)
        self.ensemble, self.image_adaptor, self.multilabel, self.seed = ensemble, bool(image_adaptor), multilabel, seed
        self.adaptor_layers, self.key_layer = adaptor_layers, key_layer
        #: the ``autoencoders`` argument until :meth:`setup` resolves it
        self.autoencoders: str | FeatureAutoencoders | None = autoencoders
        self.memory: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=self.MEMORY_SIZE)
        self._generator: torch.Generator | None = None

    def configure_model(self, model: nn.Module) -> nn.Module:
        """Make every BatchNorm an :class:`~monai_grata.tta.AdaptiveBatchNorm` on the batch's statistics (outside
        DLTTA's own forwards, see :meth:`source_statistics`)."""
        return convert_to_adaptive_batch_norm(model.eval(), BatchNormPolicy())

    def setup(self) -> None:
        """Find the layers, attach the adaptor and set the autoencoders up.

        Raises:
            ValueError: a BatchNorm with running statistics but no momentum (a cumulative average), which the
                frozen forwards cannot move as the authors' train-mode network does.
        """
        model = self.model
        self.layers = find_dltta_layers(model, self.adaptor_layers, self.key_layer)
        device = next(model.parameters()).device
        self.adaptor = FeatureAdaptor(self.layers, self.image_adaptor).to(device)
        specs = _level_specs(self.layers, self.image_adaptor)
        self.autoencoders = _resolve_autoencoders(self.autoencoders, model, specs, self.seed).to(device).eval()
        self.autoencoders.requires_grad_(False)
        #: (layer, running mean, running variance) of every BatchNorm that keeps running statistics
        self.running_statistics: list[tuple[AdaptiveBatchNorm, torch.Tensor, torch.Tensor]] = [
            (m, m.running_mean, m.running_var) for m in adaptive_batch_norms(model) if m.has_source_statistics
        ]
        cumulative = [m for m, _, _ in self.running_statistics if m.source_momentum is None]
        if cumulative:
            raise ValueError(f"DLTTA moves running statistics by each BatchNorm's momentum; {cumulative[0]} has none")
        self.adaptor.attach(model)
        self._source_adaptor = copy.deepcopy(self.adaptor.state_dict())

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return list(self.adaptor.parameters())

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr)

    @contextlib.contextmanager
    def source_statistics(self, update: bool) -> Iterator[None]:
        """Inside, every BatchNorm that had running statistics behaves as in the authors' task network: in train mode
        (``update``: batch statistics, the running statistics moved by the layer's momentum) or in eval mode (the
        running statistics)."""
        layers = [m for m, _, _ in self.running_statistics]
        saved = [(m.policy, m.running_update) for m in layers]
        for layer in layers:
            if update:
                layer.running_update = layer.source_momentum
            else:
                layer.configure(BatchNormPolicy(prior=math.inf))
        try:
            yield
        finally:
            for layer, (policy, running_update) in zip(layers, saved, strict=True):
                layer.configure(policy)
                layer.running_update = running_update

    @torch.no_grad()
    def _frozen_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen task network in train mode: an encoder-only forward (the key), then a full one (the values)."""
        with self.adaptor.disabled(), self.source_statistics(update=True):
            key = tap_features(self.model, x, self.layers.key, "output")[0]
            if hasattr(self.model, "as_volumes") and key.ndim < x.ndim:  # slices of a 2D network run on volumes
                key = self.model.as_volumes(key)
            values = self.model(x)
        return key.flatten(1), values

    def _random(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(int(self.seed))
        return self._generator

    @torch.no_grad()
    def discrepancy(self, key: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """D for one image (key (F,), values: its logits (C, *spatial)) against the bank, and the number of bank
        entries of its shapes (D is ``None`` with ``k`` or fewer)."""
        entries = [(k, v) for k, v in self.memory if k.shape == key.shape and v.shape == values.shape]
        if len(entries) <= self.k:
            return None, len(entries)
        keys = torch.stack([k for k, _ in entries])
        cos = (keys @ key) / (keys.norm(dim=1) * key.norm()).clamp_min(1e-12)
        top = cos.topk(self.k)  # most similar first
        weights = torch.softmax(top.values / self.ATTENTION_TEMPERATURE, dim=0)
        past = torch.stack([entries[i][1] for i in top.indices.tolist()])
        if self.ensemble == "authors":
            ensembled = weights[-1] * past[-1]
        else:
            ensembled = torch.einsum("n,n...->...", weights, past)
        return symmetric_kl(ensembled[None], values[None] / self.TEMPERATURE, self.multilabel), len(entries)

    def _losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapted network's reconstruction loss (BatchNorm on the running statistics) and the orthogonality
        term of the adaptor's convolutions."""
        self.adaptor.record = {}
        try:
            with self.source_statistics(update=False):
                self.model(x)
            features = self.adaptor.record
        finally:
            self.adaptor.record = None
        reconstruction = self.autoencoders.loss(features)
        orthogonality = sum((srip(conv.weight, self._random()) for conv in self.adaptor.convs), torch.zeros(()))
        return reconstruction, orthogonality.to(reconstruction)

    def adapt(self, x: torch.Tensor) -> DLTTAStep:
        keys, values = self._frozen_forward(x)
        found = [self.discrepancy(key, v) for key, v in zip(keys, values, strict=True)]
        if all(d is not None for d, _ in found):
            discrepancy = torch.stack([d for d, _ in found]).mean()
            lr = self.lr * math.exp(float(discrepancy))
        else:
            discrepancy = torch.zeros(())
            lr = self.lr * min(n for _, n in found)
        reconstruction, orthogonality = self._losses(x)
        loss = self.LOSS_WEIGHT * (reconstruction + orthogonality)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._frozen_forward(x)  # the authors' push forwards: the same keys and values, the statistics move again
        for key, v in zip(keys, values, strict=True):
            if bool(torch.isfinite(v).all()) and bool(torch.isfinite(key).all()):
                self.memory.append((key, v))
        return DLTTAStep(
            updated=lr > 0,
            loss_reconstruction=reconstruction.detach(),
            loss_orthogonality=orthogonality.detach(),
            lr=torch.tensor(lr),
            discrepancy=discrepancy.detach().cpu(),
        )

    def reset(self) -> None:
        super().reset()
        self.adaptor.load_state_dict(self._source_adaptor)  # the running statistics are in the model's state
        self.memory.clear()
        self._generator = None

    def remove(self) -> None:
        """Take the adaptor's hooks out of the network (it then runs as the source, on batch statistics)."""
        self.adaptor.remove()
