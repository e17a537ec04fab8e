"""pretrain_longpo.py end to end under torchrun (gloo, CPU): quickstart runs with TP=2 and CP=2,
exact resume, SIGTERM preemption, and the CLI's error path.

The module fixture builds what a user builds before training, with the real CLIs: the indexed
dataset from the bundled sample, a tiny HF base model converted to Megatron, and the reference
cache on the short contexts.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from megatron_longpo.testing.e2e import (
    PY,
    ROOT,
    final_weights,
    free_port,
    prepare_quickstart,
    read_metrics,
    run_cli,
    torchrun,
    train_overrides,
    wait_latest,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_quickstart(tmp_path_factory.mktemp("quickstart"))


def _train(d, run, nproc=2, **extra):
    return run_cli(torchrun(nproc, "pretrain_longpo.py", "--config", "examples/configs/tiny_cpu.yaml",
                            *train_overrides(d, run, **extra)))


@pytest.mark.parametrize("layout", [
    {"parallel.tensor_model_parallel_size": 2},
    {"parallel.tensor_model_parallel_size": 1, "parallel.context_parallel_size": 2},
    {"parallel.tensor_model_parallel_size": 1, "parallel.context_parallel_size": 2, "data.pair_layout": "shared_prefix"},
], ids=["tp2", "cp2", "cp2-shared-prefix"])
def test_quickstart_trains_and_saves(prepared, layout):
    run = "run_" + "_".join(f"{v}" for v in layout.values())
    p = _train(prepared, run, **layout)
    steps = [m for m in read_metrics(prepared, run) if m["split"] == "train"]
    assert [m["step"] for m in steps] == list(range(1, 11))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in steps)
    # LongPO learns the preference on its own sample: the last steps prefer chosen.
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]
    assert "checkpoint: " in p.stdout and "iter_0000010" in p.stdout
    # Only warnings a user can act on: none on a healthy CPU run.
    noise = [ln for ln in (p.stdout + p.stderr).splitlines() if "Warning" in ln or "Implicit initialization" in ln]
    assert not noise, noise
    w = final_weights(prepared / run / "ckpt")  # loadable at TP=1
    assert all(torch.isfinite(t).all() for t in w.values())


def test_resume_equals_uninterrupted(prepared):
    extra = {"training.train_iters": 6, "checkpoint.save_interval": 100}
    _train(prepared, "full6", **extra)
    p1 = _train(prepared, "split", **extra, **{"training.exit_interval": 3})
    assert "stopping at step 3 (exit_interval)" in p1.stdout
    p2 = _train(prepared, "split", **extra)
    assert "resumed from" in p2.stdout and "at step 3" in p2.stdout
    full = [m for m in read_metrics(prepared, "full6") if m["split"] == "train"]
    split = [m for m in read_metrics(prepared, "split") if m["split"] == "train"]
    assert [m["step"] for m in split] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, split):
        for k in ("loss", "nll_loss", "pref_loss", "rewards/margins", "lr", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
    wa = final_weights(prepared / "full6/ckpt")
    wb = final_weights(prepared / "split/ckpt")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("layout", [{}, {"parallel.tensor_model_parallel_size": 1,
                                         "parallel.pipeline_model_parallel_size": 2}], ids=["tp2", "pp2"])
def test_sigterm_saves_and_exits_zero(prepared, layout):
    """pp2: the signal reaches the last pipeline stage only; both stages stop at one step and save."""
    import psutil

    run = "sigterm" + ("_pp2" if layout else "")
    args = torchrun(2, "pretrain_longpo.py", "--config", "examples/configs/tiny_cpu.yaml",
                     *train_overrides(prepared, run, **{"training.train_iters": 400, "checkpoint.save_interval": 1000},
                                      **layout))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = prepared / run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    # As Slurm does with --signal: the training processes get the signal. Only ONE rank here: the
    # ranks must still agree on the step to save.
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "pretrain_longpo.py" in " ".join(c.cmdline())]
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-5000:]
    assert "stopping at step" in out and "(signal)" in out
    stopped = int(out.split("stopping at step ")[1].split()[0])
    assert 3 <= stopped < 400
    # A shorter run than planned: continue on the config's schedule (the saved one decays over 400 steps).
    p2 = _train(prepared, run, **{"training.train_iters": stopped + 2, "checkpoint.save_interval": 1000,
                                  "optim.scheduler_on_resume": "config"}, **layout)
    assert f"at step {stopped}" in p2.stdout
    steps = [m["step"] for m in read_metrics(prepared, run) if m["split"] == "train"]
    assert steps[-2:] == [stopped + 1, stopped + 2]


def _launch(d, run, **extra):
    """pretrain_longpo.py under `python -m megatron_longpo.launch` in its own session (as a terminal
    job / container would be), stdout+stderr captured."""
    args = [PY, "-m", "megatron_longpo.launch", "--nproc-per-node", "2", "--master-port", str(free_port()),
            "pretrain_longpo.py", "--config", "examples/configs/tiny_cpu.yaml", *train_overrides(d, run, **extra)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_sigterm_to_whole_tree_after_a_save_gives_complete_checkpoint(prepared):
    """As Slurm, `kill -- -PGID` or a container runtime do: SIGTERM to EVERY process (launcher,
    workers and the checkpoint writer's helper process started by the first save). The helper
    must survive, so the stop save completes; exit 0 and no traceback."""
    import psutil

    run = "sigterm_tree"
    proc = _launch(prepared, run, **{"training.train_iters": 400, "checkpoint.save_interval": 2})
    ckpt = prepared / run / "ckpt"
    periodic = wait_latest(proc, ckpt, 2)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) >= 4, [p.cmdline() for p in tree]  # launcher, 2 workers, >= 1 helper
    for p in tree:
        p.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-5000:]
    for bad in ("Traceback", "BrokenPipeError", "EOFError"):
        assert bad not in out, out[-5000:]
    stopped = int(out.split("stopping at step ")[1].split()[0])
    assert wait_latest(proc, ckpt, 0) == stopped > periodic  # a new, complete checkpoint
    assert (ckpt / f"iter_{stopped:07d}" / "longpo_meta.json").is_file()
    assert not list(ckpt.glob("*.tmp"))


def test_ctrl_c_saves_and_exits_zero_twice_stops_now(prepared):
    # Ctrl-C = SIGINT to the foreground process group: the launcher's session here.
    run = "ctrl_c"
    proc = _launch(prepared, run, **{"training.train_iters": 400, "checkpoint.save_interval": 2})
    ckpt = prepared / run / "ckpt"
    periodic = wait_latest(proc, ckpt, 2)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-5000:]
    assert "Ctrl-C again to stop now" in out and "Traceback" not in out, out[-5000:]
    stopped = int(out.split("stopping at step ")[1].split()[0])
    assert stopped > periodic and (ckpt / f"iter_{stopped:07d}" / "longpo_meta.json").is_file()

    # Twice: the second Ctrl-C stops without saving, promptly, with one line instead of tracebacks.
    proc = _launch(prepared, run, **{"training.train_iters": 400, "checkpoint.save_interval": 1000})
    metrics = prepared / run / "metrics.jsonl"
    n0 = len(metrics.read_text().splitlines())
    deadline = time.time() + 300
    while len(metrics.read_text().splitlines()) < n0 + 2:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-5000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    t = time.time()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-5000:]
    assert time.time() - t < 30  # not torchrun's 30 s kill timeout
    assert "Traceback" not in out, out[-5000:]
    assert "stopped without saving" in out
    # A save cut short by the second Ctrl-C may leave iter_N.tmp, never a checkpoint that looks complete.
    latest = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert latest >= stopped and (ckpt / f"iter_{latest:07d}" / "longpo_meta.json").is_file()


def test_validation_every_eval_interval(prepared):
    run = "valid"
    _train(prepared, run, **{"training.train_iters": 4, "training.eval_interval": 2, "training.eval_iters": 2,
                             "data.valid_data": prepared / "data/train",
                             "reference.valid_cache_path": prepared / "ref_cache"})
    valid = [m for m in read_metrics(prepared, run) if m["split"] == "valid"]
    assert [m["step"] for m in valid] == [2, 4]
    for m in valid:
        assert 0.0 <= m["rewards/accuracies"] <= 1.0 and m["loss"] > 0


def test_cli_config_error_exits_2_before_work(tmp_path):
    p = run_cli([PY, "pretrain_longpo.py", "--config", "examples/configs/tiny_cpu.yaml",
              "--parallel.tensor_model_parallel_size=3", f"--data.train_data={tmp_path}/none"], check=False, timeout=120)
    assert p.returncode == 2
    assert "error:" in p.stderr and "num_attention_heads" in p.stderr and "Traceback" not in p.stderr
