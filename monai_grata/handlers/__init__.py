from .harmonization import HARMONIZATION_KEYS, HarmonizationReport, harmonization_output_transform
from .metrics_report import MetricsReport
from .mlflow_resume import ResumableMLFlowHandler
from .mlflow_run import MLFlowRunHandler
from .no_adapt import NoAdaptReference
from .stream_report import StreamReport
from .summary import RunSummary
from .surface_distance import PhysicalSurfaceDistance, voxel_spacing
from .tta import GraTaHandler, TTAHandler, tta_output_transform

__all__ = [
    "HARMONIZATION_KEYS",
    "GraTaHandler",
    "HarmonizationReport",
    "MLFlowRunHandler",
    "MetricsReport",
    "NoAdaptReference",
    "PhysicalSurfaceDistance",
    "ResumableMLFlowHandler",
    "RunSummary",
    "StreamReport",
    "TTAHandler",
    "harmonization_output_transform",
    "tta_output_transform",
    "voxel_spacing",
]
