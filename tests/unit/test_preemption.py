"""StopController: signals and the wall-clock budget become a stop decision at a step boundary."""

import json
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


def test_time_limit_budget_counts_one_step_one_save_and_safety():
    now = time.time()
    stop = StopController(end_time=now + 200, safety_s=60)
    stop.note_step(30)  # no save seen yet: a save is assumed to take a step's time -> 120 s needed
    assert stop.seconds_needed() == 120 and stop.should_stop() is None
    stop.note_save(80)  # 30 + 80 + 60 = 170 < 200
    assert stop.should_stop() is None
    stop.note_save(120)  # 30 + 120 + 60 = 210 > 200
    assert stop.should_stop() == "time_limit"
    assert StopController(end_time=now + 59, safety_s=60).should_stop() == "time_limit"


def test_stop_file_requests_a_stop(tmp_path):
    f = tmp_path / "job.stop"
    stop = StopController.from_env(env={"LONGPO_STOP_FILE": str(f), "LONGPO_JOB_END_TIME": str(time.time() + 1e6)})
    assert stop.should_stop() is None
    f.touch()
    assert stop.should_stop() == "signal"


def test_ctrl_c_once_stops_gracefully_twice_raises():
    stop = StopController().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.should_stop() == "signal"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        stop.uninstall()


@pytest.mark.parametrize("stopped_by,ckpt,state,requeue", [
    (None, "c", "done", False), ("signal", "c", "stopped", True), ("time_limit", "c", "stopped", True),
    ("exit_duration_mins", "c", "stopped", True), ("exit_interval", "c", "stopped", False), ("signal", None, "stopped", False),
])
def test_status_file_tells_the_launcher_whether_to_requeue(tmp_path, monkeypatch, stopped_by, ckpt, state, requeue):
    f = tmp_path / "status.json"
    monkeypatch.setenv("LONGPO_RUN_STATUS", str(f))
    StopController().write_status(stopped_by, 7, ckpt)
    got = json.loads(f.read_text())
    assert (got["state"], got["requeue"], got["reason"], got["iteration"]) == (state, requeue, stopped_by, 7)
