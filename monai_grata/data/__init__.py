from .checks import (
    BAD_INPUT_CHOICES,
    BadInputError,
    MissingInputError,
    check_inputs,
    check_loader,
    exit_on_bad_input,
)
from .datalist import IMAGE_SUFFIXES, domain_datalist, folder_datalist, split_train_val, target_datalist
from .preprocessing import check_image_size, fundus_preprocessing
from .task import FUNDUS, SPINALCORD, TASKS, TaskSpec, register_task, resolve_task, task_by_name, task_of_bundle
from .volumes import volume_preprocessing

__all__ = [
    "FUNDUS",
    "SPINALCORD",
    "TASKS",
    "TaskSpec",
    "register_task",
    "resolve_task",
    "task_by_name",
    "task_of_bundle",
    "BAD_INPUT_CHOICES",
    "IMAGE_SUFFIXES",
    "BadInputError",
    "MissingInputError",
    "check_image_size",
    "check_inputs",
    "check_loader",
    "domain_datalist",
    "folder_datalist",
    "fundus_preprocessing",
    "exit_on_bad_input",
    "split_train_val",
    "target_datalist",
    "volume_preprocessing",
]
