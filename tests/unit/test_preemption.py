"""StopController: signals and the wall-clock budget become a stop decision at a step boundary."""

import os
import signal
import time

import pytest

from megatron_longpo.training.preemption import StopController


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_requests_a_stop_and_handler_is_restored(sig):
    before = signal.getsignal(sig)
    stop = StopController().install()
    try:
        assert stop.should_stop() is None
        os.kill(os.getpid(), sig)  # handled: the process keeps running
        time.sleep(0.05)
        assert stop.should_stop() == "signal"
    finally:
        stop.uninstall()
    assert signal.getsignal(sig) == before


def test_exit_duration_budget():
    assert StopController(exit_duration_mins=10, start_time=time.time()).should_stop() is None
    assert StopController(exit_duration_mins=1, start_time=time.time() - 61).should_stop() == "exit_duration_mins"
