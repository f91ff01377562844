"""What ends a run early without losing work: preemption signals and a step watchdog.

Preemption. Schedulers stop a job with SIGTERM (SIGINT from a terminal) and kill it a little
later. `StopRequests` turns the first such signal into a request; the trainer passes every rank's
requests into the next step, where they are summed over ranks together with the gradients, so
all ranks see the same answer after the same step, save one checkpoint and exit. A second
signal is not caught: it stops the process at once, as the user asked twice.

Hangs. A rank stuck in a kernel, a deadlock or a dead file system never reaches the next
collective; the others wait in it (Horovod's stall check names the missing rank, and its stall
shutdown ends them). `StepWatchdog` ends the stuck rank itself: if a step (or a checkpoint save)
has not finished after `timeout_secs`, Python's faulthandler prints every thread's stack and
exits the process with status 1. It runs in a C thread that needs no GIL, so it fires even when
the rank hangs inside TensorFlow or Horovod.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading

from absl import logging


class StopRequests:
    """Catches SIGTERM and SIGINT (first delivery only) while the run is training.

    Use as a context manager around the training loop; `signal_number` is 0 until a signal
    arrives, then the first signal's number.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_number = 0
        self._previous = {}

    def _handle(self, signal_number, frame):
        del frame
        if not self.signal_number:
            self.signal_number = signal_number
            logging.warning("Received %s: finishing this step, then saving a checkpoint",
                            signal.Signals(signal_number).name)
        # A second signal takes the default action: the process ends now.
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def __enter__(self):
        # Signal handlers can only be installed from the main thread (tests may train elsewhere).
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


class StepWatchdog:
    """Ends the process (status 1, with every thread's stack on stderr) if it is not disarmed
    within the time given to `arm`. 0 means no limit."""

    def arm(self, timeout_secs: float) -> None:
        sys.stderr.flush()
        faulthandler.cancel_dump_traceback_later()
        if timeout_secs > 0:
            faulthandler.dump_traceback_later(timeout_secs, exit=True)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()
