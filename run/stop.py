"""Stopping a run without losing it: Ctrl-C (SIGINT) and SIGTERM (`kill`, a cluster job's time
limit) are taken at the end of the step in progress, which is then saved (train_sft.train)."""
import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (`kill`, a cluster job's time limit) stop the run. While the
    loop trains (at_step_end), a signal only asks: the loop finishes the step in progress, saves it
    and exits. Stopping in the middle of a step would save the random state after the step had
    drawn some of its dropout masks (or weights that AdamW had half updated), and --resume would
    not redo that step as an uninterrupted run does. Elsewhere (loading, writing the results) a
    signal stops at once. A second signal is ignored: the first is being handled (raising again
    in the middle of the save, or in Python's exit handlers, would print a traceback)."""

    def __init__(self):
        self.requested = False
        self.at_step_end = False

    @contextmanager
    def listening(self):
        """Take the signals while the block (or the function it decorates) runs, then give back
        the handlers found before it: train_sft.main may be called by other code (a test, a
        notebook). Not after a signal: the process is then ending, and a second signal in its
        exit must still be ignored."""
        self.requested = False
        found = {signum: signal.signal(signum, self.handle) for signum in SIGNALS}
        try:
            yield
        finally:
            if not self.requested:
                for signum, handler in found.items():
                    signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.requested:
            return
        self.requested = True
        if not self.at_step_end:
            raise KeyboardInterrupt

    def requested_by_any(self, processes) -> bool:
        """Under torchrun every rank stops at the same step, whichever got the signal first."""
        return processes.mean(float(self.requested)) > 0


STOP = StopSignals()  # the one handler a process has
