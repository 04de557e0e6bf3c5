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
    median_batch_norm,
    per_group_batch_norm,
    set_prior_strength,
    source_prior_batch_norm,
    track_test_statistics,
    update_running_statistics,
)
from .calibration import per_batch_shifts, read_shift_threshold, shift_threshold
from .detta import DeTTA, blind_spot, denoising_loss
from .diga import DIGA
from .dltta import DLTTA, symmetric_kl
from .domainadaptor import DomainAdaptor, generalized_entropy_loss
from .dua import DUA, dua_copies
from .features import FeatureTap
from .frozen_statistics import frozen_statistics, normalisation_statistics
from .grata import ACTIVATIONS, GraTa
from .losses import consistency_loss, entropy_loss, probabilities
from .medbn import MedBN
from .norm import BatchNormStatistics, SelectedBatchNormStatistics
from .patches import PatchAdaptation, patch_positions, sample_patches
from .presets import PRESETS, effective_options, resolve_method
from .sar import SAR, pixel_entropy
from .shift import SettleSchedule, batch_norm_shift, record_batch_norm_shift
from .tent import Tent

__all__ = [
    "ACTIVATIONS",
    "DIGA",
    "DeTTA",
    "blind_spot",
    "denoising_loss",
    "DLTTA",
    "DUA",
    "DomainAdaptor",
    "FeatureTap",
    "MedBN",
    "PatchAdaptation",
    "SAR",
    "dua_copies",
    "frozen_statistics",
    "normalisation_statistics",
    "patch_positions",
    "sample_patches",
    "generalized_entropy_loss",
    "median_batch_norm",
    "pixel_entropy",
    "symmetric_kl",
    "update_running_statistics",
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
    "batch_norm_shift",
    "record_batch_norm_shift",
    "SettleSchedule",
    "probabilities",
    "register_adapter",
    "resolve_method",
    "effective_options",
    "per_batch_shifts",
    "read_shift_threshold",
    "shift_threshold",
]
