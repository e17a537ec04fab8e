"""The sbatch templates of examples/slurm, submitted as written to a real one-node Slurm.

The module fixture installs (apt-get, as root) and starts a private Slurm when there is none
(megatron_longpo/testing/slurm.py) and builds the quickstart inputs with the real CLIs
(megatron_longpo/testing/e2e.py). Every job runs the
tiny CPU config (examples/configs/tiny_cpu.yaml) through the shared launcher
(examples/slurm/longpo_launch.sh); the node shape is overridden on the sbatch command line as the
docs say (no GPUs: --gpus-per-node=0, LONGPO_NPROC_PER_NODE). The uninterrupted two-agent run is
the reference: every preempted / time-limited job must end with the same per-step losses and
bit-identical final weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_longpo.testing.e2e import PY, ROOT, final_weights, prepare_quickstart
from megatron_longpo.testing.slurm import LocalSlurm, SlurmUnavailable

pytestmark = pytest.mark.slow
STEPS, SAVE_EVERY = 10, 2
TRAIN = "examples/slurm/train_longpo.sbatch"
PRECOMPUTE = "examples/slurm/precompute_reference.sbatch"
LOSS_KEYS = ("loss", "nll_loss", "pref_loss", "rewards/margins", "lr", "grad_norm")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(cluster, prepared inputs dir, job env); the cluster is stopped at the end."""
    root = Path(tempfile.mkdtemp(prefix="longpo-slurm-"))
    cluster = LocalSlurm(root)
    try:
        cluster.start()
    except SlurmUnavailable as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"no Slurm: {e}")
    d = tmp_path_factory.mktemp("slurm_inputs")
    try:
        prepare_quickstart(d)
        job_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                       REPO=str(ROOT), PY=PY, LONGPO_STATE_DIR=str(d / "state"), LONGPO_NPROC_PER_NODE="2")
        yield cluster, d, job_env
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        for j in SUBMITTED:
            for f in (ROOT / "logs").glob(f"*-{j}.out"):
                f.unlink()


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
CPU_NODE = ["--gpus-per-node=0", "--cpus-per-task=2", "--time=10", "--signal=B:USR1@5"]


def _train_args(d: Path, run: str, **extra) -> list:
    o = {"data.train_data": d / "data/train", "reference.cache_path": d / "ref_cache", "reference.load": d / "base",
         "checkpoint.load": d / "base", "checkpoint.save": d / run / "ckpt", "logging.tensorboard_dir": d / run / "tb",
         "logging.metrics_jsonl": d / run / "metrics.jsonl", "training.train_iters": STEPS,
         "checkpoint.save_interval": SAVE_EVERY, "checkpoint.keep_last": 0, **extra}
    return ["examples/configs/tiny_cpu.yaml", *[f"--{k}={v}" for k, v in o.items()]]


SUBMITTED: list = []  # job ids, whose logs/ files are removed at the end


def _submit(cluster, job_env, sbatch_opts, template, args, **env_extra) -> int:
    j = cluster.sbatch([*sbatch_opts, template, *args], {**job_env, **env_extra}, cwd=ROOT)
    SUBMITTED.append(j)
    return j


def _log(job_id: int, name: str = "longpo") -> str:
    f = ROOT / "logs" / f"{name}-{job_id}.out"  # the template's own --output (logs/ is in git)
    return f.read_text(errors="replace") if f.exists() else ""


def _done(cluster, job_id: int, name: str = "longpo", timeout: float = 240) -> dict:
    j = cluster.wait_state(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), timeout)
    assert j["JobState"] == "COMPLETED", f"{j}\n{_log(job_id, name)[-6000:]}\n{cluster.log_tail()}"
    return j


def _requeued(cluster, job_id: int, restarts: int = 1, timeout: float = 240) -> None:
    """The job ended its slot and went back to the queue (PENDING, waiting for its begin time)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = cluster.job(job_id)
        if int(j.get("Restarts", 0)) >= restarts and j["JobState"] == "PENDING":
            return
        assert j["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), f"{j}\n{_log(job_id)[-6000:]}"
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} was not requeued: {cluster.job(job_id)}\n{_log(job_id)[-4000:]}")


def _wait_for(pred, timeout=240, poll=0.02, what="", job=None):
    """Poll ``pred``; with ``job=(cluster, id)`` fail fast when that job ends meanwhile."""
    deadline, n = time.time() + timeout, 0
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        n += 1
        if job is not None and n % 25 == 0:
            state = job[0].state(job[1])
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job[1]} {state} while waiting for {what}\n{_log(job[1])[-5000:]}"
        time.sleep(poll)
    raise TimeoutError(f"timed out waiting for {what}")


def _latest(ckpt: Path) -> int:
    f = ckpt / "latest_checkpointed_iteration.txt"
    return int(f.read_text()) if f.exists() else 0


def _train_metrics(d: Path, run: str) -> list:
    rows = [json.loads(x) for x in (d / run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split", "train") == "train"]


def _assert_same_as_reference(d: Path, run: str) -> None:
    ref = {m["step"]: m for m in _train_metrics(d, "reference")}
    got = {}
    for m in _train_metrics(d, run):
        got.setdefault(m["step"], m)  # a step logged again after a resume must repeat the same numbers
        for k in LOSS_KEYS:
            assert abs(m[k] - ref[m["step"]][k]) <= 1e-6 * max(1.0, abs(ref[m["step"]][k])), (run, m["step"], k)
    assert sorted(got) == list(range(1, STEPS + 1)), (run, sorted(got))
    assert _latest(d / run / "ckpt") == STEPS
    assert not list((d / run / "ckpt").glob("*.tmp")), "a .tmp checkpoint was left behind"
    wa, wb = final_weights(d / "reference" / "ckpt"), final_weights(d / run / "ckpt")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=lambda m: f"{run} {k}: {m}")


# ----------------------------------------------------------------------------------------------
# tests (in file order; the first one is the reference of the others)
# ----------------------------------------------------------------------------------------------
def test_normal_run_two_torchrun_agents(env):
    """The multi-node path on one machine: two srun tasks = two torchrun agents (1 worker each)
    meeting at the first host of the allocation (static rendezvous, node rank = task rank)."""
    cluster, d, job_env = env
    j = _submit(cluster, job_env, [*CPU_NODE, "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1"], TRAIN,
                _train_args(d, "reference"), LONGPO_NPROC_PER_NODE="1")
    info = _done(cluster, j)
    log = _log(j)
    assert int(info["Restarts"]) == 0
    assert "2 task(s), master localhost:" in log and "world=2 tp=2" in log, log[-3000:]
    assert "program status:" in log and '"state": "done"' in log and "requeueing" not in log
    assert [m["step"] for m in _train_metrics(d, "reference")] == list(range(1, STEPS + 1))
    assert _latest(d / "reference" / "ckpt") == STEPS


def test_usr1_after_a_save_and_during_a_save_then_time_limit_requeue_and_resume_exactly(env):
    """One job, four slots. Slot 1: USR1 to the whole process tree (batch shell, srun, torchrun,
    workers and the checkpoint writer's helper processes) right after a periodic save. Slot 2: USR1
    while a save is being written. Slot 3 gets a 2-minute limit: the trainer's own time budget
    (job end from Slurm - one step - one save - LONGPO_STOP_SAFETY_S) stops it before the limit.
    Each of these saves, exits 0 and is requeued; slot 4 finishes. Same losses and weights as the
    uninterrupted run."""
    cluster, d, job_env = env
    ckpt = d / "preempt" / "ckpt"
    # Safety 115 s: with the 2-minute limit of slot 3 the budget is spent after its first step whatever the
    # machine's speed (a fast machine otherwise finishes all steps first); 10-minute slots are unaffected.
    j = _submit(cluster, job_env, CPU_NODE, TRAIN, _train_args(d, "preempt"), LONGPO_STOP_SAFETY_S="115")
    _wait_for(lambda: _latest(ckpt) >= SAVE_EVERY, what="the first periodic save", job=(cluster, j))
    cluster.signal(j, "USR1", "--full")
    _requeued(cluster, j, restarts=1)
    first = _latest(ckpt)
    assert SAVE_EVERY < first < STEPS, first  # the stop saved a new checkpoint, not just the periodic one
    assert "USR1: asking the program to save" in _log(j) and "stopping at step" in _log(j)

    cluster.release(j)
    _wait_for(lambda: any(p.name.endswith(".tmp") and int(p.name[5:12]) > first for p in ckpt.glob("iter_*.tmp")),
              what="a save in progress", job=(cluster, j))
    cluster.signal(j, "USR1", "--full")
    _requeued(cluster, j, restarts=2)
    second = _latest(ckpt)
    assert first < second < STEPS, (first, second)

    cluster.release(j, TimeLimit=2)
    _requeued(cluster, j, restarts=3)
    log = _log(j)
    assert "(time_limit)" in log and '"reason": "time_limit"' in log, log[-4000:]
    assert second < _latest(ckpt) < STEPS

    cluster.release(j, TimeLimit=10)
    info = _done(cluster, j)
    log = _log(j)
    assert int(info["Restarts"]) == 3, info
    for bad in ("BrokenPipeError", "EOFError", "Traceback"):
        assert bad not in log, log[-6000:]
    assert log.count("resumed from") == 3
    _assert_same_as_reference(d, "preempt")


def test_plain_scancel_cancels_without_requeue(env):
    cluster, d, job_env = env
    ckpt = d / "cancel" / "ckpt"
    j = _submit(cluster, job_env, CPU_NODE, TRAIN, _train_args(d, "cancel", **{"training.train_iters": 200}))
    _wait_for(lambda: _latest(ckpt) >= SAVE_EVERY, what="the first periodic save", job=(cluster, j))
    cluster.cancel(j)
    info = cluster.wait_state(j, ("CANCELLED", "COMPLETED", "FAILED", "PENDING"), timeout=120)
    assert info["JobState"] == "CANCELLED" and int(info["Restarts"]) == 0, info
    _wait_for(lambda: "not requeued" in _log(j), timeout=60, poll=0.2, what="the launcher's last line")
    time.sleep(1)
    assert cluster.state(j) == "CANCELLED"
    assert not list(ckpt.glob("*.tmp")), list(ckpt.iterdir())
    assert 0 < _latest(ckpt) < 200


def test_precompute_job_one_world_over_two_agents_resumes_after_usr1(env):
    """precompute_reference.sbatch with two agents is ONE world (one writer): a USR1 soon after the
    start stops it after a batch (requeued), the next slot finishes, and the cache equals the one
    plain torchrun made."""
    cluster, d, job_env = env
    out = d / "ref_cache_slurm"
    j = _submit(cluster, job_env, [*CPU_NODE, "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1"],
                PRECOMPUTE, [d / "base", d / "data/train", out],
                LONGPO_NPROC_PER_NODE="1")
    _wait_for(lambda: "master localhost" in _log(j, "longpo-ref"), poll=0.1, what="the job to start")
    cluster.signal(j, "USR1", "--batch")  # what --signal=B:USR1@T does
    _requeued(cluster, j)
    log = _log(j, "longpo-ref")
    assert "stopped by" in log and '"requeue": true' in log, log[-4000:]
    assert not out.exists() and Path(str(out) + ".partial").is_dir()
    cluster.release(j)
    _done(cluster, j, "longpo-ref")
    log = _log(j, "longpo-ref")
    assert "resuming" in log and log.count("reference cache written to") == 1, log[-4000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["compute"]["world_size"] == 2
    for name in ("turns.npy", "counts.npy", "totals.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(d / "ref_cache" / name))
    assert "2 task(s)" in log
