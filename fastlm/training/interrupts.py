"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM, and stopping it on divergence.

The first signal only sets a flag: the trainer finishes the step it is in, saves a resumable checkpoint
and raises TrainingInterrupted (exit code 130 for SIGINT, 143 for SIGTERM on the command line). The
handlers are then back to the previous ones, so a second Ctrl-C aborts at once.
"""
import signal
import threading

SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by a signal after saving `checkpoint` (None when nothing could be saved)."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        where = f"resumable checkpoint saved in {checkpoint} (continue with --resume)" if checkpoint else \
            "no checkpoint saved"
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}; {where}")


class TrainingDiverged(ValueError):
    """A non-finite loss or weights: training stopped, no final model written."""


class StopRequests:
    """Context manager: while inside, SIGINT/SIGTERM set `signum` instead of stopping the process
    (main thread only; elsewhere signals keep their handlers)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._request)
        return self

    def __exit__(self, *exc):
        self._restore()
        return False

    def _request(self, signum, frame):
        self.signum = signum
        self._restore()  # a second signal takes the usual way: KeyboardInterrupt / termination

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
