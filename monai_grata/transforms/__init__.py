from .channels import EnsureImageChannels, EnsureImageChannelsd
from .intensity import StrongIntensityAug, StrongIntensityAugd
from .label import DiscCupFromLabel, DiscCupFromLabeld, LabelFromDiscCup, LabelFromDiscCupd
from .views import WEAK_VIEWS, WeakViews, WeakViewsd

__all__ = [
    "WEAK_VIEWS",
    "DiscCupFromLabel",
    "DiscCupFromLabeld",
    "EnsureImageChannels",
    "EnsureImageChannelsd",
    "LabelFromDiscCup",
    "LabelFromDiscCupd",
    "StrongIntensityAug",
    "StrongIntensityAugd",
    "WeakViews",
    "WeakViewsd",
]
