"""Checks that turn a user's data mistakes into one clear error before any work starts."""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch.utils.data import DataLoader

__all__ = ["BadInputError", "MissingInputError", "check_loader", "report_bad_input_briefly"]


class BadInputError(ValueError):
    """A problem with the user's data or options, stated in one line that names the file (or option) and what
    to change; :func:`report_bad_input_briefly` prints it without a traceback."""


class MissingInputError(BadInputError, FileNotFoundError):
    """A file or folder the user named (or a datalist lists) does not exist."""


def check_loader(loader: DataLoader, what: str, option: str = "--batch_size") -> DataLoader:
    """Return ``loader``, or raise when it yields no batch at all.

    A ``DataLoader`` with ``drop_last=True`` and fewer items than ``batch_size`` is empty: an engine run on it
    would do nothing and exit successfully (MONAI only warns). The bundle configs fail instead, naming the
    numbers and the option to change; they never shrink the batch behind the user's back, so the
    ``batch_size`` logged in MLflow is the one that ran.

    Args:
        loader: the data loader to check.
        what: what it loads, for the message (e.g. ``"the training split of 'refuge_train'"``).
        option: the command-line option that sets its batch size.

    Raises:
        BadInputError: when ``len(loader) == 0``.
    """
    if len(loader) > 0:
        return loader
    n, batch_size = len(loader.dataset), loader.batch_size
    if n == 0:
        raise BadInputError(f"no images in {what}: add images or point --dataset_dir/--datalist at them")
    raise BadInputError(
        f"{what} has {n} images, fewer than one batch ({option} {batch_size}, incomplete batches dropped): "
        f"pass {option} {n} or less, or add images"
    )


def _bad_input(error: BaseException | None) -> BadInputError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BadInputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def report_bad_input_briefly(stream=None) -> Callable:
    """Install a ``sys.excepthook`` that prints a :class:`BadInputError` (also when it is the cause of another
    exception, as in a bundle config expression) as one line, ``error: <message>``, without the traceback;
    every other exception keeps Python's usual report. The bundle configs call it first in ``initialize``.

    Args:
        stream: where to print (default ``sys.stderr`` at the time of the error).

    Returns:
        the hook installed.
    """
    previous = sys.excepthook

    def hook(kind, value, traceback):
        bad = _bad_input(value)
        if bad is None:
            previous(kind, value, traceback)
        else:
            print(f"error: {bad}", file=stream or sys.stderr)

    sys.excepthook = hook
    return hook
