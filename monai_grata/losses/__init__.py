from .gradient_harmonization import GH_MODES, GradientHarmonizedLoss, gh_weights

__all__ = ["GH_MODES", "GradientHarmonizedLoss", "gh_weights"]
