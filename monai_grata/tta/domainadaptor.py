"""DomainAdaptor (Zhang et al., ICCV 2023): AdaMixBN folded into rectified affine parameters, a generalised entropy
loss, one SGD step per batch from the source weights.

References to the authors' code are to github.com/koncle/DomainAdaptor: ``models/DomainAdaptor.py`` (``AdaMixBN``,
``Losses.GEM_T``, ``EntropyMinimizationHead.setup``, ``DomainAdaptor.finetune``, ``test_time_adaption``),
``models/AdaptorHelper.py`` (``convert_to_target``, ``get_new_optimizers``) and ``main.py`` (default arguments).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .base import GradientAdapter, register_adapter, require_multilabel
from .normalization import batch_norm_layers, replace_batch_norms
from .steps import AdaptationStep

__all__ = ["AdaMixBatchNorm", "DomainAdaptor", "DomainAdaptorStep", "ada_mix_batch_norm", "generalized_entropy_loss"]


def generalized_entropy_loss(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """GEM-T (DomainAdaptor Eq. 9, ``Losses.GEM_T``, models/DomainAdaptor.py l. 122-127): the logits centred over
    the classes and divided by a temperature T = 2 · their standard deviation over the classes (unbiased; both
    without gradient), entropy H of that softmax, times T².

    As the authors' line 126 runs, ``(H).sum(1) * T ** 2`` broadcasts H (B, *spatial) against T² (B, 1, *spatial):
    the loss is the mean over pixels of (batch mean of H) · (batch mean of T²), which at batch size 1 is the mean
    of H · T². Where every logit of a pixel is equal (T = 0, NaN in their code) T is clamped to 1e-8.

    Sigmoid multi-label outputs are C binary problems with class logits (-z/2, z/2) (their code is softmax only),
    summed over the channels.

    Args:
        logits: network output (B, C, *spatial).
        multilabel: sigmoid per channel (True) or softmax over channels (False).
    """
    # (B, K classes, C' problems, *spatial): K = 2, C' = C for sigmoid; K = C, C' = 1 for softmax
    classes = torch.stack([-logits / 2, logits / 2], dim=1) if multilabel else logits[:, :, None]
    centred = classes - classes.mean(dim=1, keepdim=True).detach()
    temperature = (2 * centred.std(dim=1, keepdim=True)).detach().clamp_min(1e-8)
    log_p = torch.log_softmax(centred / temperature, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)  # (B, C', *spatial)
    per_pixel = entropy.mean(dim=0) * temperature.squeeze(1).square().mean(dim=0)  # (C', *spatial)
    return per_pixel.sum(dim=0).mean()


class AdaMixBatchNorm(nn.modules.batchnorm._BatchNorm):
    """AdaMixBN with ``Transform=True`` (``AdaMixBN``, models/DomainAdaptor.py l. 18-89): a BatchNorm layer that
    normalises with the batch's own statistics, with the gradient through them, and whose affine parameters are
    rectified once per batch so that this first forward equals normalising with a mixture of the source and batch
    statistics.

    On the first forward after :meth:`await_rectification` (a new batch), with source statistics (μ_s, σ²_s), the
    batch's (μ_t, σ²_t) and each instance's (μ_i, σ_i), per channel:

    - lambda = mean over instances of clip(1 - d(s,t) / (d(s,t) + d(i,s) + d(i,t)), 0, 1), each d the mean over
      channels of the squared differences of the means plus those of the standard deviations (``get_lambd``,
      l. 34-45, averaged over the batch at l. 54); ``mix_lambda`` fixes it instead (their ``--mix-lambda``).
      At batch size 1 the instance is the batch, d(i,t) = 0 and d(i,s) = d(s,t): lambda = 0.5 (up to rounding).
    - γ' = γ · sqrt(σ²_t + eps) / sqrt(lambda σ²_s + (1 - lambda) σ²_t + eps) and
      β' = β + lambda (μ_t - μ_s) / sqrt(σ²_t + eps) · γ' are written into ``weight`` and ``bias``
      (``get_retified_gamma_beta`` and l. 59-66), so those parameters, which the optimizer holds, become γ', β'.

    Every forward then returns (x - μ_t) / sqrt(σ²_t + eps) · weight + bias (``forward``, l. 72-84), in train and
    eval mode alike (their TTA keeps the backbone in train mode). As in their code the variances are unbiased
    (``x.var``, ``x.std``) and lambda carries no gradient (only ``.data`` is written).

    The source statistics are the buffers ``source_mean`` and ``source_var``; ``running_mean`` is None, so tools
    that read BatchNorm statistics (e.g. :func:`~monai_grata.tta.normalisation_statistics`) see a layer that
    normalises with batch statistics, which it does.

    Args:
        source: the BatchNorm layer to replace; it must be affine and keep running statistics. Its ``weight`` and
            ``bias`` parameters are reused (not copied).
        mix_lambda: a fixed source weight in [0, 1] (None: computed per batch, the authors' default).

    Raises:
        ValueError: a layer without affine parameters or running statistics, or ``mix_lambda`` outside [0, 1].
    """

    def __init__(self, source: nn.modules.batchnorm._BatchNorm, mix_lambda: float | None = None) -> None:
        if source.weight is None or source.bias is None:
            raise ValueError(f"AdaMixBN rectifies the affine parameters: {source} has none (affine=False)")
        if source.running_mean is None or source.running_var is None:
            raise ValueError(f"AdaMixBN mixes in the source statistics: {source} keeps no running statistics")
        if mix_lambda is not None and not 0 <= mix_lambda <= 1:
            raise ValueError(f"mix_lambda must be in [0, 1] or None (computed per batch), got {mix_lambda}")
        super().__init__(
            source.num_features,
            eps=source.eps,
            affine=True,
            track_running_stats=False,
            device=source.weight.device,
            dtype=source.weight.dtype,
        )
        self.weight, self.bias = source.weight, source.bias
        self.register_buffer("source_mean", source.running_mean.detach().clone())
        self.register_buffer("source_var", source.running_var.detach().clone())
        self.mix_lambda = mix_lambda
        self.rectify_pending = True
        self.last_lambda: torch.Tensor | None = None

    def await_rectification(self) -> None:
        """Rectify the affine parameters from the current ones on the next forward (a new batch)."""
        self.rectify_pending = True
        self.last_lambda = None

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 3 or math.prod(x.shape[2:]) < 2:
            shape = tuple(x.shape)
            raise ValueError(f"AdaMixBN needs (B, C, *spatial) inputs with 2 or more spatial elements, got {shape}")

    @torch.no_grad()
    def source_weight(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """lambda, the weight of the source statistics for the batch ``x`` (a 0-dim tensor).

        Args:
            x: the layer's input (B, C, *spatial).
            mean: the batch's per-channel mean (C,).
            var: the batch's per-channel unbiased variance (C,).
        """
        if self.mix_lambda is not None:
            return torch.tensor(self.mix_lambda, dtype=x.dtype, device=x.device)
        instance_var, instance_mean = torch.var_mean(x.flatten(2), dim=2)  # (B, C), unbiased
        instance_std, std, source_std = instance_var.sqrt(), var.sqrt(), self.source_var.sqrt()
        d_it = (instance_mean - mean).square().mean(1) + (instance_std - std).square().mean(1)
        d_is = (instance_mean - self.source_mean).square().mean(1) + (instance_std - source_std).square().mean(1)
        d_st = (mean - self.source_mean).square().mean() + (std - source_std).square().mean()
        # all three distances 0 (source = batch = instance): any lambda gives the same layer; take 1
        total = (d_st + d_is + d_it).clamp_min(torch.finfo(x.dtype).tiny)
        return (1 - d_st / total).clamp(0, 1).mean()

    @torch.no_grad()
    def rectify(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Write γ', β' for the batch ``x`` into ``weight`` and ``bias`` (non-finite values are not written).

        Args:
            x: the layer's input (B, C, *spatial).
            mean: the batch's per-channel mean (C,).
            var: the batch's per-channel unbiased variance (C,).
        """
        lam = self.source_weight(x, mean, var)
        batch_std = (var + self.eps).sqrt()
        gamma = batch_std / (lam * self.source_var + (1 - lam) * var + self.eps).sqrt() * self.weight
        beta = lam * (mean - self.source_mean) / batch_std * gamma + self.bias
        self.weight.copy_(torch.where(torch.isfinite(gamma), gamma, self.weight))
        self.bias.copy_(torch.where(torch.isfinite(beta), beta, self.bias))
        self.last_lambda = lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        var, mean = torch.var_mean(x, dim=(0, *range(2, x.ndim)))  # unbiased, with gradient
        if self.rectify_pending:
            self.rectify(x, mean.detach(), var.detach())
            self.rectify_pending = False
        shape = (1, -1) + (1,) * (x.ndim - 2)
        scale = torch.rsqrt(var + self.eps) * self.weight
        return (x - mean.view(shape)) * scale.view(shape) + self.bias.view(shape)


def ada_mix_batch_norm(model: nn.Module, mix_lambda: float | None = None) -> list[AdaMixBatchNorm]:
    """Replace every BatchNorm layer of ``model`` (in place) by an :class:`AdaMixBatchNorm`; return those layers.

    The authors convert the BatchNorm layers of ``bn1`` and ``layer1``-``layer4`` of their ResNet
    (``convert_to_target`` with start 0, end 5, models/AdaptorHelper.py): every BatchNorm layer of their classifier.
    Here every BatchNorm layer of the network, decoders included.

    Args:
        model: the network; it must not itself be a BatchNorm layer.
        mix_lambda: as :class:`AdaMixBatchNorm` takes it.

    Raises:
        ValueError: no BatchNorm layer, or one that :class:`AdaMixBatchNorm` cannot replace.
    """
    if not batch_norm_layers(model):
        raise ValueError(f"DomainAdaptor adapts BatchNorm layers and {type(model).__name__} has none")
    return replace_batch_norms(model, lambda layer: AdaMixBatchNorm(layer, mix_lambda))


@dataclasses.dataclass(kw_only=True)
class DomainAdaptorStep(AdaptationStep):
    """A DomainAdaptor step.

    Args:
        loss_aux: the GEM-T loss.
        mix_lambda: lambda averaged over the layers the forward reached (None: it reached none).
    """

    loss_aux: torch.Tensor
    mix_lambda: torch.Tensor | None = None


@register_adapter("domainadaptor")
class DomainAdaptor(GradientAdapter):
    """DomainAdaptor baseline as the authors' ``test_time_adaption`` (models/DomainAdaptor.py) runs it with its
    default arguments (main.py: ``--AdaMixBN``, ``--Transform``, ``--loss-names gem-t``, ``--lr 0.001``, not
    ``--online``), per batch:

    1. reload the source weights (``episodic``);
    2. one forward in which every BatchNorm, an :class:`AdaMixBatchNorm`, computes lambda, rectifies its affine
       parameters into γ', β' and normalises with the batch's own statistics (the gradient flows through them);
    3. the GEM-T loss (:func:`generalized_entropy_loss`), one SGD step (lr 1e-3, no momentum, no weight decay) on
       the weights and biases of all BatchNorm layers, i.e. on γ', β' (``get_new_optimizers`` with ``names=['bn']``
       in ``EntropyMinimizationHead.setup``; ``ft_steps`` = 1);
    4. the prediction: a forward of the same batch with the updated γ', β' and the batch's own statistics (their
       backbone stays in train mode and the layers rectify only once per batch).

    Departures from the authors' code, none avoidable by configuration:

    - Batch size 1 (one image per prediction, as in this benchmark) makes lambda 0.5 in every layer (see
      :class:`AdaMixBatchNorm`); their script adapts batches of 64 (script/TTA.sh).
    - Sigmoid multi-label outputs: GEM-T on the two-class logits (-z/2, z/2) per channel, summed over channels
      (their code is softmax classification).
    - Every BatchNorm layer is converted, decoder included (:func:`ada_mix_batch_norm`); their classifier has
      BatchNorm only in the ResNet they convert. Other normalisation layers are neither mixed nor adapted, as in
      their optimizer (BatchNorm2d only).
    - Each layer's own ``eps`` (their AdaMixBN is built with the default 1e-5).
    - If an update leaves a weight non-finite and is rolled back (:class:`~monai_grata.tta.GradientAdapter`), the
      prediction rectifies the restored weights again, so it is AdaMixBN's prediction without the step.
    - There is no ``bn_prior``: the mixture is AdaMixBN's lambda, computed per batch (or :attr:`MIX_LAMBDA`).

    With ``episodic=False`` the weights carry over (their ``--online``, which also sets SGD momentum 0.9) and each batch
    rectifies from the current ones. After each call ``last_step`` (a :class:`DomainAdaptorStep`) holds ``loss_aux``
    (GEM-T) and ``mix_lambda`` (lambda averaged over the layers).

    Args:
        model: the source network with BatchNorm layers (adapted in place; they are replaced).
        lr: SGD learning rate (the authors' 1e-3).
        momentum: SGD momentum (0; the authors' ``--online`` uses 0.9).
        episodic: reset to the source weights before every batch (the authors' default: True).
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs; no default (``build_adapter``'s
            ``task`` fills it).
    """

    #: a fixed source weight for every layer (their ``--mix-lambda``); None: AdaMixBN's lambda per batch, their default
    MIX_LAMBDA: float | None = None

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        momentum: float = 0.0,
        episodic: bool = True,
        multilabel: bool | None = None,
    ) -> None:
        multilabel = require_multilabel(multilabel, type(self).__name__)
        self.lr, self.momentum, self.multilabel = float(lr), float(momentum), multilabel
        super().__init__(model, episodic=episodic)

    def configure_model(self, model: nn.Module) -> nn.Module:
        self.mix_layers = ada_mix_batch_norm(model.eval(), self.MIX_LAMBDA)
        return model

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for layer in self.mix_layers for p in (layer.weight, layer.bias)]

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    def await_rectification(self) -> None:
        """Make every layer rectify its affine parameters on the next forward."""
        for layer in self.mix_layers:
            layer.await_rectification()

    def reset(self) -> None:
        super().reset()
        self.await_rectification()

    def adapt_batch(self, x: torch.Tensor) -> AdaptationStep:
        step = super().adapt_batch(x)
        if step.rolled_back:
            self.await_rectification()
        return step

    def adapt(self, x: torch.Tensor) -> DomainAdaptorStep:
        self.await_rectification()
        loss = generalized_entropy_loss(self.model(x), self.multilabel)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lambdas = [layer.last_lambda for layer in self.mix_layers if layer.last_lambda is not None]
        return DomainAdaptorStep(loss_aux=loss.detach(), mix_lambda=torch.stack(lambdas).mean() if lambdas else None)
