from .alignment import AdversarialAlignmentLoss, EntropyAlignmentLoss, discriminator_loss
from .gradient_harmonization import GH_MODES, GradientHarmonizedLoss, gh_weights

__all__ = [
    "GH_MODES",
    "AdversarialAlignmentLoss",
    "EntropyAlignmentLoss",
    "GradientHarmonizedLoss",
    "discriminator_loss",
    "gh_weights",
]
