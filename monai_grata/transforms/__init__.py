from .channels import EnsureImageChannels, EnsureImageChannelsd
from .intensity import StrongIntensityAug, StrongIntensityAugd
from .io import NIFTI_SUFFIXES, SaveMaskd, SaveOverlayd, is_nifti
from .label import DiscCupFromLabel, DiscCupFromLabeld, LabelFromDiscCup, LabelFromDiscCupd
from .views import WEAK_VIEWS, WeakViews, WeakViewsd

__all__ = [
    "NIFTI_SUFFIXES",
    "WEAK_VIEWS",
    "DiscCupFromLabel",
    "DiscCupFromLabeld",
    "EnsureImageChannels",
    "EnsureImageChannelsd",
    "LabelFromDiscCup",
    "LabelFromDiscCupd",
    "SaveMaskd",
    "SaveOverlayd",
    "StrongIntensityAug",
    "StrongIntensityAugd",
    "WeakViews",
    "WeakViewsd",
    "is_nifti",
]
