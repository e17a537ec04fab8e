"""Checkpoint manifest (size + CRC32 per file) written by every rank's share, verified at load;
free-space refusal before writing; leftover cleanup."""

import json
import shutil
import zlib
from collections import namedtuple
from pathlib import Path

import pytest

from megatron_longpo.testing.distributed import DistributedTestError, run_distributed

pytestmark = pytest.mark.distributed


def _model():
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.testing.models import parallel_config, tiny_model_config

    cfg = tiny_model_config("llama")
    init_model_parallel(parallel_config(tp=2))
    set_seed(0)
    return cfg, build_model(cfg, parallel_config(tp=2))


def _save_two(run):
    from megatron_longpo.checkpoint import save_model_checkpoint

    cfg, model = _model()
    save_model_checkpoint(run, model, cfg, iteration=1)
    save_model_checkpoint(run, model, cfg, iteration=2)


def _load(run, verify="full"):
    from megatron_longpo.checkpoint import load_model_checkpoint

    cfg, model = _model()
    load_model_checkpoint(run, model, cfg, verify=verify)


def _save_with_free(run, free_bytes):
    from megatron_longpo.checkpoint import integrity, save_model_checkpoint

    usage = namedtuple("usage", "total used free")
    integrity.shutil.disk_usage = lambda _p: usage(10 ** 12, 10 ** 12 - free_bytes, free_bytes)
    cfg, model = _model()
    save_model_checkpoint(run, model, cfg, iteration=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    run = tmp_path_factory.mktemp("integrity") / "run"
    run_distributed(_save_two, 2, args=(str(run),))
    return run


def _copy(saved, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(saved, dst)
    return dst


def test_manifest_covers_every_file_with_true_sizes_and_crcs(saved):
    d = saved / "iter_0000002"
    files = json.loads((d / "manifest.json").read_text())["files"]
    on_disk = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()
                     and p.name not in ("manifest.json", "longpo_meta.json"))
    assert sorted(files) == on_disk and any(n.endswith(".distcp") for n in on_disk)
    for n, rec in files.items():
        data = (d / n).read_bytes()
        assert rec == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    run_distributed(_load, 2, args=(str(saved),))  # intact: loads


def _fails(fn, *needles):
    with pytest.raises(DistributedTestError) as e:
        fn()
    for n in needles:
        assert n in str(e.value), str(e.value)[-3000:]


def test_overwritten_bytes_are_named_and_earlier_iteration_offered(saved, tmp_path):
    run = _copy(saved, tmp_path)
    shard = sorted((run / "iter_0000002").glob("*.distcp"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped
    shard.write_bytes(bytes(raw))
    _fails(lambda: run_distributed(_load, 2, args=(str(run),)), f"{shard}: checksum", "bytes changed",
           "checkpoint.load_iteration=1", f"use {run / 'iter_0000001'} instead")
    run_distributed(_load, 2, args=(str(run / "iter_0000001"),))  # the advice every reader takes works
    run_distributed(_load, 2, args=(str(run), "size"))  # size-only verification cannot see a flip


def test_truncated_and_missing_files_are_named(saved, tmp_path):
    run = _copy(saved, tmp_path)
    d = run / "iter_0000002"
    shards = sorted(d.glob("*.distcp"))
    shards[0].write_bytes(shards[0].read_bytes()[:10])
    (d / "common.pt").unlink()
    _fails(lambda: run_distributed(_load, 2, args=(str(run), "size")),
           f"{shards[0]}: 10 bytes, expected", f"{d / 'common.pt'}: missing")


def test_full_disk_refused_before_writing_and_nothing_left(saved, tmp_path):
    run = _copy(saved, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    _fails(lambda: run_distributed(_save_with_free, 2, args=(str(run), 1024)),
           "not enough disk space to save iteration 3", "iter_0000002 is intact")
    assert sorted(p.name for p in run.iterdir()) == before
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_remove_leftovers(tmp_path):
    from megatron_longpo.checkpoint.integrity import remove_leftovers

    for name in ("iter_0000003.tmp", "iter_0000002.old", "iter_0000002"):
        (tmp_path / name).mkdir()
    said = []
    assert remove_leftovers(tmp_path, log=said.append) == ["iter_0000002.old", "iter_0000003.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["iter_0000002"]
    assert len(said) == 2 and "interrupted" in said[0]


def test_run_dir_without_latest_pointer_names_its_iterations_and_the_advice_works(saved, tmp_path):
    # issue 25 item 8: "not a checkpoint" with no hint although complete iterations are there.
    run = _copy(saved, tmp_path)
    (run / "latest_checkpointed_iteration.txt").unlink()
    _fails(lambda: run_distributed(_load, 2, args=(str(run),)),
           "complete iteration(s) ['iter_0000001', 'iter_0000002']", f"e.g. {run / 'iter_0000002'}")
    run_distributed(_load, 2, args=(str(run / "iter_0000002"),))  # the advice: name the iteration directory
    (run / "latest_checkpointed_iteration.txt").write_text("2\n")  # or restore the pointer
    run_distributed(_load, 2, args=(str(run),))
