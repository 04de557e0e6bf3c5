"""Test-time adapters: plain torch, no Ignite or MLflow."""

from .base import (
    NORM_LAYERS,
    TTAdapter,
    adapter_class,
    adapter_names,
    build_adapter,
    collect_norm_params,
    configure_batch_statistics,
    register_adapter,
)
from .batchnorm import (
    batch_statistics_weight,
    per_group_batch_norm,
    set_prior_strength,
    source_prior_batch_norm,
    track_test_statistics,
)
from .grata import ACTIVATIONS, GraTa
from .losses import consistency_loss, entropy_loss, probabilities
from .norm import BatchNormStatistics, SelectedBatchNormStatistics
from .presets import PRESETS, resolve_method
from .tent import Tent

__all__ = [
    "ACTIVATIONS",
    "BatchNormStatistics",
    "SelectedBatchNormStatistics",
    "NORM_LAYERS",
    "PRESETS",
    "GraTa",
    "TTAdapter",
    "Tent",
    "adapter_class",
    "adapter_names",
    "build_adapter",
    "collect_norm_params",
    "configure_batch_statistics",
    "consistency_loss",
    "entropy_loss",
    "per_group_batch_norm",
    "set_prior_strength",
    "source_prior_batch_norm",
    "track_test_statistics",
    "batch_statistics_weight",
    "probabilities",
    "register_adapter",
    "resolve_method",
]
