from .metrics_report import MetricsReport
from .stream_report import StreamReport
from .tta import GraTaHandler, TTAHandler, tta_output_transform

__all__ = ["GraTaHandler", "MetricsReport", "StreamReport", "TTAHandler", "tta_output_transform"]
