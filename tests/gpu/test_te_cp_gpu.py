"""CUDA-only: TE context parallelism (p2p, a2a, all_gather) against the project CP attention at CP=2.

Needs two visible GPUs and Transformer Engine (skipped otherwise); the worker is
tests/gpu/te_cp_worker.py under torchrun.
"""

import pytest

from megatron_longpo.testing.e2e import run_cli, torchrun
from megatron_longpo.testing.gpu import needs_gpus

pytestmark = [pytest.mark.gpu, needs_gpus(2)]


@pytest.mark.parametrize("comm", ["p2p", "a2a", "all_gather"])
def test_te_cp_matches_project_cp(comm):
    pytest.importorskip("transformer_engine")
    p = run_cli(torchrun(2, "tests/gpu/te_cp_worker.py", comm), check=False)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
