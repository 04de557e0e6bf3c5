import logging
import warnings

from monai_grata.utils import quiet_console
from monai_grata.utils.console import QUIET_LOGGERS

WARNINGS = [
    ("monai.metrics.utils get_mask_edges:always_return_as_numpy: deprecated since 1.5.0", FutureWarning),
    ("the prediction of class 1 is all 0, this may result in nan/inf distance.", UserWarning),
    ("something a user should see", UserWarning),
]


def test_quiet_console_drops_what_a_user_cannot_act_on():
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    try:
        with warnings.catch_warnings(record=True) as caught:  # restores the warning filters afterwards
            warnings.simplefilter("always")
            quiet_console()
            for message, category in WARNINGS:
                warnings.warn(message, category, stacklevel=1)
        assert [str(w.message) for w in caught] == ["something a user should see"]
        evaluator = logging.getLogger("ignite.engine.engine.SupervisedEvaluator")
        assert not evaluator.isEnabledFor(logging.INFO) and evaluator.isEnabledFor(logging.WARNING)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
