from .channels import EnsureImageChannels, EnsureImageChannelsd
from .intensity import StrongIntensityAug, StrongIntensityAugd
from .io import NIFTI_SUFFIXES, SaveMaskd, SaveOverlayd, is_nifti
from .label import (
    DiscCupFromLabel,
    DiscCupFromLabeld,
    LabelFromDiscCup,
    LabelFromDiscCupd,
    LabelFromMasksd,
    LabelFromNestedChannels,
    LabelFromNestedChannelsd,
    NestedChannelsFromLabel,
    NestedChannelsFromLabeld,
)
from .views import IN_PLANE_3D, WEAK_VIEWS, WEAK_VIEWS_3D, WeakViews, WeakViewsd, weak_views

__all__ = [
    "NIFTI_SUFFIXES",
    "IN_PLANE_3D",
    "WEAK_VIEWS",
    "WEAK_VIEWS_3D",
    "DiscCupFromLabel",
    "DiscCupFromLabeld",
    "EnsureImageChannels",
    "EnsureImageChannelsd",
    "LabelFromDiscCup",
    "LabelFromDiscCupd",
    "LabelFromNestedChannels",
    "LabelFromNestedChannelsd",
    "LabelFromMasksd",
    "NestedChannelsFromLabel",
    "NestedChannelsFromLabeld",
    "SaveMaskd",
    "SaveOverlayd",
    "StrongIntensityAug",
    "StrongIntensityAugd",
    "WeakViews",
    "WeakViewsd",
    "is_nifti",
    "weak_views",
]
