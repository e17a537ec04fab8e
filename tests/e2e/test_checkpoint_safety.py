"""Checkpoint safety through every CLI that reads or writes checkpoints (issue 25).

One module fixture builds, with the real CLIs, a tiny converted base model, the indexed sample
dataset, and a run directory whose newest iteration has one byte flipped every 20 KB of a shard
(iter_0000001) next to an intact one (iter_0000000). Each reader (export, generation's --model RUN,
evaluation, reference precompute, training) must refuse the damaged one naming the file, and the
advice it prints (use the intact iteration directory) must work. Trainings run in sft mode on one
or two gloo processes (no reference cache needed).
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_longpo.testing.e2e import PY, ROOT, free_port, run_cli, wait_latest

pytestmark = pytest.mark.slow

SUITE = ["--tasks", "niah_single", "--lengths", "512", "--samples", "1", "--no-progress"]


def _flip(path: Path, every: int = 20_000) -> None:
    b = bytearray(path.read_bytes())
    for i in range(0, len(b), every):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt_safety")
    run_cli([PY, "tools/preprocess_data.py", "--input", "examples/data/sample_longpo.jsonl", "--tokenizer",
             "examples/data/tokenizer.model", "--output-prefix", d / "data/train", "--max-seq-length", "2048",
             "--no-progress"])
    run_cli([PY, "examples/make_tiny_base_model.py", "--out", d / "hf_base"])
    run_cli([PY, "tools/convert_hf_to_megatron.py", "--hf-dir", d / "hf_base", "--out", d / "base", "--dtype", "fp32",
             "--no-progress"])
    # A run directory: intact iter_0000000, damaged newest iter_0000001.
    shutil.copytree(d / "base", d / "damaged")
    shutil.copytree(d / "damaged/iter_0000000", d / "damaged/iter_0000001")
    (d / "damaged/latest_checkpointed_iteration.txt").write_text("1\n")
    _flip(d / "damaged/iter_0000001/__0_0.distcp")
    # A truncated shard in the only iteration.
    shutil.copytree(d / "base", d / "truncated")
    shard = d / "truncated/iter_0000000/__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1000])
    return d


def _launch(nproc, *args) -> list:
    return [PY, "-m", "megatron_longpo.launch", "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
            *map(str, args)]


def _train_args(d: Path, run: str, **extra) -> list:
    o = {"data.train_data": d / "data/train", "loss.mode": "sft", "reference.cache_path": "null",
         "reference.load": "null", "checkpoint.load": d / "base", "checkpoint.save": d / run / "ckpt",
         "logging.tensorboard_dir": d / run / "tb", "logging.metrics_jsonl": d / run / "metrics.jsonl",
         "parallel.tensor_model_parallel_size": 1, "training.train_iters": 1, **extra}
    return ["pretrain_longpo.py", "--config", "examples/configs/tiny_cpu.yaml", *[f"--{k}={v}" for k, v in o.items()]]


def _refused(p: subprocess.CompletedProcess, *needles) -> str:
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-5000:]
    for n in needles:
        assert str(n) in out, (n, out[-5000:])
    for noise in ("Traceback", "ChildFailedError", "EOFError"):
        assert noise not in out, out[-5000:]
    return out


def _damage_named(d: Path) -> list:
    """What every refusal of the damaged run must say: the file, how it is damaged, what to use."""
    return [d / "damaged/iter_0000001/__0_0.distcp", "bytes changed", f"use {d / 'damaged/iter_0000000'} instead"]


def test_export_refuses_damaged_and_truncated_checkpoints(fx):
    # Was: exit 0 and an HF model with embed_tokens off by ~1e36; a truncated shard: a raw traceback.
    d = fx
    p = run_cli([PY, "tools/convert_megatron_to_hf.py", "--megatron-dir", d / "damaged", "--out", d / "hf_bad",
                 "--no-progress"], check=False)
    _refused(p, *_damage_named(d))
    assert not (d / "hf_bad").exists()
    p = run_cli([PY, "tools/convert_megatron_to_hf.py", "--megatron-dir", d / "truncated", "--out", d / "hf_trunc",
                 "--no-progress"], check=False)
    _refused(p, d / "truncated/iter_0000000/__0_0.distcp", "truncated", "restore the files from a backup")
    # The advice: the intact iteration directory exports.
    run_cli([PY, "tools/convert_megatron_to_hf.py", "--megatron-dir", d / "damaged/iter_0000000", "--out",
             d / "hf_good", "--no-progress"])
    assert (d / "hf_good/config.json").is_file()


def test_generation_model_run_refuses_damaged_checkpoint(fx, tmp_path):
    d = fx
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "a", "text": "One document. " * 50}) + "\n")
    p = run_cli([PY, "tools/generate_longpo_data.py", "--input", docs, "--output", tmp_path / "out.jsonl",
                 "--model", d / "damaged", "--no-progress"], check=False)
    _refused(p, *_damage_named(d))
    assert not (tmp_path / "out.jsonl").exists()


def test_evaluate_refuses_damaged_checkpoint_and_the_advice_works(fx, tmp_path):
    d = fx
    p = run_cli(_launch(1, "tools/evaluate.py", "--load", d / "damaged", *SUITE, "--output", tmp_path / "e.json"),
                check=False)
    _refused(p, *_damage_named(d))
    run_cli(_launch(1, "tools/evaluate.py", "--load", d / "damaged/iter_0000000", *SUITE, "--output", tmp_path / "e.json"))
    assert json.loads((tmp_path / "e.json").read_text())["checkpoints"]


def test_precompute_refuses_damaged_checkpoint(fx, tmp_path):
    d = fx
    p = run_cli(_launch(1, "tools/precompute_reference.py", "--load", d / "damaged", "--data", d / "data/train",
                        "--output", tmp_path / "cache", "--mode", "longpo", "--no-progress"), check=False)
    _refused(p, *_damage_named(d))
    assert not (tmp_path / "cache").exists()


def test_training_refuses_damaged_initial_checkpoint_and_the_advice_works(fx):
    d = fx
    p = run_cli(_launch(1, *_train_args(d, "from_damaged", **{"checkpoint.load": d / "damaged"})), check=False)
    _refused(p, *_damage_named(d))
    assert not (d / "from_damaged/ckpt").exists() or not list((d / "from_damaged/ckpt").glob("iter_*"))
    p = run_cli(_launch(1, *_train_args(d, "from_damaged", **{"checkpoint.load": d / "damaged/iter_0000000"})))
    assert "done: step 1/1" in p.stdout


def test_startup_refusal_under_the_launcher_is_one_line(fx):
    # Was: the worker's one-line error followed by ~40 lines of torchrun's ChildFailedError traceback.
    d = fx
    p = run_cli(_launch(2, *_train_args(d, "refused", **{"checkpoint.load": d / "nowhere"})), check=False)
    out = _refused(p, "[longpo] error:", d / "nowhere", "[longpo.launch] worker rank")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 2, lines


def _popen(args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_one_writer_per_run_dir_and_workers_die_with_the_launcher(fx):
    # Was: a second run wrote the same checkpoint.save, and after kill -9 of the launcher its
    # workers kept training and saving; the workers, once dying with it, left their checkpoint
    # helpers running.
    d = fx
    ckpt = d / "shared/ckpt"
    first = _popen(_launch(2, *_train_args(d, "shared", **{"training.train_iters": 100000,
                                                          "checkpoint.save_interval": 2})))
    helpers: list = []
    try:
        wait_latest(first, ckpt, 2)
        workers = [c for c in psutil.Process(first.pid).children(recursive=True)
                   if "pretrain_longpo.py" in " ".join(c.cmdline())]
        assert len(workers) == 2
        # Their helpers (the checkpoint writer's spawn Manager, the resource tracker) must die too.
        helpers = [h for w in workers for h in w.children(recursive=True)]
        assert sum("spawn_main" in " ".join(h.cmdline()) for h in helpers) == 2, [h.cmdline() for h in helpers]
        second = run_cli(_launch(1, *_train_args(d, "shared", **{"training.train_iters": 100000})), check=False)
        out = _refused(second, f"checkpoint.save={ckpt} is in use by another training run")
        assert any(f'"pid": {w.pid}' in out for w in workers), out  # names the holder
        first.send_signal(signal.SIGKILL)  # the launcher only
        first.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, [p.pid for p in alive]
        gone, alive = psutil.wait_procs(helpers, timeout=5)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        for h in helpers:  # one that outlived its worker (the killpg above runs only while the launcher lives)
            with contextlib.suppress(psutil.Error):
                h.kill()
    # The dead run left no stuck lock: the next run resumes from what it saved.
    latest = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    p = run_cli(_launch(2, *_train_args(d, "shared", **{"training.train_iters": latest + 1,
                                                        "optim.scheduler_on_resume": "config"})))
    assert f"at step {latest}" in p.stdout and f"done: step {latest + 1}/{latest + 1}" in p.stdout


SECOND_CTRL_C_DURING_SAVE = r'''
import os, signal, sys, time


def main():
    from megatron.core import dist_checkpointing
    import megatron_longpo.checkpoint.model_io as model_io
    from megatron_longpo.training.cli import main as train_main

    armed = []
    save = dist_checkpointing.save

    def saving(*a, **k):
        armed.append(1)
        return save(*a, **k)

    model_io.dist_checkpointing = type("M", (), {"save": staticmethod(saving), "load": dist_checkpointing.load})

    def ctrl_c_twice():  # arrives while dist_checkpointing forks its writer: inside the at-fork hook
        if armed and len(armed) < 3:
            armed.append(1)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)

    os.register_at_fork(before=ctrl_c_twice)
    return train_main(sys.argv[1:])


if __name__ == "__main__":  # guard: dist_checkpointing's helper re-imports __main__
    sys.exit(main())
'''


def test_second_ctrl_c_during_a_save_stops_at_once(fx, tmp_path):
    # Was: KeyboardInterrupt raised in a fork hook is swallowed; the run trained on and saved more.
    d = fx
    script = tmp_path / "ctrl_c.py"
    script.write_text(SECOND_CTRL_C_DURING_SAVE)
    args = _train_args(d, "ctrl_c", **{"training.train_iters": 6, "checkpoint.save_interval": 2})[1:]
    t = time.time()
    p = run_cli(_launch(1, script, *args), check=False, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 130, out[-5000:]
    assert "Traceback" not in out and out.count("stopped at once without saving") == 1, out[-5000:]
    steps = [json.loads(x)["step"] for x in (d / "ctrl_c/metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2, steps  # stopped inside the step-2 save: no step 3
    ckpt = d / "ctrl_c/ckpt"
    assert not (ckpt / "latest_checkpointed_iteration.txt").exists()
    assert time.time() - t < 200


def test_conversion_without_tokenizer_warns_and_training_refuses_in_one_line(fx):
    # issue 25 item 7: the converter wrote tokenizer/ with only generation_config.json, silently; training
    # then died in the tokenizer preflight with a DataError traceback on every rank.
    d = fx
    bare = d / "hf_no_tokenizer"
    shutil.copytree(d / "hf_base", bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    (bare / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}\n')
    p = run_cli([PY, "tools/convert_hf_to_megatron.py", "--hf-dir", bare, "--out", d / "no_tok", "--dtype", "fp32",
                 "--no-progress"])
    assert "has no tokenizer files" in p.stderr and "--tokenizer DIR" in p.stderr, p.stderr
    p = run_cli(_launch(1, *_train_args(d, "no_tok_run", **{"checkpoint.load": d / "no_tok"})), check=False)
    out = _refused(p, "[longpo] error: checkpoint", "does not load", "--tokenizer DIR")
    assert "DataError" not in out
    # The advice: convert again with --tokenizer; then training starts.
    run_cli([PY, "tools/convert_hf_to_megatron.py", "--hf-dir", bare, "--out", d / "with_tok", "--dtype", "fp32",
             "--tokenizer", d / "hf_base", "--no-progress"])
    p = run_cli(_launch(1, *_train_args(d, "with_tok_run", **{"checkpoint.load": d / "with_tok"})))
    assert "done: step 1/1" in p.stdout


def test_corrupt_cache_meta_names_a_rebuild_that_works(fx, tmp_path):
    # issue 25 item 8: a corrupt meta.json said the old cache "may still be valid" and sent the
    # rebuild elsewhere; an unreadable cache is of no use to anyone: rebuild it in place.
    from megatron_longpo.config import LongPOConfig
    from megatron_longpo.reference.cache import ReferenceCacheError
    from megatron_longpo.reference.source import check_reference_cache

    d = fx
    cache = tmp_path / "cache"
    run_cli(_launch(1, "tools/precompute_reference.py", "--load", d / "base", "--data", d / "data/train",
                    "--output", cache, "--mode", "longpo", "--no-progress"))
    (cache / "meta.json").write_text('{"format": "megatron_longpo.reference_cache", "form')
    cfg = LongPOConfig()
    cfg.reference.cache_path, cfg.reference.load = str(cache), str(d / "base")
    with pytest.raises(ReferenceCacheError) as e:
        check_reference_cache(cfg, str(d / "data/train"))
    msg = str(e.value)
    assert "may still be valid" not in msg and "--overwrite" in msg, msg
    cmd = msg.split("rebuild the cache with: ")[1].split()
    assert cmd[:4] == ["torchrun", "--nproc-per-node", "N", "tools/precompute_reference.py"], cmd
    run_cli(_launch(1, *cmd[3:], "--no-progress"))
    check_reference_cache(cfg, str(d / "data/train"))  # the rebuilt cache opens
