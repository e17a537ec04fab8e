"""Where a run resumes from (training/checkpointing.resume_point): checkpoint.load_iteration picks
an iteration of checkpoint.save once that holds one, else of checkpoint.load, so a new run
directory can be seeded from iteration N of another run (before, the empty save directory, which
the run lock creates, was searched for iteration N and the run stopped)."""

from pathlib import Path

import pytest

from megatron_longpo.checkpoint.format import LATEST_FILE, META_FILE, iter_dir_name
from megatron_longpo.training.checkpointing import CheckpointError, resume_point


def _iterations(run: Path, *its: int) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    for it in its:
        (run / iter_dir_name(it)).mkdir()
        (run / iter_dir_name(it) / META_FILE).write_text("{}")
    if its:
        (run / LATEST_FILE).write_text(str(max(its)))
    return run


def test_load_iteration_applies_to_the_run_that_holds_checkpoints(tmp_path):
    _iterations(tmp_path / "other", 2, 4)
    new = _iterations(tmp_path / "new")  # created by the run lock, nothing saved yet
    assert resume_point(str(new), 2) is None  # -> checkpoint.load=other, iteration 2
    assert resume_point(str(new), None) is None
    assert resume_point(None, 2) is None
    own = _iterations(tmp_path / "own", 1, 3)
    assert resume_point(str(own), 1) == own / iter_dir_name(1)
    assert resume_point(str(own), None) == own / iter_dir_name(3)
    with pytest.raises(CheckpointError, match=r"checkpoint.load_iteration=2: .* complete iterations in .*\[1, 3\]"):
        resume_point(str(own), 2)
