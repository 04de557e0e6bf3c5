"""An MLflow handler that continues its run across resumed trainings, even when a parameter changed."""

from __future__ import annotations

import logging
from typing import Any

from ignite.engine import Engine

from .mlflow_run import MLFlowRunHandler

__all__ = ["ResumableMLFlowHandler"]

logger = logging.getLogger(__name__)
CHANGED_TAG_PREFIX = "changed_param."


class ResumableMLFlowHandler(MLFlowRunHandler):
    """:class:`MLFlowRunHandler` for trainings that are resumed into the same MLflow run (a fixed ``run_name``).

    At start it continues the newest run of that name whatever its status (a run that ended ``FINISHED`` or
    ``FAILED`` is set back to ``RUNNING``), where MONAI's handler would start a new one after a finished run.

    MLflow parameters cannot change once logged, so a run resumed with, say, another ``batch_size`` makes the
    plain ``MLFlowHandler`` fail at start ("Changing param values is not allowed"). This handler logs only the
    parameters the run does not have yet; a changed value keeps its first logged value as the parameter and is
    recorded, with a warning, as the tag ``changed_param.<key>`` = ``"<first> -> <new>"`` (the newest change).
    The run's metrics stay one continuous history. Arguments are those of ``MLFlowHandler``; give the
    handler of an evaluator that runs inside the training ``close_on_complete=False``.
    """

    def start(self, engine: Engine) -> None:
        if not self.cur_run and self.run_name is not None:
            self._set_experiment()
            if self.experiment is not None:
                runs = self.client.search_runs([self.experiment.experiment_id])
                runs = [r for r in runs if r.info.run_name == self.run_name]
                if runs:
                    run = max(runs, key=lambda r: r.info.start_time)
                    if run.info.status != "RUNNING":
                        self.client.update_run(run.info.run_id, status="RUNNING")
                    self.cur_run = self.client.get_run(run.info.run_id)
        super().start(engine)

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
