"""The multi-process harness itself: results, rank failures and hung collectives surface."""

import pytest
import torch
import torch.distributed as dist

from megatron_longpo.testing.distributed import DistributedTestError, run_distributed

pytestmark = pytest.mark.distributed


def _sum_ranks():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank1():
    if dist.get_rank() == 1:
        raise ValueError("boom from rank one")
    return "ok"


def _hang_on_rank0():
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    return "done"


def _megatron_groups(tp):
    from megatron_longpo.runtime.distributed import init_model_parallel
    from megatron_longpo.testing.models import parallel_config

    g = init_model_parallel(parallel_config(tp=tp))
    return (g.tp_rank, g.tp_size, g.dp_rank, g.dp_size)


def test_results_in_rank_order():
    assert run_distributed(_sum_ranks, 2) == [3.0, 3.0]


def test_rank_failure_surfaces_traceback():
    with pytest.raises(DistributedTestError) as e:
        run_distributed(_fail_on_rank1, 2, timeout=60)
    msg = str(e.value)
    assert "rank 1" in msg and "ValueError: boom from rank one" in msg and "_fail_on_rank1" in msg
    # The pool recovers for the next call.
    assert run_distributed(_sum_ranks, 2) == [3.0, 3.0]


def test_hung_collective_times_out():
    with pytest.raises(DistributedTestError, match=r"timeout after 5s .*rank\(s\) \[0\] did not finish"):
        run_distributed(_hang_on_rank0, 2, timeout=5)
    assert run_distributed(_sum_ranks, 2) == [3.0, 3.0]


def test_megatron_state_is_fresh_each_call():
    assert run_distributed(_megatron_groups, 2, args=(2,)) == [(0, 2, 0, 1), (1, 2, 0, 1)]
    assert run_distributed(_megatron_groups, 2, args=(1,)) == [(0, 1, 0, 2), (0, 1, 1, 2)]


def _thread_count_after_megatron_init():
    import os

    _megatron_groups(2)
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


def test_workers_do_not_leak_process_groups():
    """Each call creates Megatron's groups; the harness must destroy them (and their threads)."""
    first = run_distributed(_thread_count_after_megatron_init, 2)
    for _ in range(4):
        later = run_distributed(_thread_count_after_megatron_init, 2)
    assert all(b <= a + 4 for a, b in zip(first, later)), (first, later)
