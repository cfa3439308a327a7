"""SIGTERM as a flag the loop checks between steps (agreed over processes), and the exit status
that says "preempted, run me again"."""
import signal

import jax
from absl import logging

from mla_rmt import distributed


class Preemption:
    """Turns SIGTERM into a flag the loop checks between steps, so it can save and exit.

    Ctrl-C is a flag too: the loop raises KeyboardInterrupt before its next step, where no
    library is half-way through a write (an exception raised inside the TensorBoard writer's
    queue can leave its thread waiting forever at close). A second Ctrl-C raises at once.

    With several processes the flag of one is not enough: all must save the same step (a
    checkpoint is one collective save). should_stop() reduces the flags over the processes
    every check_every steps (a small all-gather, the only host sync it adds), so every process
    stops at the first such step after any of them received SIGTERM.
    """

    def __init__(self, check_every: int = 1):
        self.requested = False
        self.interrupted = False
        self.check_every = check_every
        self._previous = None
        self._previous_int = None

    def should_stop(self, step: int) -> bool:
        """Whether every process stops after `step`; called by all processes at every step."""
        if jax.process_count() == 1:
            return self.requested
        if step % self.check_every:
            return False
        stop = distributed.any_process(self.requested)
        if stop and not self.requested:
            logging.warning("Another process received SIGTERM: saving a checkpoint and stopping.")
        return stop

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._previous_int = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def _interrupt(self, signum, frame):
        if self.interrupted:
            signal.default_int_handler(signum, frame)
        self.interrupted = True
        logging.warning("Ctrl-C: stopping before the next step (Ctrl-C again to stop at once).")

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)
        signal.signal(signal.SIGINT, self._previous_int)


# The process's exit status after SIGTERM: "preempted, resume me" (EX_TEMPFAIL), not success.
PREEMPTED_EXIT_CODE = 75
