"""The end of a SIGTERM drain. When the grace period is over, what still runs is cancelled; a
cancelled job stops at its next step, but one step of a large request on a CPU can take minutes
and torch cannot be stopped inside an operation. So the process exits STOP_MARGIN_S after the
grace period whatever still runs: the grace period is a promise to whoever stops the service
(a supervisor, Kubernetes), not a wish."""

from __future__ import annotations

import logging
import os
import threading

STOP_MARGIN_S = 5.0  # what a cancelled step is given after the grace period


def exit_after(seconds: float, log: logging.Logger, status: int = 0) -> threading.Timer:
    """Exit the process in `seconds` unless it has ended by then (a daemon timer)."""

    def stop_now():
        log.warning("a running step could not be interrupted within %g s of the grace period: "
                    "exiting without it", seconds)
        logging.shutdown()  # flush what was logged
        os._exit(status)  # the stuck thread would hold a normal exit (and abort it)

    timer = threading.Timer(seconds, stop_now)
    timer.daemon = True
    timer.start()
    return timer
