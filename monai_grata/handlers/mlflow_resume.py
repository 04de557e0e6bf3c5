"""An MLflow handler that continues its run across resumed trainings, even when a parameter changed."""

from __future__ import annotations

import logging
from typing import Any

from monai.handlers import MLFlowHandler

__all__ = ["ResumableMLFlowHandler"]

logger = logging.getLogger(__name__)
CHANGED_TAG_PREFIX = "changed_param."


class ResumableMLFlowHandler(MLFlowHandler):
    """``MLFlowHandler`` for trainings that are resumed into the same MLflow run (a fixed ``run_name``).

    MLflow parameters cannot change once logged, so a run resumed with, say, another ``batch_size`` makes the
    plain ``MLFlowHandler`` fail at start ("Changing param values is not allowed"). This handler logs only the
    parameters the run does not have yet; a changed value keeps its first logged value as the parameter and is
    recorded, with a warning, as the tag ``changed_param.<key>`` = ``"<first> -> <new>"`` (the newest change).
    The run's metrics stay one continuous history. Arguments are those of ``MLFlowHandler``.
    """

    def _log_params(self, params: dict[str, Any]) -> None:
        if not self.cur_run:
            raise ValueError("Current Run is not Active to log params")
        run_id = self.cur_run.info.run_id
        logged = self.client.get_run(run_id).data.params
        new = {key: value for key, value in params.items() if key not in logged}
        for key, value in params.items():
            if key in logged and logged[key] != str(value):
                logger.warning(
                    f"MLflow run {run_id} continues with {key}={value} (logged as {logged[key]}); "
                    f"recorded as tag {CHANGED_TAG_PREFIX}{key}"
                )
                self.client.set_tag(run_id, f"{CHANGED_TAG_PREFIX}{key}", f"{logged[key]} -> {value}")
        super()._log_params(new)
