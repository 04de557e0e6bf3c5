from .metrics_report import MetricsReport

__all__ = ["MetricsReport"]
