"""mla_rmt.preemption: SIGTERM and a first Ctrl-C become flags; a second Ctrl-C raises."""
import os
import signal

import pytest

from mla_rmt.preemption import Preemption


def test_sigterm_and_a_first_ctrl_c_are_flags_a_second_ctrl_c_raises():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with Preemption() as preemption:
        assert not preemption.should_stop(0) and not preemption.interrupted
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.should_stop(1)
        os.kill(os.getpid(), signal.SIGINT)          # no exception here: the loop raises later
        assert preemption.interrupted
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
