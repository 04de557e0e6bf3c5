"""Keeping a bundle run's console to what a user can act on."""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_console"]

QUIET_LOGGERS = ("ignite.engine.engine.SupervisedEvaluator", "mlflow.store.db.utils", "alembic")
"""Loggers whose INFO lines say nothing a user of an inference run can act on: the evaluator's "Engine run
resuming from iteration 0", "Got new best metric" and timing lines, and MLflow's database set-up."""


def quiet_console() -> None:
    """Silence the messages of an inference run that a user cannot act on.

    Ignored warnings: MONAI's deprecation of ``get_mask_edges(always_return_as_numpy)`` (raised inside
    MONAI's own ``SurfaceDistance``) and "the prediction/ground truth of class N is all 0" (an ASSD that is
    undefined; ``metrics.json`` counts those images as ``n_assd_undefined``). The loggers in
    :data:`QUIET_LOGGERS` are set to ``WARNING``; warnings and errors still show.

    MONAI's security notice that a bundle config runs code is printed before any config is read, out of reach
    of this function; a user silences it with Python's own warning filter (``docs/install.md``).
    """
    warnings.filterwarnings("ignore", message=r".*get_mask_edges.*always_return_as_numpy", category=FutureWarning)
    undefined_assd = r"the (prediction|ground truth) of class \d+ is all 0"
    warnings.filterwarnings("ignore", message=undefined_assd, category=UserWarning)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
