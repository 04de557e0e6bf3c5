"""The steps of the training and evaluation jobs that read what the user gave (folders, datalists, checkpoints):
a bad input ends the job with one line, ``error: <problem>``, as the main job's steps do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monai_grata.data.checks import exit_on_bad_input

__all__ = ["job_step"]


@exit_on_bad_input()
def job_step(function: Callable, /, *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` as a step of a bundle job: a :class:`~monai_grata.data.BadInputError` it raises
    (a missing folder or checkpoint, an empty dataset or split, an unwritable output folder) ends the program with the
    one line ``error: <message>`` and no traceback; any other exception passes unchanged. A config writes e.g.
    ``"$monai_grata.engines.job_step(monai_grata.data.domain_datalist, @dataset_dir, @source, @datalist)"``.

    Args:
        function: a library function that raises ``BadInputError`` for its caller to handle.
        args: its positional arguments.
        kwargs: its keyword arguments.

    Raises:
        SystemExit: ``error: <problem>`` for a bad input.
    """
    return function(*args, **kwargs)
