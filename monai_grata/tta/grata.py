"""GraTa: gradient alignment with a dynamic learning rate for test-time adaptation (AAAI 2025, Algorithm 1)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from monai_grata.transforms import WEAK_VIEWS, StrongIntensityAug, WeakViews

from .base import VOLUME_AXES_HINT, GradientAdapter, register_adapter, require_multilabel
from .losses import consistency_loss, entropy_loss, probabilities
from .normalization import BatchNormPolicy, per_group_batch_norm
from .shift import SettleSchedule, batch_norm_shift, record_batch_norm_shift
from .steps import AdaptationStep

__all__ = ["ACTIVATIONS", "NO_GRAD_DTYPES", "GraTa", "GraTaStep"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quadratic": lambda c: (c + 1) ** 2 / 4,
    "linear": lambda c: (c + 1) / 2,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "softplus": F.softplus,
}
LOSSES = ("entropy", "consistency")
#: the reduced precisions the teacher's forward may run in (``no_grad_dtype``)
NO_GRAD_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    flat_a, flat_b = _flat(a), _flat(b)
    return torch.dot(flat_a, flat_b) / (flat_a.norm() * flat_b.norm() + 1e-12)


@dataclasses.dataclass(kw_only=True)
class GraTaStep(AdaptationStep):
    """A GraTa step (of its last update, with ``steps`` > 1). A batch the shift gate held, or that the settle
    schedule left out, has no update: ``updated`` False, ``lr`` 0 and no gradient statistics.

    Args:
        cos: cos(g_aux, g_pseudo); None when no use of ``g_aux`` is on (``align`` and ``dynamic_lr`` False, no
            ``min_cos``), so that gradient is not taken.
        lr: the learning rate of the update (0 when none was taken).
        loss_aux: the auxiliary loss at θ.
        loss_pseudo: the pseudo loss (at θ' when aligned).
        stream_shift: with ``min_shift``, the stream's mean BatchNorm shift the gate compared.
        gate_open: with ``min_shift``, 1 when the gate let the update through, else 0.
        settled: with ``settle``, 1 when the settled stream left the update out, else 0.
    """

    cos: torch.Tensor | None = None
    lr: torch.Tensor
    loss_aux: torch.Tensor | None = None
    loss_pseudo: torch.Tensor | None = None
    stream_shift: torch.Tensor | None = None
    gate_open: torch.Tensor | None = None
    settled: torch.Tensor | None = None


@register_adapter("grata")
class GraTa(GradientAdapter):
    """GraTa test-time adaptation: ``adapter(x)`` runs one step of Algorithm 1 on ``x`` and returns the
    logits of ``x`` from the updated model.

    Per batch: the auxiliary gradient ``g_aux`` of ``aux`` is taken at θ; the weights move to
    θ' = θ − g_aux (unit step); the pseudo gradient ``g_pseudo`` of ``pseudo`` is taken at θ'; θ is
    restored; Adam steps θ with ``g_pseudo`` and lr = ``beta · act(cos(g_aux, g_pseudo))``. Adapted
    parameters are the normalisation affine weights; every BatchNorm uses the batch's statistics.
    The consistency loss compares the strong view's logits with the mean probability of the weak views
    (identity, flips, rotations), mapped back and computed without gradient in one batched forward in
    which each view keeps its own BatchNorm statistics.

    After each call, ``last_step`` (a :class:`GraTaStep`) holds 0-dim tensors ``cos``, ``lr``, ``loss_aux``,
    ``loss_pseudo``.

    Args:
        model: the source network (adapted in place).
        beta: the base learning rate (scaling factor of Eq. 5).
        aux: loss whose gradient perturbs the weights, ``"entropy"`` or ``"consistency"`` (Table 3 swaps them).
        pseudo: loss whose gradient updates the weights, ``"consistency"`` or ``"entropy"``.
        activation: maps the cosine to a learning rate factor: ``"quadratic"`` ¼(x+1)², ``"linear"`` ½(x+1),
            ``"sigmoid"``, ``"relu"``, ``"softplus"`` (Table 4).
        align: take the pseudo gradient at θ' (True) or at θ (False; Table 2).
        dynamic_lr: lr = beta·act(cos) (True) or lr = beta (False; Table 2).
        strong_transform: a callable on a batch tensor giving the strong view; default
            :class:`~monai_grata.transforms.StrongIntensityAug` seeded with ``seed``.
        episodic: reset to the source weights before every batch (default: continual).
        multilabel: sigmoid multi-label (True) or softmax multi-class (False) outputs; no default (``build_adapter``'s
            ``task`` fills it).
        views: the weak views, as :class:`~monai_grata.transforms.WeakViews` takes them; ``None``: GraTa's six
            views for images (B, C, H, W). A volume (B, C, H, W, D) needs ``views`` and ``strong_transform`` that
            keep to its in-plane axes (``build_adapter``'s ``task`` gives them); without them it is an error.
        seed: seed of the default strong augmentation.
        batch_views: forward the weak views as one batch with per-view BatchNorm statistics (True) or one
            view at a time (False; same result, slower, for comparison).
        normalization: how BatchNorm normalises (:class:`~monai_grata.tta.BatchNormPolicy`; the flat options
            ``bn_prior``/``bn_momentum`` of :func:`~monai_grata.tta.build_adapter`).
            None: the paper's, the batch's own statistics.
        radius: the perturbation θ → θ'. None (the paper): the unit step θ' = θ − g_aux. A float r: a step
            scaled to the parameters' own size, θ' = θ − r·‖θ‖·g_aux/‖g_aux‖ (r = 0.01 moves the adapted
            parameters by 1 % of their norm, whatever the size of the gradient).
        min_cos: take the update only when cos(g_aux, g_pseudo) > ``min_cos`` (None, the paper: always; 0: only
            when the two gradients agree). A skipped update leaves the weights and Adam's state as they were.
        steps: updates per batch before the prediction (the paper: 1).
        min_shift: update only while the stream looks shifted: the mean, over the batches seen since the last
            reset, of :func:`~monai_grata.tta.batch_norm_shift` (how far each batch's BatchNorm inputs are from the
            source running statistics) must exceed ``min_shift``; otherwise the batch is predicted without an
            update. The statistics then report ``stream_shift`` and ``gate_open`` (1 or 0). None (the paper):
            always update. In-domain fundus images score about 0.04-0.15, the other sites' 0.25-0.39
            (``docs/results.md``). Needs ``bn_prior`` > 0: the shift is measured against the source running
            statistics, which the paper's setting discards. With ``aux="entropy"`` the shift is recorded during the
            first update's entropy forward at θ (the same weights and BatchNorm normalisation as a separate
            forward, so the same value), and a batch whose gate stays shut costs that one forward; with
            ``aux="consistency"`` it takes a separate forward.
        reuse_teacher: with ``steps`` > 1, compute the weak views' teacher once per batch (in its first update, at
            that update's θ') and reuse it in the batch's later updates, instead of recomputing it at each
            update's θ' (the paper's rule for one step). Saves ``steps`` - 1 teacher forwards of all weak views per
            batch. Off by default.
        settle: fewer updates once the stream has settled (:class:`~monai_grata.tta.shift.SettleSchedule`): after
            ``settle`` updated batches, update only every ``settle_every``-th batch while each batch's shift
            (:func:`~monai_grata.tta.batch_norm_shift`, measured as for ``min_shift``) stays within
            ``settle_tolerance`` of the mean shift since the (re)start; a batch further away (a new site) and
            :meth:`reset` resume updates on every batch. The statistics then report ``settled`` (1: the update
            was left out). Needs ``bn_prior`` > 0. None (default): update on every batch the gate lets through.
        settle_every: once settled, update on every ``settle_every``-th batch.
        settle_tolerance: the largest distance of a batch's shift from the running mean that still counts as settled.
        no_grad_dtype: run the teacher's forward (no gradient) under autocast in ``"bfloat16"`` or ``"float16"``;
            the adapted parameters, the gradient passes and Adam's state stay float32, and the teacher's
            probabilities are averaged in float32. None (default): float32. On CUDA this halves the teacher's
            memory traffic; on a CPU without native bfloat16/float16 arithmetic (AVX2 only, no AVX512-BF16/AMX)
            the forward is slower than in float32: about 25-40 times on an AVX2 AMD EPYC
            (``docs/performance.md``, "Cutting the default's cost").
        teacher_channels_last: forward the stacked weak views in ``torch.channels_last`` memory format, which
            oneDNN's NHWC convolutions run faster on a CPU for this batch of six 256-px images (about 10 %,
            ``docs/performance.md``); the same result up to float rounding. Off by default.
    """

    stochastic = True  # the strong view is random

    def __init__(
        self,
        model: nn.Module,
        beta: float = 1e-4,
        aux: str = "entropy",
        pseudo: str = "consistency",
        activation: str = "quadratic",
        align: bool = True,
        dynamic_lr: bool = True,
        strong_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        episodic: bool = False,
        multilabel: bool | None = None,
        views: Sequence | None = None,
        seed: int = 0,
        batch_views: bool = True,
        normalization: BatchNormPolicy | None = None,
        radius: float | None = None,
        min_cos: float | None = None,
        steps: int = 1,
        min_shift: float | None = None,
        reuse_teacher: bool = False,
        settle: int | None = None,
        settle_every: int = 4,
        settle_tolerance: float = 0.25,
        no_grad_dtype: str | None = None,
        teacher_channels_last: bool = False,
    ) -> None:
        multilabel = require_multilabel(multilabel, type(self).__name__)
        for name, value in (("aux", aux), ("pseudo", pseudo)):
            if value not in LOSSES:
                raise ValueError(f"{name} must be one of {LOSSES}, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if radius is not None and not radius > 0:
            raise ValueError(f"radius must be positive (or None for the paper's unit step), got {radius}")
        if min_cos is not None and not -1 <= min_cos < 1:
            raise ValueError(f"min_cos must be in [-1, 1) (or None: always step), got {min_cos}")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        if min_shift is not None and not min_shift >= 0:
            raise ValueError(f"min_shift must be >= 0 (or None: always update), got {min_shift}")
        prior = self.resolve_normalization(normalization).prior
        if min_shift is not None and not prior > 0:
            raise ValueError("min_shift reads the source running statistics, which bn_prior 0 ignores: use bn_prior>0")
        if settle is not None and not prior > 0:
            raise ValueError("settle reads the source running statistics, which bn_prior 0 ignores: use bn_prior>0")
        if no_grad_dtype is not None and no_grad_dtype not in NO_GRAD_DTYPES:
            raise ValueError(f"no_grad_dtype must be one of {sorted(NO_GRAD_DTYPES)} or None, got {no_grad_dtype!r}")
        self.radius, self.min_cos, self.steps, self.min_shift = radius, min_cos, int(steps), min_shift
        self._shift_sum, self._shift_count = 0.0, 0
        self.reuse_teacher, self.no_grad_dtype = bool(reuse_teacher), no_grad_dtype
        self.teacher_channels_last = bool(teacher_channels_last)
        self.settle_schedule = None if settle is None else SettleSchedule(settle, settle_every, settle_tolerance)
        #: batches on which the update steps ran (not reset by :meth:`reset`)
        self.n_updated = 0
        self._batch_teacher: torch.Tensor | None = None
        self.beta, self.aux, self.pseudo, self.activation = float(beta), aux, pseudo, activation
        self.align, self.dynamic_lr, self.multilabel, self.batch_views = align, dynamic_lr, multilabel, batch_views
        super().__init__(model, episodic=episodic, normalization=normalization)
        self.strong_transform = strong_transform if strong_transform is not None else StrongIntensityAug(seed=seed)
        self.views = WeakViews(WEAK_VIEWS if views is None else views)
        self.volume_axes_given = views is not None and strong_transform is not None

    @property
    def uses_aux_gradient(self) -> bool:
        """Whether a step reads the auxiliary gradient: for the perturbation (``align``), the cosine's lr
        (``dynamic_lr``) or the ``min_cos`` test. Without any of them (a plain step on the pseudo loss at θ, Table 2's
        first row) it is not taken."""
        return self.align or self.dynamic_lr or self.min_cos is not None

    def weak_views(self, x: torch.Tensor) -> WeakViews:
        """The weak views of ``x`` (:attr:`views`).

        Raises:
            ValueError: a volume (B, C, H, W, D) and no ``views`` or ``strong_transform`` given: the defaults would
                flip and blur its slice axis.
        """
        if x.ndim == 5 and not self.volume_axes_given:
            raise ValueError(f"GraTa on a volume {tuple(x.shape)}: {VOLUME_AXES_HINT}")
        return self.views

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        # One Adam for every device, its lr set as a float before each step. A capturable Adam would keep the
        # dynamic lr on the GPU without that host round-trip, but it refuses CPU parameters: a GPU-only branch,
        # never run, for a saving nobody has measured (the step already syncs twice for its finiteness checks).
        return torch.optim.Adam(params, lr=self.beta, betas=(0.9, 0.999))

    @torch.no_grad()
    @record_function("grata/teacher")
    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        """Mean probability of the weak views of ``x``, mapped back to the original frame."""
        views = self.weak_views(x)
        stacked = views(x)
        if self.teacher_channels_last and stacked.ndim == 4:
            stacked = stacked.contiguous(memory_format=torch.channels_last)
        with self._no_grad_precision(x.device):
            if self.batch_views:
                with per_group_batch_norm(self.model, views.num_views):
                    logits = self.model(stacked)
            else:
                logits = torch.cat([self.model(view) for view in stacked.chunk(views.num_views)])
        # the activation before the inverse: inverse() stacks views first, so dim 1 is no longer the channels
        return views.inverse(probabilities(logits.float(), self.multilabel)).mean(dim=0)

    def _no_grad_precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast to ``no_grad_dtype`` on ``device`` (a no-op without one)."""
        if self.no_grad_dtype is None:
            return contextlib.nullcontext()
        if not torch.amp.is_autocast_available(device.type):
            raise ValueError(f"no_grad_dtype {self.no_grad_dtype!r}: autocast is not available on {device.type}")
        return torch.autocast(device.type, dtype=NO_GRAD_DTYPES[self.no_grad_dtype])

    def loss(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The named unsupervised loss of ``x`` at the current weights."""
        if name == "entropy":
            return entropy_loss(self.model(x), self.multilabel)
        teacher = self._batch_teacher if self._batch_teacher is not None else self.teacher(x)
        if self.reuse_teacher:
            self._batch_teacher = teacher
        return consistency_loss(self.model(self.strong_transform(x)), teacher, self.multilabel)

    def perturbation(self, grad_aux: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """The step θ − θ' from the auxiliary gradient: the gradient itself, or scaled to ``radius``·‖θ‖."""
        if self.radius is None:
            return grad_aux
        scale = self.radius * _flat(self.params).norm() / (_flat(grad_aux).norm() + 1e-12)
        return [g * scale for g in grad_aux]

    def reset(self) -> None:
        super().reset()
        self._shift_sum, self._shift_count = 0.0, 0
        if self.settle_schedule is not None:
            self.settle_schedule.reset()

    def stream_shift(self, x: torch.Tensor) -> float:
        """Add ``x``'s :func:`~monai_grata.tta.batch_norm_shift` to the stream's and return the stream's mean (the
        gate's one host read per batch)."""
        return self._add_to_stream(batch_norm_shift(self.model, x))

    def _add_to_stream(self, batch_shift: torch.Tensor) -> float:
        self._shift_sum += float(batch_shift)
        self._shift_count += 1
        return self._shift_sum / self._shift_count

    def _measure_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x``'s shift and, with ``aux="entropy"``, the logits of the forward at θ it was read from (the first
        update's entropy forward, with gradients); otherwise the shift of a separate forward and None."""
        if self.aux != "entropy":
            with record_function("grata/shift"):
                return batch_norm_shift(self.model, x), None
        with record_function("grata/aux_gradient"), record_batch_norm_shift(self.model) as record:
            logits = self.model(x)
        return record.shift(), logits

    def adapt(self, x: torch.Tensor) -> GraTaStep:
        gated, settling = self.min_shift is not None, self.settle_schedule is not None
        logits = batch_shift = shift = None
        if gated or settling:
            batch_shift, logits = self._measure_shift(x)
        if gated:
            shift = self._add_to_stream(batch_shift)
        gate_open = shift is None or shift > self.min_shift
        settled = settling and not self.settle_schedule.wants_update(float(batch_shift))
        if gate_open and not settled:
            self._batch_teacher = None
            try:
                steps = []
                for _ in range(self.steps):
                    steps.append(self.adapt_step(x, aux_logits=logits))
                    logits = None  # later steps start from the updated weights
            finally:
                self._batch_teacher = None
            step = dataclasses.replace(steps[-1], updated=any(s.updated for s in steps))
            self.n_updated += 1
            if settling:
                self.settle_schedule.record_update()
        else:
            step = GraTaStep(updated=False, lr=torch.tensor(0.0))
        if gated:
            step.stream_shift, step.gate_open = torch.tensor(shift), torch.tensor(float(gate_open))
        if settling:
            step.settled = torch.tensor(float(settled))
        return step

    def adapt_step(self, x: torch.Tensor, aux_logits: torch.Tensor | None = None) -> GraTaStep:
        """One update of Algorithm 1 on ``x``; returns its statistics as 0-dim tensors (``updated``: the step
        size was above 0).

        Args:
            x: the batch.
            aux_logits: with ``aux="entropy"``, the logits of a forward of ``x`` at the current weights, with
                gradients, to take the entropy from instead of a new forward (None: a new forward).
        """
        # the record_function ranges name the phases for benchmarks/tta_speed.py --breakdown
        with record_function("grata/aux_gradient"):
            if aux_logits is not None:
                loss_aux = entropy_loss(aux_logits, self.multilabel)
            else:
                loss_aux = self.loss(self.aux, x)
            # the forward stays (its loss is logged, and it advances what a forward advances: BatchNorm tracking,
            # the strong views' generator); only a gradient nothing reads is skipped
            grad_aux = torch.autograd.grad(loss_aux, self.params) if self.uses_aux_gradient else None
        if self.align:
            source = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                torch._foreach_sub_(self.params, self.perturbation(grad_aux))
        with record_function("grata/pseudo_gradient"):
            loss_pseudo = self.loss(self.pseudo, x)
            grad_pseudo = torch.autograd.grad(loss_pseudo, self.params)
        with record_function("grata/update"):
            if self.align:
                with torch.no_grad():
                    for p, s in zip(self.params, source, strict=True):
                        p.copy_(s)
            cos = None if grad_aux is None else _cosine(grad_aux, grad_pseudo)
            if self.dynamic_lr:
                lr = self.beta * ACTIVATIONS[self.activation](cos)
            else:
                lr = torch.tensor(self.beta, device=x.device)
            updated = False
            if self.min_cos is not None and not float(cos) > self.min_cos:
                lr = torch.zeros_like(lr)
            else:
                for p, g in zip(self.params, grad_pseudo, strict=True):
                    p.grad = g
                self.optimizer.param_groups[0]["lr"] = step_size = float(lr)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                updated = step_size > 0
        return GraTaStep(
            updated=updated,
            cos=None if cos is None else cos.detach(),
            lr=lr.detach(),
            loss_aux=loss_aux.detach(),
            loss_pseudo=loss_pseudo.detach(),
        )
