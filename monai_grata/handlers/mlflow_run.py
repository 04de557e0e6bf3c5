"""An MLflow handler whose run always ends: ``FINISHED`` when the engine completes, ``FAILED`` when it raises."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

__all__ = ["ERROR_TAG", "MLFlowRunHandler"]

logger = logging.getLogger(__name__)
ERROR_TAG = "error"


def _describe(error: BaseException) -> str:
    """``Type: first line`` of the innermost cause (MONAI wraps a transform's error in ``RuntimeError``s)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


class MLFlowRunHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` that never leaves its run ``RUNNING``.

    MONAI's handler ends its run only at ``COMPLETED`` (with ``close_on_complete=True``); an engine that
    raises, or that the user stops with Ctrl-C, leaves a ``RUNNING`` run that looks like a finished one. This
    handler also listens to ``EXCEPTION_RAISED``: it marks the run ``FAILED``, records the error (type and
    first line of the message of its innermost cause) as the tag ``error``, and re-raises. Ignite calls
    ``EXCEPTION_RAISED`` handlers in the order they were attached and stops at the first that raises (MONAI's
    ``StatsHandler`` re-raises too), so attach this handler before ``StatsHandler``.

    Arguments are those of ``MLFlowHandler``; ``close_on_complete`` defaults to ``True`` here.
    """

    def __init__(self, *args, close_on_complete: bool = True, **kwargs) -> None:
        super().__init__(*args, close_on_complete=close_on_complete, **kwargs)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if not engine.has_event_handler(self.failed, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    def failed(self, engine: Engine, error: BaseException) -> None:
        """Mark the run ``FAILED`` with the error as a tag, close it, and re-raise ``error``."""
        if self.cur_run is not None:
            run_id = self.cur_run.info.run_id
            message = _describe(error)
            try:
                self.client.set_tag(run_id, ERROR_TAG, message[:5000])
                self.client.set_terminated(run_id, "FAILED")
                self.cur_run = None
            except Exception as err:  # the store itself may be what failed: keep the original error
                logger.warning(f"could not mark MLflow run {run_id} as FAILED: {err}")
            finally:
                self._dispose_sqlite_store()
        raise error
