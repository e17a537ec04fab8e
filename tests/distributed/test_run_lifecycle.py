"""The life of a run around its steps: extend, rerun, change data, resume logs, damaged checkpoints.

Each scenario runs ``training.loop.train`` in a pooled gloo worker (one rank, tiny model, sft so
no reference cache is needed) exactly as ``pretrain_longpo.py`` would, on real checkpoints.
"""

import json
import shutil
from pathlib import Path

import pytest

from megatron_longpo.testing.distributed import DistributedTestError, run_distributed

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from megatron_longpo.testing.reference import make_dataset, synthetic_records

    d = tmp_path_factory.mktemp("lifecycle")
    return (make_dataset(d / "data_a", synthetic_records(8, seed=1), max_seq_length=1024),
            make_dataset(d / "data_b", synthetic_records(8, seed=2), max_seq_length=1024))


def _cfg(data: str, run: Path, **over):
    from megatron_longpo.config import load_config

    o = {
        "parallel.tensor_model_parallel_size": 1, "data.train_data": data, "data.max_seq_length": 1024,
        "loss.mode": "sft", "reference.cache_path": "null", "reference.load": "null", "checkpoint.load": "null",
        "checkpoint.save": run / "ckpt", "checkpoint.finetune": "false", "logging.tensorboard_dir": run / "tb",
        "logging.metrics_jsonl": run / "metrics.jsonl", "training.global_batch_size": 2, "training.train_iters": 4,
        "optim.lr_warmup_fraction": 0.25, **over,
    }
    return load_config(ROOT / "examples/configs/tiny_cpu.yaml", [f"--{k}={v}" for k, v in o.items()])


def _train(data, run, **over):
    from megatron_longpo.checkpoint.integrity import forget_verified
    from megatron_longpo.training.loop import train

    forget_verified()  # each training is a new process in real use
    r = train(_cfg(data, Path(run), **over))
    return {"iteration": r.iteration, "consumed": r.consumed_samples, "checkpoint": r.checkpoint}


def train(data, run, **over):
    return run_distributed(_train, 1, args=(data, str(run)), kwargs=over, timeout=300)[0]


def _metrics(run: Path, split: str = "train") -> list[dict]:
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if m["split"] == split]


def _snapshot(d: Path) -> dict:
    # The run's lock file names its current holder; it is not part of the checkpoint.
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".longpo.lock"}


def _fails(fn, *needles):
    with pytest.raises(DistributedTestError) as e:
        fn()
    for n in needles:
        assert n in str(e.value), str(e.value)[-3000:]
    return str(e.value)


def test_extend_finished_run_refuses_then_follows_the_chosen_schedule(datasets, tmp_path):
    a, _ = datasets
    train(a, tmp_path)
    assert _metrics(tmp_path)[-1]["step"] == 4
    # The saved cosine ended at step 4: continuing on it would train at lr 0. Refused, naming the option.
    _fails(lambda: train(a, tmp_path, **{"training.train_iters": 8}), "optim.scheduler_on_resume=config",
           "lr_decay_steps 4 -> 8")
    train(a, tmp_path, **{"training.train_iters": 8, "optim.scheduler_on_resume": "config"})
    new = [m for m in _metrics(tmp_path) if m["step"] > 4]
    assert [m["step"] for m in new] == [5, 6, 7, 8]
    assert all(m["lr"] > 0 for m in new), [m["lr"] for m in new]
    # The config schedule over 8 steps is what a fresh 8-step run uses at the same steps.
    train(a, tmp_path / "fresh8", **{"training.train_iters": 8})
    fresh = {m["step"]: m["lr"] for m in _metrics(tmp_path / "fresh8")}
    for m in new:
        assert m["lr"] == pytest.approx(fresh[m["step"]], rel=1e-12)


def test_keep_checkpoint_schedule_and_absolute_warmup(datasets, tmp_path):
    a, _ = datasets
    train(a, tmp_path, **{"optim.lr_warmup_steps": 2})
    lrs = [m["lr"] for m in _metrics(tmp_path)]
    assert lrs[0] == 0.0 and 0 < lrs[1] < lrs[2]  # 2 warm-up steps from 0, then cosine
    train(a, tmp_path, **{"optim.lr_warmup_steps": 2, "training.train_iters": 6, "optim.scheduler_on_resume": "checkpoint"})
    assert [m["lr"] for m in _metrics(tmp_path) if m["step"] > 4] == [0.0, 0.0]  # min_lr after the saved decay


def test_noop_rerun_leaves_checkpoint_byte_identical(datasets, tmp_path):
    a, _ = datasets
    train(a, tmp_path, **{"training.train_iters": 2})
    before = _snapshot(tmp_path / "ckpt")
    out = train(a, tmp_path, **{"training.train_iters": 2, "loss.nll_weight": 0.5})
    assert out["checkpoint"] is None and out["iteration"] == 2
    assert _snapshot(tmp_path / "ckpt") == before


def test_resume_on_other_data_is_refused_unless_allowed(datasets, tmp_path):
    a, b = datasets
    train(a, tmp_path, **{"training.train_iters": 2})
    _fails(lambda: train(b, tmp_path), "checkpoint.allow_data_change=true", "sample ids differ", str(tmp_path / "ckpt"))
    out = train(b, tmp_path, **{"checkpoint.allow_data_change": "true", "optim.scheduler_on_resume": "config"})
    assert out["iteration"] == 4 and out["consumed"] == 4  # 2 steps x 2 pairs of the NEW data, from its start


def test_resume_from_earlier_iteration_does_not_repeat_logged_steps(datasets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a, _ = datasets
    train(a, tmp_path, **{"checkpoint.save_interval": 2, "checkpoint.keep_last": 0})
    # A new run directory seeded with the full state of iteration 2 of that run, not its newest
    # (before: the new, empty save directory was searched for iteration 2 and the run stopped).
    seeded = tmp_path / "seeded"
    out = train(a, seeded, **{"checkpoint.load": tmp_path / "ckpt", "checkpoint.load_iteration": 2})
    assert out["iteration"] == 4 and [m["step"] for m in _metrics(seeded)] == [3, 4]
    (tmp_path / "ckpt" / "iter_0000009.tmp").mkdir()  # leftover of a save killed mid-write
    train(a, tmp_path, **{"checkpoint.save_interval": 2, "checkpoint.load_iteration": 2})
    assert not (tmp_path / "ckpt" / "iter_0000009.tmp").exists()
    steps = [m["step"] for m in _metrics(tmp_path)]
    assert steps == [1, 2, 3, 4]
    ev = EventAccumulator(str(tmp_path / "tb"))
    ev.Reload()
    assert [e.step for e in ev.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "config/text_summary" in ev.Tags()["tensors"]  # the resolved config is logged with the curves


def test_sft_logs_no_reference_metrics(datasets, tmp_path):
    a, _ = datasets
    train(a, tmp_path, **{"training.train_iters": 1})
    m = _metrics(tmp_path)[0]
    assert "nll_loss" in m and "logps/chosen" in m
    assert not [k for k in m if k.startswith(("rewards/", "logps/ref_")) or k == "pref_loss"], m
    # the first step's forward ran on the starting weights: logged once more as step 0 (defect 5)
    (s0,) = _metrics(tmp_path, "step0")
    assert s0["step"] == 0 and s0["logps/chosen"] == m["logps/chosen"] and "loss" not in s0


def test_damaged_newest_checkpoint_falls_back_or_is_named(datasets, tmp_path):
    a, _ = datasets
    train(a, tmp_path, **{"checkpoint.save_interval": 2, "checkpoint.keep_last": 0})
    shard = sorted((tmp_path / "ckpt" / "iter_0000004").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    _fails(lambda: train(a, tmp_path, **{"training.train_iters": 6, "checkpoint.fallback_on_corrupt": "false",
                                                "optim.scheduler_on_resume": "config"}),
                 str(shard), "truncated", "checkpoint.load_iteration=2")
    out = train(a, tmp_path, **{"training.train_iters": 6, "optim.scheduler_on_resume": "config"})
    assert out["iteration"] == 6
    steps = [m["step"] for m in _metrics(tmp_path)]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 2: steps 3-4 trained again, logged once


def test_validation_never_counts_a_sample_twice(datasets, tmp_path):
    a, _ = datasets  # 8 samples = 4 global batches of 2
    valid = {}
    for iters in (0, 4, 10, 1):
        run = tmp_path / f"v{iters}"
        train(a, run, **{"training.train_iters": 1, "training.eval_interval": 1, "training.eval_iters": iters,
                         "data.valid_data": a})
        valid[iters] = _metrics(run, "valid")[0]["loss"]
    # 0 (= all), 4 (= all) and 10 (capped at the 4 full batches, no wrap-around) see the same samples.
    assert valid[0] == valid[4] == valid[10]
    assert valid[1] != valid[4]


def test_num_epochs_sets_train_iters_and_logs_the_epoch(datasets, tmp_path):
    a, _ = datasets  # 8 samples, global batch 2
    out = train(a, tmp_path, **{"training.num_epochs": 1.5, "training.train_iters": 999})
    assert out["iteration"] == 6
    assert [m["epoch"] for m in _metrics(tmp_path)] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def _flip(path: Path, every: int = 20_000) -> None:
    b = bytearray(path.read_bytes())
    for i in range(0, len(b), every):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


def _iters(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_"))


def test_retention_counts_only_intact_iterations_and_sets_damaged_aside(datasets, tmp_path):
    # issue 25 item 2: iter_2 intact, iter_4 damaged; the resume falls back to 2 and saves 3: the old
    # retention kept 3 and the damaged 4 and deleted the intact 2.
    a, _ = datasets
    ckpt = tmp_path / "ckpt"
    train(a, tmp_path, **{"checkpoint.save_interval": 2, "checkpoint.keep_last": 2})
    _flip(sorted((ckpt / "iter_0000004").glob("*.distcp"))[0])
    out = train(a, tmp_path, **{"training.train_iters": 3, "checkpoint.keep_last": 2,
                                "optim.scheduler_on_resume": "config"})
    assert out["iteration"] == 3
    assert _iters(ckpt) == ["iter_0000002", "iter_0000003", "iter_0000004.damaged"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    # A damaged iteration the run never loaded (checkpoint.load_iteration picks an older one) is
    # verified before retention counts it: keep_last=1 keeps the newest intact, not the damaged 4.
    shutil.rmtree(ckpt)
    train(a, tmp_path, **{"checkpoint.save_interval": 2, "checkpoint.keep_last": 0})
    _flip(sorted((ckpt / "iter_0000004").glob("*.distcp"))[0])
    train(a, tmp_path, **{"training.train_iters": 3, "checkpoint.keep_last": 1, "checkpoint.load_iteration": 2,
                          "optim.scheduler_on_resume": "config"})
    assert _iters(ckpt) == ["iter_0000003", "iter_0000004.damaged"]


def _train_on_disk(data, run, free_bytes=None, fail_save=None, **over):
    """_train with the file system reporting ``free_bytes`` free and/or the ``fail_save``-th save's
    shard writes failing with ENOSPC half-way (as a full disk does); returns the outcome."""
    import errno
    import shutil as sh
    from collections import namedtuple

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    from megatron_longpo.checkpoint import integrity
    from megatron_longpo.checkpoint.model_io import CheckpointSaveError
    from megatron_longpo.config import ConfigError

    usage, write_item, saves = sh.disk_usage, fa._write_item, []
    if free_bytes is not None:
        du = namedtuple("usage", "total used free")
        integrity.shutil.disk_usage = lambda _p: du(10 ** 12, 10 ** 12 - free_bytes, free_bytes)

    def full_disk(*a, **k):
        stream = next(x for x in a if hasattr(x, "write"))
        stream.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    from megatron_longpo.checkpoint import model_io

    real_save = model_io.dist_checkpointing.save

    def counting_save(*a, **k):
        saves.append(1)
        fa._write_item = full_disk if len(saves) == fail_save else write_item
        return real_save(*a, **k)

    model_io.dist_checkpointing.save = counting_save
    try:
        return {"ok": _train(data, run, **over)}
    except CheckpointSaveError as e:
        return {"save_error": str(e)}
    except ConfigError as e:
        return {"error": str(e)}
    finally:
        integrity.shutil.disk_usage, fa._write_item = usage, write_item
        model_io.dist_checkpointing.save = real_save


def train_on_disk(data, run, **kw):
    return run_distributed(_train_on_disk, 1, args=(data, str(run)), kwargs=kw, timeout=300)[0]


def test_disk_space_is_checked_at_startup_with_a_proportional_margin(datasets, tmp_path):
    # issue 25 item 4: the check ran only at save time, after save_interval steps, and added a fixed
    # 64 MiB (a 2.6 MB save was refused on a 20 MiB file system).
    a, _ = datasets
    out = train_on_disk(a, tmp_path, free_bytes=20 << 20)
    assert "ok" in out, out
    d = tmp_path / "ckpt" / "iter_0000004"
    on_disk = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    out = train_on_disk(a, tmp_path / "small", free_bytes=on_disk // 2)
    assert "checked at start-up" in out.get("error", ""), out
    assert not (tmp_path / "small" / "metrics.jsonl").exists()  # no step ran
    # The estimate covers what a save writes (weights + optimizer state), within the margin.
    from megatron_longpo.checkpoint.integrity import save_bytes_needed
    need = float(out["error"].split("needs about ")[1].split(" MiB")[0]) * 2 ** 20
    assert on_disk <= need <= save_bytes_needed(int(on_disk * 1.05)), (on_disk, need)


def test_disk_full_mid_write_is_one_line_and_keeps_earlier_checkpoints(datasets, tmp_path):
    # issue 25 item 4: ENOSPC inside Megatron's writer arrives as torch DCP's CheckpointException (not an
    # OSError): ~40-line tracebacks per rank and iter_N.tmp left behind.
    a, _ = datasets
    out = train_on_disk(a, tmp_path, fail_save=2, **{"checkpoint.save_interval": 2})
    msg = out.get("save_error", "")
    assert "No space left on device" in msg and "iter_0000004.tmp was removed" in msg, out
    assert "iter_0000002, is intact" in msg and "\n" not in msg and "Traceback" not in msg, msg
    ckpt = tmp_path / "ckpt"
    assert _iters(ckpt) == ["iter_0000002"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_layout_change_on_a_run_names_a_fix_that_works(datasets, tmp_path):
    # issue 25 item 8: the refusal said "set checkpoint.finetune=true", which a resume of
    # checkpoint.save ignores. Its advice now: a new run directory loading the old run's weights.
    a, _ = datasets
    train(a, tmp_path)
    run = tmp_path / "ckpt"
    with pytest.raises(DistributedTestError) as e:
        run_distributed(_train, 2, args=(a, str(tmp_path)), kwargs={"training.train_iters": 6}, timeout=300)
    msg = str(e.value)
    assert f"checkpoint.save=NEW_DIR checkpoint.load={run} checkpoint.finetune=true" in msg, msg[-3000:]
    new = tmp_path / "new"
    out = run_distributed(_train, 2, args=(a, str(new)), kwargs={"checkpoint.load": run, "checkpoint.finetune": "true",
                                                                "training.train_iters": 2}, timeout=300)[0]
    assert out["iteration"] == 2 and out["checkpoint"].startswith(str(new / "ckpt"))
