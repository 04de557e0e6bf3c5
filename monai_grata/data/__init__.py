from .datalist import IMAGE_SUFFIXES, domain_datalist, folder_datalist, split_train_val, target_datalist
from .preprocessing import check_image_size, fundus_preprocessing

__all__ = [
    "IMAGE_SUFFIXES",
    "check_image_size",
    "domain_datalist",
    "folder_datalist",
    "fundus_preprocessing",
    "split_train_val",
    "target_datalist",
]
