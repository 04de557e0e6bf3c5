from .alignment import (
    ALIGNMENTS,
    AdversarialAlignmentLoss,
    EntropyAlignmentLoss,
    build_alignment_loss,
    discriminator_loss,
)
from .gradient_harmonization import GH_MODES, GradientHarmonizedLoss, gh_weights

__all__ = [
    "ALIGNMENTS",
    "GH_MODES",
    "AdversarialAlignmentLoss",
    "EntropyAlignmentLoss",
    "GradientHarmonizedLoss",
    "build_alignment_loss",
    "discriminator_loss",
    "gh_weights",
]
