"""Ctrl-C that stops an Ignite engine between iterations, where no part of Python can drop it."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["run_interruptibly", "stop_when_interrupted"]

#: set while a :func:`run_interruptibly` run has received a first Ctrl-C; None outside such a run
_interrupt_requested: threading.Event | None = None


def _raise_if_interrupted(_: Engine) -> None:
    if _interrupt_requested is not None and _interrupt_requested.is_set():
        raise KeyboardInterrupt


def stop_when_interrupted(engine: Engine) -> None:
    """Make an engine run inside a :func:`run_interruptibly` run (e.g. a reference pass started from one of its
    event handlers) stop after its own current iteration on the first Ctrl-C, instead of running to its end before
    the outer engine can stop. Outside such a run it changes nothing.

    Args:
        engine: the nested Ignite engine; attach this after its other ``ITERATION_COMPLETED`` handlers.
    """
    engine.add_event_handler(Events.ITERATION_COMPLETED, _raise_if_interrupted)


def run_interruptibly(engine: Engine, *args: Any, **kwargs: Any) -> Any:
    """``engine.run(*args, **kwargs)``, with Ctrl-C stopping the engine once the iteration in flight is done.

    Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives. Inside an object
    finalizer (``__del__``, a weakref callback, a garbage-collection pass) the interrupt is printed as "Exception
    ignored" and dropped, and the stream runs on to its end as if nothing had happened (seen in CI runs of the
    main job). Here the first Ctrl-C only sets a flag; an ``ITERATION_COMPLETED`` handler, attached after every
    other, raises ``KeyboardInterrupt`` from the engine's own frame, so it goes through Ignite's
    ``EXCEPTION_RAISED`` handlers (the MLflow run ends ``FAILED``) after the current image is fully written and
    logged. A second Ctrl-C interrupts at once.

    Only Python's own SIGINT handler is replaced, and it is put back when the run ends, however it ends. Where SIGINT
    is ignored (``SIG_IGN``, which a process inherits when a non-interactive shell starts it in the background, as
    in ``nohup cmd &`` in a script, or after ``trap '' INT``), nothing is installed and the run stays
    uninterruptible, as its launcher asked. Likewise where SIGINT has any other handler, and outside the main
    thread (where a signal handler cannot be installed): these are a plain ``engine.run``. An engine run from one of
    ``engine``'s handlers stops with it when it is given :func:`stop_when_interrupted`.

    Args:
        engine: the Ignite engine (e.g. a MONAI ``SupervisedEvaluator``) to run.
        args: positional arguments of ``engine.run`` (none for a MONAI workflow).
        kwargs: keyword arguments of ``engine.run``.

    Returns:
        What ``engine.run`` returns.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.getsignal(signal.SIGINT)
    # SIG_IGN included: a Ctrl-C the launcher made the job ignore stays ignored
    if not in_main_thread or previous_handler is not signal.default_int_handler:
        return engine.run(*args, **kwargs)
    global _interrupt_requested
    interrupted = _interrupt_requested = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted.set()
        sys.stderr.write("\nCtrl-C: stopping after the current iteration (Ctrl-C again to stop at once)\n")
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C raises at once

    check = engine.add_event_handler(Events.ITERATION_COMPLETED, _raise_if_interrupted)
    signal.signal(signal.SIGINT, on_sigint)
    try:
        result = engine.run(*args, **kwargs)
        if interrupted.is_set():  # the interrupt came after the last iteration: do not start what follows
            raise KeyboardInterrupt
        return result
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        check.remove()
        _interrupt_requested = None
