"""How the command line ends on Ctrl-C or SIGTERM: at once, with no half-written output.

One :class:`Interrupt` object holds what a signal handler needs to know (whether the command
has worker processes to shut down first, what to tell the user, which exit code to give) and
installs itself as the handler of SIGINT and SIGTERM. The CLI's commands set ``graceful`` and
``message``; ``madness_ppl.cli.main`` reads ``interrupted`` and ``exit_code`` at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from types import FrameType

__all__ = ["Interrupt"]

#: Seconds a graceful command has to shut its workers down before the process ends anyway.
GRACE_SECONDS = 10.0


@dataclasses.dataclass
class Interrupt:
    """The state of one command's interruption.

    Attributes
    ----------
    graceful
        The command runs worker processes: the first signal raises ``KeyboardInterrupt`` so
        that they are shut down, and the process ends :data:`GRACE_SECONDS` later at the
        latest. Otherwise the process ends at once.
    message
        What the user is told on stderr (``"interrupted"`` becomes ``"terminated (SIGTERM)"``
        for SIGTERM).
    interrupted
        A signal arrived.
    exit_code
        128 + the first signal's number (130 for SIGINT, 143 for SIGTERM).
    """

    graceful: bool = False
    message: str = "interrupted: no output was written"
    interrupted: bool = False
    exit_code: int = 130

    def install(self) -> None:
        """Handle SIGINT and SIGTERM with :meth:`handle`."""
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    @staticmethod
    def uninstall() -> None:
        """Ignore further signals (while the process ends)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """End now (or, while a directory swap runs, just after it).

        Raising ``KeyboardInterrupt`` is not enough: Python runs the handler wherever the main
        thread is, and an exception raised inside a garbage-collector callback (JAX installs
        one) is printed and ignored, so the run went on (and once exited 0).
        """
        from madness_ppl import atomic

        first = not self.interrupted
        self.interrupted = True
        if first:
            self.exit_code = 128 + int(signum)
        if atomic.in_critical_section():
            return
        if self.graceful and first:
            timer = threading.Timer(GRACE_SECONDS, self.hard_exit)
            timer.daemon = True
            timer.start()
            raise KeyboardInterrupt
        self.hard_exit()

    def hard_exit(self) -> None:
        """Remove the temporary outputs being written and end the process at once.

        ``os._exit`` skips the interpreter teardown that crashed while XLA's threads were
        alive. It waits for a directory swap in progress to finish (that output is then
        complete).
        """
        from madness_ppl import atomic

        while atomic.in_critical_section():
            time.sleep(0.01)
        atomic.remove_pending()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        message = self.message
        if self.exit_code != 130:
            message = message.replace("interrupted", "terminated (SIGTERM)", 1)
        os.write(2, (message + "\n").encode())
        os._exit(self.exit_code)
