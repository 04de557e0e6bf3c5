"""Test-time adapters: plain torch, no Ignite or MLflow."""

from .base import (
    NORM_LAYERS,
    GradientAdapter,
    TTAdapter,
    adapter_class,
    adapter_defaults,
    adapter_names,
    build_adapter,
    collect_norm_params,
    register_adapter,
)
from .calibration import per_batch_shifts, read_first_shift_threshold, read_shift_threshold, shift_threshold
from .detta import DeTTA, DeTTAStep, blind_spot, denoising_loss
from .diga import DIGA, DIGAStep
from .dltta import DLTTA, DLTTAStep, symmetric_kl
from .domainadaptor import DomainAdaptor, DomainAdaptorStep, generalized_entropy_loss
from .dua import DUA, DUAStep, dua_copies
from .features import FeatureTap
from .grata import ACTIVATIONS, GraTa, GraTaStep
from .losses import consistency_loss, entropy_loss, probabilities
from .medbn import MedBN
from .norm import BatchNormStatistics, NormStep, SelectedBatchNormStatistics
from .normalization import (
    AdaptiveBatchNorm,
    BatchNormPolicy,
    batch_statistics_weight,
    convert_to_adaptive_batch_norm,
    convert_to_batch_norm,
    frozen_statistics,
    normalisation_statistics,
    per_group_batch_norm,
    samples_per_input,
    track_test_statistics,
    update_running_statistics,
)
from .patches import PatchAdaptation, patch_positions, sample_patches
from .presets import CALIBRATED, PRESETS, calibrated_options, effective_options, resolve_method
from .sar import SAR, SARStep, pixel_entropy
from .shift import SettleSchedule, batch_norm_shift, record_batch_norm_shift
from .steps import AdaptationStep
from .tent import Tent, TentStep

__all__ = [
    "ACTIVATIONS",
    "AdaptationStep",
    "DeTTAStep",
    "DIGAStep",
    "DLTTAStep",
    "DomainAdaptorStep",
    "DUAStep",
    "GradientAdapter",
    "GraTaStep",
    "NormStep",
    "SARStep",
    "TentStep",
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
    "pixel_entropy",
    "symmetric_kl",
    "update_running_statistics",
    "BatchNormStatistics",
    "SelectedBatchNormStatistics",
    "NORM_LAYERS",
    "CALIBRATED",
    "PRESETS",
    "GraTa",
    "TTAdapter",
    "Tent",
    "adapter_class",
    "adapter_names",
    "build_adapter",
    "calibrated_options",
    "collect_norm_params",
    "consistency_loss",
    "entropy_loss",
    "per_group_batch_norm",
    "samples_per_input",
    "AdaptiveBatchNorm",
    "BatchNormPolicy",
    "convert_to_adaptive_batch_norm",
    "convert_to_batch_norm",
    "adapter_defaults",
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
    "read_first_shift_threshold",
    "read_shift_threshold",
    "shift_threshold",
]
