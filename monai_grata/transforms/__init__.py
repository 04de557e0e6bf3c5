from .channels import EnsureImageChannels, EnsureImageChannelsd
from .intensity import StrongIntensityAug, StrongIntensityAugd
from .label import DiscCupFromLabel, DiscCupFromLabeld
from .views import WEAK_VIEWS, WeakViews, WeakViewsd

__all__ = [
    "WEAK_VIEWS",
    "DiscCupFromLabel",
    "DiscCupFromLabeld",
    "EnsureImageChannels",
    "EnsureImageChannelsd",
    "StrongIntensityAug",
    "StrongIntensityAugd",
    "WeakViews",
    "WeakViewsd",
]
