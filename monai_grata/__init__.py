"""monai-grata: test-time adaptation (GraTa) and gradient-harmonized UDA (GH/GH++) for MONAI."""

__version__ = "0.1.0"

from . import data, engines, handlers, losses, networks, optimizers, transforms, tta, utils  # noqa: E402

__all__ = ["data", "engines", "handlers", "losses", "networks", "optimizers", "transforms", "tta", "utils"]
