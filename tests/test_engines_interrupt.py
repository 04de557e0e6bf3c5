"""Ctrl-C stops an engine run by ``run_interruptibly`` after the current iteration, even from a finalizer."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from ignite.engine import Engine, Events

from monai_grata.engines import run_interruptibly, stop_when_interrupted


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own SIGINT handler for each test, whatever this process inherited (a job started in the
    background by a non-interactive shell inherits SIGINT ignored); the inherited handler is put back after."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


class InterruptOnDelete:
    """Sends SIGINT to this process from its finalizer, where Python drops a ``KeyboardInterrupt``."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(1000))  # bytecode inside the finalizer: the signal is handled here


def engine_interrupted_at(iteration: int, *, in_finalizer: bool) -> tuple[Engine, list[int], list[str]]:
    """A 6-iteration engine that receives SIGINT during ``iteration``; records completed iterations and errors."""

    def step(engine: Engine, batch: int) -> int:
        if engine.state.iteration == iteration:
            if in_finalizer:
                InterruptOnDelete()
            else:
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(1000))
        return batch

    engine, completed, errors = Engine(step), [], []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: completed.append(e.state.iteration))
    engine.add_event_handler(Events.EXCEPTION_RAISED, lambda e, error: errors.append(type(error).__name__))
    return engine, completed, errors


def test_plain_run_loses_an_interrupt_raised_in_a_finalizer():
    """The failure this module fixes: Python prints the interrupt as "Exception ignored" and the run goes on."""
    engine, completed, _ = engine_interrupted_at(2, in_finalizer=True)
    engine.run(range(6))
    assert completed == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("in_finalizer", [False, True])
def test_interrupt_stops_after_the_current_iteration(in_finalizer):
    engine, completed, errors = engine_interrupted_at(2, in_finalizer=in_finalizer)
    with pytest.raises(KeyboardInterrupt):
        run_interruptibly(engine, range(6))
    # iteration 2 finished with every handler (the check runs last), then EXCEPTION_RAISED handlers saw it
    assert completed == [1, 2] and errors == ["KeyboardInterrupt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert len(engine._event_handlers[Events.ITERATION_COMPLETED]) == 1  # the check is removed again


def test_an_engine_run_from_a_handler_stops_with_the_outer_one():
    """A reference pass run when the outer engine starts (as ``NoAdaptReference`` does) stops after its own
    current iteration, and the outer engine then stops before its first iteration."""
    inner_completed = []

    def inner_step(engine: Engine, batch: int) -> int:
        if engine.state.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))
        return batch

    inner = Engine(inner_step)  # no EXCEPTION_RAISED handler: Ignite re-raises to the outer engine
    inner.add_event_handler(Events.ITERATION_COMPLETED, lambda e: inner_completed.append(e.state.iteration))
    stop_when_interrupted(inner)
    outer, outer_completed, outer_errors = engine_interrupted_at(0, in_finalizer=False)
    outer.add_event_handler(Events.STARTED, lambda _: inner.run(range(6)))
    with pytest.raises(KeyboardInterrupt):
        run_interruptibly(outer, range(6))
    assert inner_completed == [1, 2]
    assert outer_completed == [] and outer_errors == ["KeyboardInterrupt"]
    alone = Engine(lambda engine, batch: batch)
    stop_when_interrupted(alone)  # outside run_interruptibly: no effect
    assert alone.run(range(3)).iteration == 3


def test_second_interrupt_raises_at_once():
    def step(engine: Engine, batch: int) -> int:
        if engine.state.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))
            raise AssertionError("the second Ctrl-C did not interrupt the iteration")
        return batch

    engine = Engine(step)
    with pytest.raises(KeyboardInterrupt):
        run_interruptibly(engine, range(6))
    assert engine.state.iteration == 2


def test_interrupt_after_the_last_iteration_still_stops_what_follows():
    engine = Engine(lambda engine, batch: batch)
    engine.add_event_handler(Events.COMPLETED, lambda _: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        run_interruptibly(engine, range(3))
    assert engine.state.iteration == 3


def test_run_without_interrupt_returns_and_restores_the_handler():
    engine = Engine(lambda engine, batch: batch)
    state = run_interruptibly(engine, range(4), max_epochs=2)
    assert state.iteration == 8 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert len(engine._event_handlers[Events.ITERATION_COMPLETED]) == 0


def test_outside_the_main_thread_it_is_a_plain_run():
    engine, result = Engine(lambda engine, batch: batch), {}
    worker = threading.Thread(target=lambda: result.update(state=run_interruptibly(engine, range(3))))
    worker.start()
    worker.join()
    assert result["state"].iteration == 3


def test_an_ignored_sigint_stays_ignored():
    """A job launched with SIGINT ignored (``nohup cmd &`` in a script) is not made interruptible."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handlers_seen = []

    def step(engine: Engine, batch: int) -> int:
        handlers_seen.append(signal.getsignal(signal.SIGINT))
        if engine.state.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))
        return batch

    engine, errors = Engine(step), []
    engine.add_event_handler(Events.EXCEPTION_RAISED, lambda e, error: errors.append(type(error).__name__))
    state = run_interruptibly(engine, range(6))
    assert state.iteration == 6 and errors == []
    assert handlers_seen == [signal.SIG_IGN] * 6  # nothing was installed
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert len(engine._event_handlers[Events.ITERATION_COMPLETED]) == 0


def test_another_handler_is_kept_and_receives_the_interrupt():
    received = []

    def custom_handler(signum: int, frame) -> None:
        received.append(signum)

    signal.signal(signal.SIGINT, custom_handler)
    engine, completed, errors = engine_interrupted_at(2, in_finalizer=False)
    state = run_interruptibly(engine, range(6))
    assert state.iteration == 6 and completed == [1, 2, 3, 4, 5, 6] and errors == []
    assert received == [signal.SIGINT] and signal.getsignal(signal.SIGINT) is custom_handler
