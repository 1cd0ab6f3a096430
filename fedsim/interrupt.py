"""Stopping a command by hand: SIGINT (Ctrl-C) and SIGTERM (what ``ray job stop``, Kubernetes and
Slurm send) both become :class:`Interrupted`, a ``KeyboardInterrupt``, in the main thread.

The first signal raises :class:`Interrupted` where the main thread is (in ``ray.get``, or in the
round loop of the sequential backend), so the command's ordinary ``KeyboardInterrupt`` path stops
the driver and the workers, marks the runs ``interrupted`` and prints one line; the exit code is
``128 + signal``: 130 for SIGINT, 143 for SIGTERM (the shell's convention). A second signal while
that cleanup runs exits at once with the same code (Ray's own processes, started with
``PR_SET_PDEATHSIG``, die with this process).

Ray replaces the SIGTERM handler when it starts (``ray.init`` sets one that exits with code 15,
and its C++ core worker one that prints a stack dump and aborts);
:func:`fedsim.engine.api.start_ray` puts the handler back. The CLI runs each command inside
:func:`handled`.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal reached the main thread.

    Attributes:
        signum: the signal number (``signal.SIGINT`` or ``signal.SIGTERM``).
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        """``"SIGINT"`` or ``"SIGTERM"``."""
        return signal.Signals(self.signum).name


def signum(err: BaseException) -> int:
    """The signal behind ``err``: its own for :class:`Interrupted`, else the first that
    :func:`handled` received (Ray's ``ray.get`` turns any exception of a signal handler into a
    plain ``KeyboardInterrupt``), else SIGINT (Python's own Ctrl-C handling)."""
    if isinstance(err, Interrupted):
        return err.signum
    return _received[0] if _received else int(signal.SIGINT)


def exit_code(err: BaseException) -> int:
    """The exit code of a command stopped by ``err``: 128 + :func:`signum` (130, 143)."""
    return 128 + signum(err)


def signal_name(err: BaseException) -> str:
    """``"SIGINT"`` or ``"SIGTERM"``: the name of :func:`signum`."""
    return signal.Signals(signum(err)).name


_received: list[int] = []  # signals received inside handled(); the first raises, a second exits


def _handler(signum: int, frame) -> None:
    _received.append(signum)
    if len(_received) == 1:
        raise Interrupted(signum)
    os.write(2, f"fedsim: {signal.Signals(signum).name} again; exiting at once\n".encode())
    os._exit(128 + signum)


def install() -> bool:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` (the first) or exit at once (a second),
    replacing whatever handler is there (Ray's, after ``ray.init``). Signals already received are
    kept: installing again after Ray started does not re-arm the first one.

    Returns:
        False (nothing installed) outside the main thread, where Python cannot handle signals.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    for s in SIGNALS:
        signal.signal(s, _handler)
    return True


@contextmanager
def handled() -> Iterator[None]:
    """:func:`install` for the duration of a command (the count of signals received starts from
    zero); on exit the handlers that were there before are back (a test runner's own Ctrl-C
    handling)."""
    main = threading.current_thread() is threading.main_thread()
    before = {s: signal.getsignal(s) for s in SIGNALS} if main else {}
    _received.clear()
    install()
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
