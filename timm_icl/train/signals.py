"""Preemption and Ctrl-C: SIGTERM / SIGUSR1 / SIGINT only set a flag; the training loop checkpoints at the next
optimizer step and exits. A second Ctrl-C aborts at once (exit 130; the checkpoints on disk are complete ones)."""

from __future__ import annotations

import os
import signal

__all__ = ["StopSignals"]


class StopSignals:
    """Install with :meth:`install`, read :attr:`received` (signal numbers, in order), put the previous handlers back
    with :meth:`restore` (an in-process caller, a test or a notebook, keeps its own Ctrl-C).

    Args:
        announce: print the Ctrl-C line (the main process only, so N ranks do not print it N times).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.received: list[int] = []
        self._previous: dict = {}

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process handles it
            return
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            os.write(2, b"\nsecond Ctrl-C: aborted at once, no checkpoint written\n")
            os._exit(130)
        if signum == signal.SIGINT and self.announce:
            os.write(2, b"\nCtrl-C: checkpointing after this step (press Ctrl-C again to abort at once)\n")
        self.received.append(signum)

    def install(self) -> StopSignals:
        self._pid = os.getpid()
        self._previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def interrupted(self) -> bool:
        """Whether Ctrl-C (SIGINT) was among the signals: the shell's exit code is then 130."""
        return signal.SIGINT in self.received
