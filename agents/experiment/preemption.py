"""Preemption: SIGTERM / SIGUSR1 (and submitit's signal) make a run checkpoint at its next safe
boundary and stop; the signal is then handed to whoever handled it before (submitit requeues).

Ctrl-C (SIGINT) is the same, announced on stderr; a second Ctrl-C exits at once (code 130, the
last complete checkpoint stays usable). :func:`interrupt_handler` also serves the command line's
parent process in a multirun: there the first Ctrl-C only waits for the jobs, which checkpoint.

The flag is process-wide (a signal handler has nowhere else to put it): :func:`preemption_requested`.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


class Preempted(Exception):
    """Raised out of ``learn()`` after the checkpoint that a preemption signal asked for."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum = signum
        self.step = step


_requested: int | None = None  # the first preemption signal received by this process
_previous: dict[int, Any] = {}


def preemption_requested() -> int | None:
    return _requested


def reset_preemption() -> None:
    """Forget a received signal (tests; a process that was preempted stops its runs otherwise)."""
    global _requested
    _requested = None


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    global _requested
    if _requested is None:
        _requested = signum


INTERRUPT_EXIT = 128 + int(signal.SIGINT)  # 130, as a shell reports a process ended by Ctrl-C


def interrupt_handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    """SIGINT: the first one is a preemption (checkpoint at the next boundary), the second exits."""
    global _requested
    if _requested == signal.SIGINT:
        sys.stderr.write("\n[interrupt] second Ctrl-C: exiting now (the last complete checkpoint is kept)\n")
        sys.stderr.flush()
        os._exit(INTERRUPT_EXIT)
    if _requested is None:
        _requested = signal.SIGINT
        sys.stderr.write("\n[interrupt] Ctrl-C: checkpointing at the next safe boundary, then stopping "
                         "(Ctrl-C again to exit at once)\n")
        sys.stderr.flush()


def install_interrupt_handler() -> None:
    """Make Ctrl-C behave like a preemption in this process (main thread only; else nothing)."""
    try:
        signal.signal(signal.SIGINT, interrupt_handler)
    except (ValueError, OSError):
        pass


def preemption_signals() -> list[int]:
    """SIGTERM and SIGUSR1; also submitit's preemption signal (``SUBMITIT_PREEMPT_SIGNAL``,
    default USR2) when submitit has a handler installed for it."""
    sigs = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None]
    sub = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if sub is not None and sub not in sigs:
        try:
            if callable(signal.getsignal(sub)):
                sigs.append(sub)
        except (ValueError, OSError):
            pass
    return sigs


class PreemptionGuard:
    """While active, preemption signals and Ctrl-C only set a flag; training checkpoints at the
    next safe boundary and stops (:class:`Preempted`). Outside the main thread it does nothing."""

    def __enter__(self) -> "PreemptionGuard":
        self._installed: dict[int, Any] = {}
        for s in [*preemption_signals(), signal.SIGINT]:
            try:
                prev = signal.signal(s, interrupt_handler if s == signal.SIGINT else _handler)
            except (ValueError, OSError):  # not the main thread
                continue
            self._installed[s] = prev
            if prev not in (_handler, interrupt_handler):
                _previous[s] = prev
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self._installed.items():
            try:
                signal.signal(s, prev)
            except (ValueError, OSError):
                pass


def chain_previous_handler(signum: int) -> None:
    """After the checkpoint, give the signal to whoever handled it before us when that was Python
    code (submitit: requeue the job and exit; for SIGTERM it only logs)."""
    prev = _previous.get(signum)
    if callable(prev) and prev not in (signal.default_int_handler, _handler):
        prev(signum, None)
