"""The lifecycle every test-time adapter shares: configure, set up, adapt, predict, reset; and, for the methods that
take gradient steps, collect, optimise, roll back."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.profiler import record_function

from .normalization import (
    AdaptiveBatchNorm,
    BatchNormPolicy,
    adaptive_batch_norms,
    convert_to_adaptive_batch_norm,
    track_test_statistics,
)
from .steps import AdaptationStep

if TYPE_CHECKING:
    from monai_grata.data.task import TaskSpec

__all__ = [
    "NORM_LAYERS",
    "PREDICTION_ORDERS",
    "AdaptationStep",
    "GradientAdapter",
    "TTAdapter",
    "adapter_class",
    "adapter_defaults",
    "adapter_names",
    "build_adapter",
    "collect_norm_params",
    "register_adapter",
    "require_multilabel",
]

NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    AdaptiveBatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)
#: the flat options :func:`build_adapter` turns into an adapter's :class:`~monai_grata.tta.BatchNormPolicy`
NORMALIZATION_OPTIONS = {
    "bn_prior": "prior",
    "bn_momentum": "momentum",
    "bn_first_layers": "first_layers",
    "bn_first_prior": "first_prior",
    "bn_min_shift": "min_shift",
    "bn_first_min_shift": "first_min_shift",
    "bn_site_min_shift": "site_min_shift",
    "bn_first_site_min_shift": "first_site_min_shift",
    "bn_site_min_batches": "site_min_batches",
}
#: what ``adapter(x)`` returns: the prediction before or after the update on ``x``
PREDICTION_ORDERS = ("before", "after")
_REGISTRY: dict[str, type[TTAdapter]] = {}
#: what to pass when an adapter does not know how its network's outputs are activated
MULTILABEL_HINT = (
    "pass multilabel=True for sigmoid multi-label outputs (one independent channel per structure) or "
    "multilabel=False for softmax classes"
)
#: what an augmenting adapter needs on a volume whose in-plane axes it was not given (its slice axis is never guessed)
VOLUME_AXES_HINT = (
    "its in-plane axes are not known, and a guess could flip, turn, crop or blur along the slice axis. Pass "
    "task=<a TaskSpec or a registered task name> to build_adapter, or the in-plane axes AXES yourself (e.g. "
    "(-3, -2), the (H, W) of a batch (B, C, H, W, D)): views=weak_views(3, flip_axes=AXES, plane=AXES) to GraTa "
    "and norm_select, with strong_transform=StrongIntensityAug(blur_axes=AXES) to GraTa (monai_grata.transforms); "
    "plane=AXES to DUA and DeTTA"
)
logger = logging.getLogger(__name__)


def register_adapter(name: str) -> Callable[[type[TTAdapter]], type[TTAdapter]]:
    """Class decorator that makes an adapter selectable by ``name`` in :func:`build_adapter`."""

    def decorator(cls: type[TTAdapter]) -> type[TTAdapter]:
        _REGISTRY[name] = cls
        return cls

    return decorator


def adapter_class(name: str) -> type[TTAdapter]:
    """The adapter class registered as ``name``.

    Raises:
        ValueError: an unknown name.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown test-time adaptation method {name!r}; choose from {adapter_names()}")
    return _REGISTRY[name]


def adapter_names() -> list[str]:
    """The names :func:`build_adapter` accepts."""
    return sorted(_REGISTRY)


def _takes_normalization(cls: type[TTAdapter]) -> bool:
    return "normalization" in inspect.signature(cls).parameters


def adapter_defaults(name: str) -> dict:
    """The options :func:`build_adapter` takes for the adapter registered as ``name``, with their defaults: its
    constructor's keyword arguments, the policy ``normalization`` given as the flat options ``bn_prior`` and
    ``bn_momentum``, ``bn_first_layers``, ``bn_first_prior``, ``bn_min_shift``, ``bn_first_min_shift`` and the site
    gate's ``bn_site_min_shift``, ``bn_first_site_min_shift``, ``bn_site_min_batches`` of the adapter's default
    policy."""
    cls = adapter_class(name)
    parameters = inspect.signature(cls).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    if "normalization" in defaults:
        policy = cls.resolve_normalization(defaults.pop("normalization"))
        defaults.update({flat: getattr(policy, field) for flat, field in NORMALIZATION_OPTIONS.items()})
    return defaults


def require_multilabel(multilabel: bool | None, owner: str, via_task: bool = True) -> bool:
    """``multilabel`` as a bool, or a clear error when nobody said how the network's outputs are activated (no
    task's default is assumed).

    Args:
        multilabel: the ``multilabel`` option (None: not given).
        owner: the adapter's (or loss's) name, for the message.
        via_task: whether the message also offers :func:`build_adapter`'s ``task`` (for adapters).

    Raises:
        ValueError: ``multilabel`` is None.
    """
    if multilabel is None:
        task = ", or build_adapter(..., task=<a TaskSpec or a registered task name>)" if via_task else ""
        raise ValueError(f"{owner} needs to know how the network's outputs are activated: {MULTILABEL_HINT}{task}")
    return bool(multilabel)


def build_adapter(
    name: str,
    model: nn.Module,
    task: TaskSpec | str | None = None,
    **kwargs,
) -> TTAdapter:
    """Wrap ``model`` in the adapter registered as ``name`` (e.g. ``"grata"``, ``"tent"``).

    Args:
        name: a registered adapter name.
        model: the source model; it is adapted in place.
        task: the segmentation task (a :class:`~monai_grata.data.TaskSpec` or a registered name such as
            ``"fundus"``): it fills the options the task decides (:meth:`~monai_grata.data.TaskSpec.adapter_options`:
            ``multilabel``, a volume's in-plane views, ...) that ``kwargs`` do not set. None: ``kwargs`` say all.
        kwargs: the adapter's constructor arguments, and the flat policy options of :data:`NORMALIZATION_OPTIONS`
            (``bn_prior``, ``bn_momentum``, ``bn_first_layers``, ``bn_first_prior``, ``bn_min_shift``,
            ``bn_first_min_shift``, ``bn_site_min_shift``, ``bn_first_site_min_shift``, ``bn_site_min_batches``:
            the fields of its
            :class:`~monai_grata.tta.BatchNormPolicy`; None: the adapter's default) for adapters that take one.

    Raises:
        ValueError: an unknown name, a flat policy option (``bn_prior``, ...) for an adapter without a BatchNorm
            policy or together with ``normalization``, a bad policy, or no ``multilabel`` and no ``task`` for an
            adapter that needs to know its outputs.
        KeyError: an unknown task name.
    """
    cls = adapter_class(name)
    if task is not None:
        from monai_grata.data.task import resolve_task  # the data package imports transforms, not adapters

        kwargs = {**resolve_task(task).adapter_options(cls, seed=kwargs.get("seed", 0)), **kwargs}
    given = {key: kwargs.pop(key) for key in NORMALIZATION_OPTIONS if key in kwargs}
    flat = {k: v for k, v in given.items() if v is not None}
    if flat:
        if not _takes_normalization(cls):
            raise ValueError(f"{name} takes no BatchNorm policy: drop {sorted(flat)}")
        if kwargs.get("normalization") is not None:
            raise ValueError(f"give {name} either normalization or {sorted(flat)}, not both")
        fields = {NORMALIZATION_OPTIONS[k]: float(v) for k, v in flat.items()}
        kwargs["normalization"] = dataclasses.replace(cls.default_normalization, **fields)
    return cls(model, **kwargs)


def _norm_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            yield name, module


def collect_norm_params(model: nn.Module) -> list[nn.Parameter]:
    """The affine weights and biases of every normalisation layer (BatchNorm, InstanceNorm, GroupNorm, LayerNorm).

    Raises:
        ValueError: when the model has no normalisation layer with affine parameters.
    """
    params = [
        p
        for _, m in _norm_layers(model)
        for p in (getattr(m, "weight", None), getattr(m, "bias", None))
        if p is not None
    ]
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no normalisation layer with affine parameters "
            "(BatchNorm, InstanceNorm(affine=True), GroupNorm or LayerNorm): nothing to adapt"
        )
    return params


def _snapshot_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict, list[dict]]:
    """A copy of the optimizer's per-parameter state and hyperparameters, for a rollback.

    Much cheaper than ``copy.deepcopy(optimizer.state_dict())``, which matters because it is taken before
    every step.
    """
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in optimizer.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return state, groups


def _restore_optimizer(optimizer: torch.optim.Optimizer, snapshot: tuple[dict, list[dict]]) -> None:
    """Put back what :func:`_snapshot_optimizer` copied."""
    state, groups = snapshot
    optimizer.state.clear()
    optimizer.state.update(state)
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        group.update(saved)


class _SetUpAfterConstruction(type):
    """Metaclass of the adapters: :meth:`TTAdapter._set_up` runs once the whole constructor has returned, so that a
    subclass sets its fields after ``super().__init__`` as any module does, and :meth:`TTAdapter.setup`,
    ``collect_params`` and ``build_optimizer`` see them."""

    def __call__(cls, *args, **kwargs):
        adapter = super().__call__(*args, **kwargs)
        adapter._set_up()
        return adapter

    @property
    def __signature__(cls) -> inspect.Signature:
        # the constructor's arguments, not this __call__'s (*args, **kwargs): adapter_defaults reads them
        signature = inspect.signature(cls.__init__)
        return signature.replace(parameters=list(signature.parameters.values())[1:])


class TTAdapter(nn.Module, metaclass=_SetUpAfterConstruction):
    """Base class of test-time adapters: ``adapter(x)`` adapts on ``x`` and returns its prediction (:meth:`predict`,
    after the update).

    Construction: the subclass's constructor calls ``super().__init__`` and sets its own fields (plain values before
    or after that call, modules after it); once the whole constructor has returned, the base class configures the
    model (:meth:`configure_model`), freezes its parameters, and calls :meth:`setup`, where a subclass registers its
    extra modules and builds what depends on the configured model; then it keeps the source state for :meth:`reset`.

    A subclass implements :meth:`adapt` (one update on a batch, returning its :class:`AdaptationStep`) and may
    override :meth:`predict` (a method that changes the prediction rather than the weights). The base class resets
    before every batch when episodic and skips batches with non-finite values. Methods that take gradient steps
    derive from :class:`GradientAdapter`, which adds the optimizer and the rollback of non-finite updates.

    Args:
        model: the source model, adapted in place.
        episodic: reset to the source state before every batch (otherwise adaptation is continual).
        normalization: how every BatchNorm normalises (:class:`~monai_grata.tta.BatchNormPolicy`; None: the class's
            ``default_normalization``, the test batch's own statistics as in the papers). A prior that follows the
            stream (``momentum``) moves once per batch, in its prediction forward.
    """

    #: whether results depend on a random seed (a benchmark then runs several seeds)
    stochastic: bool = False
    #: the BatchNorm policy when the constructor gets none
    default_normalization: BatchNormPolicy = BatchNormPolicy()
    #: what ``adapter(x)`` returns: the prediction ``"after"`` the update (see :class:`GradientAdapter`)
    prediction_order: str = "after"

    def __init__(self, model: nn.Module, episodic: bool = False, normalization: BatchNormPolicy | None = None) -> None:
        super().__init__()
        self.normalization = self.resolve_normalization(normalization)
        self.model, self.episodic = model, episodic
        #: the statistics of the latest :meth:`adapt_batch` (None before the first)
        self.last_step: AdaptationStep | None = None
        self.n_skipped = 0

    def _set_up(self) -> None:
        """Configure and freeze the model, run :meth:`setup`, keep the source state (after the constructor)."""
        self.model = self.configure_model(self.model)
        self.model.requires_grad_(False)
        self.setup()
        self._source_model = copy.deepcopy(self.model.state_dict())

    @classmethod
    def resolve_normalization(cls, normalization: BatchNormPolicy | None) -> BatchNormPolicy:
        """``normalization``, or the class's default policy when it is None.

        Raises:
            TypeError: something other than a :class:`~monai_grata.tta.BatchNormPolicy`.
        """
        if normalization is None:
            return cls.default_normalization
        if not isinstance(normalization, BatchNormPolicy):
            raise TypeError(f"normalization must be a BatchNormPolicy or None, got {type(normalization).__name__}")
        return normalization

    def configure_model(self, model: nn.Module) -> nn.Module:
        """Prepare the model for adaptation (default: eval mode; every BatchNorm an
        :class:`~monai_grata.tta.AdaptiveBatchNorm` that normalises as :attr:`normalization` says)."""
        return convert_to_adaptive_batch_norm(model.eval(), self.normalization)

    def setup(self) -> None:
        """Set up what the method needs beyond the configured, frozen :attr:`model` (its extra modules, hooks on
        the model's layers); runs once, after the constructor and :meth:`configure_model`. Default: nothing."""

    @property
    def last_stats(self) -> dict[str, torch.Tensor]:
        """The latest step's statistics by name (:meth:`AdaptationStep.scalars`), for callers of the earlier
        interface; prefer :attr:`last_step`."""
        return {} if self.last_step is None else self.last_step.scalars()

    def adapt(self, x: torch.Tensor) -> AdaptationStep:
        """Run one update on the batch ``x``; return the step's statistics (0-dim tensors)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction of ``x`` with the adapted state (default: the model's forward). An evaluator's inferer
        calls it in place of the network, for the whole input or for each window of a sliding window."""
        return self.model(x)

    def reset(self) -> None:
        """Restore the source state, bit-exactly, and forget the stream (the site gate's record)."""
        self.model.load_state_dict(self._source_model, strict=True)
        for layer in adaptive_batch_norms(self.model):
            layer.reset_stream()

    def adapt_batch(self, x: torch.Tensor) -> AdaptationStep:
        """Adapt on ``x`` (with the episodic reset and the input check); return the step's statistics.

        Works inside a caller's ``torch.no_grad()`` block, such as a MONAI evaluator's forward.
        """
        if self.episodic:
            self.reset()
        if not bool(torch.isfinite(x).all()):
            self.n_skipped += 1
            logger.warning("skipped adaptation on a batch with NaN/Inf values (no update)")
            self.last_step = AdaptationStep(updated=False, skipped=True)
            return self.last_step
        step = self._checked_adapt(x)
        if not isinstance(step, AdaptationStep):
            raise TypeError(f"{type(self).__name__}.adapt must return an AdaptationStep, got {type(step).__name__}")
        self.last_step = step
        return step

    @torch.no_grad()
    def _checked_adapt(self, x: torch.Tensor) -> AdaptationStep:
        return self.adapt(x)  # no gradient step: no autograd graph either

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adapt on ``x`` and return its prediction after the update."""
        self.adapt_batch(x)
        return self._predict_batch(x)

    def _predict_batch(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`predict` as the batch's one prediction: a BatchNorm prior that follows the stream moves in it."""
        with torch.no_grad(), record_function("tta/predict"), track_test_statistics(self.model):
            return self.predict(x)


class GradientAdapter(TTAdapter):
    """Base class of the adapters that take gradient steps: :class:`TTAdapter` plus the adapted parameters, their
    optimizer, and the rollback of an update that leaves any adapted parameter non-finite (the weights and the
    optimizer's state before the step are restored).

    After :meth:`~TTAdapter.setup` the base class collects the parameters (:meth:`collect_params`), freezes all
    others and builds the optimizer (:meth:`build_optimizer`); :meth:`reset` restores the source weights and a
    fresh optimizer state.

    Args:
        model: the source model, adapted in place.
        episodic: reset to the source weights before every batch (otherwise adaptation is continual).
        normalization: how every BatchNorm normalises (see :class:`TTAdapter`).
        predict: which prediction ``adapter(x)`` returns (kept as :attr:`prediction_order`): ``"after"`` (the model
            updated on ``x`` predicts it) or ``"before"`` (the logits of the forward the update's loss was computed
            from, as TENT, SAR and MedBN return them; only methods that compute their loss through
            :meth:`loss_forward` have them, and a batch whose update was skipped gets a fresh forward).
    """

    def __init__(
        self,
        model: nn.Module,
        episodic: bool = False,
        normalization: BatchNormPolicy | None = None,
        predict: str = "after",
    ) -> None:
        if predict not in PREDICTION_ORDERS:
            raise ValueError(f"predict must be one of {PREDICTION_ORDERS} (relative to the update), got {predict!r}")
        super().__init__(model, episodic=episodic, normalization=normalization)
        self.prediction_order = predict
        #: with ``predict="before"``, inside :meth:`forward`: the detached logits of the batch's loss forward
        self.logits_before: torch.Tensor | None = None
        self._keep_logits_before = False
        self.n_rolled_back = 0

    def _set_up(self) -> None:
        super()._set_up()
        self.params = self.collect_params(self.model)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = self.build_optimizer(self.params)
        self._source_optimizer = copy.deepcopy(self.optimizer.state_dict())

    def collect_params(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters to adapt (default: normalisation affine parameters)."""
        return collect_norm_params(model)

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer of the adapted parameters (default: Adam, lr 1e-4)."""
        return torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999))

    def loss_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward of ``x`` that the update's loss is computed from (with gradients).

        With ``predict="before"``, inside :meth:`forward`, the first such forward of a batch is its prediction: its
        logits are kept, detached, in ``logits_before``, and it moves a following BatchNorm prior (``momentum``)
        as the prediction forward does with ``predict="after"``, so the prior moves once per batch either way.
        Later forwards of the batch (e.g. SAR's at perturbed weights) are plain forwards.
        """
        if not self._keep_logits_before:
            return self.model(x)
        self._keep_logits_before = False
        with track_test_statistics(self.model):
            logits = self.model(x)
        self.logits_before = logits.detach()
        return logits

    def reset(self) -> None:
        """Restore the source weights and a fresh optimizer state, bit-exactly."""
        super().reset()
        self.optimizer.load_state_dict(self._source_optimizer)
        self.optimizer.state.clear()

    @torch.enable_grad()
    def _checked_adapt(self, x: torch.Tensor) -> AdaptationStep:
        """:meth:`adapt`, rolled back when it leaves an adapted parameter non-finite."""
        before = [p.detach().clone() for p in self.params]
        optimizer_before = _snapshot_optimizer(self.optimizer)
        step = self.adapt(x)
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all()):
            with torch.no_grad():
                for p, old in zip(self.params, before, strict=True):
                    p.copy_(old)
            _restore_optimizer(self.optimizer, optimizer_before)
            self.n_rolled_back += 1
            logger.warning("rolled back an adaptation step that left non-finite adapted weights")
            step.updated, step.rolled_back = False, True
        return step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adapt on ``x`` and return its logits: from the updated model (``predict="after"``), or those of the loss
        forward before the update (``predict="before"``, no second forward).

        A batch skipped for non-finite values gets a fresh forward. After a rolled-back update the loss forward's
        logits are kept: they are the restored weights' prediction.
        """
        self.logits_before = None
        self._keep_logits_before = self.prediction_order == "before"
        try:
            self.adapt_batch(x)
        finally:
            self._keep_logits_before = False
        logits, self.logits_before = self.logits_before, None
        return logits if logits is not None else self._predict_batch(x)
