"""Writing output files atomically, so an interrupted run never leaves a half-written one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

__all__ = ["atomic_write", "make_output_dir"]


def make_output_dir(path: str) -> str:
    """Create the output folder ``path`` and check that files can be written in it, so a read-only or full
    location stops a run before any work, with a one-line error.

    Raises:
        BadInputError: the folder cannot be created or written to.
    """
    from monai_grata.data.checks import BadInputError

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise BadInputError(f"output folder {path!r} cannot be written: {err.strerror or err}") from err
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing and move it onto ``path`` only when the block ends
    without an exception (``os.replace`` is atomic on one file system). On an error or Ctrl-C the
    temporary file is removed and ``path`` keeps its previous content, or stays absent.

    Args:
        path: the file to write; its folder is created.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        open_kwargs: further arguments of ``open`` (e.g. ``newline=""`` for CSV).

    Example::

        with atomic_write("out/metrics.json") as f:
            json.dump(summary, f)
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
