"""The memory / step-time model under pipeline parallelism (training/memory_model.py).

References: Megatron's own warm-up count (schedules.get_pp_rank_microbatches, fed a stand-in
communicator) for the micro-batches in flight; the unpipelined parameter count for the per-stage
split; the shipped 70B configs against the headroom docs/scaling.md promises.
"""

from types import SimpleNamespace

import pytest
from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

from megatron_longpo.config import load_config, padded_vocab_size, validate
from megatron_longpo.training.memory_model import (
    GiB,
    estimate_memory,
    estimate_step_seconds,
    in_flight_chunks,
    parameter_count,
    pipeline_bubble,
    stage_parameter_count,
)


class _Group:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


@pytest.mark.parametrize("pp,vpp,m", [(2, 1, 8), (4, 1, 2), (4, 1, 16), (2, 2, 4), (4, 5, 8), (8, 2, 8)])
def test_in_flight_equals_megatron_warmup(pp, vpp, m):
    for r in range(pp):
        comm = SimpleNamespace(pp_group=_Group(r, pp), virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
        total, _, warmup, _ = get_pp_rank_microbatches(m, vpp, pp, p2p_communicator=comm)
        assert in_flight_chunks(pp, vpp, r, m) == min(warmup + 1, total), (r, warmup, total)


@pytest.mark.parametrize("tied", [False, True])
def test_stage_parameters_add_up(tied):
    cfg = load_config("examples/configs/llama3_70b_128k.yaml", [f"--model.tie_word_embeddings={str(tied).lower()}"])
    stages = [stage_parameter_count(cfg, r) for r in range(cfg.parallel.pipeline_model_parallel_size)]
    vh = cfg.model.hidden_size * padded_vocab_size(cfg.model, cfg.parallel.tensor_model_parallel_size)
    # A tied embedding has a copy on the last stage (Megatron's embedding group keeps them equal).
    assert sum(stages) == parameter_count(cfg) + (vh if tied else 0)


def test_pipelining_70b_128k_fits_where_tp_cp_alone_does_not():
    cfg = load_config("examples/configs/llama3_70b_128k.yaml")
    validate(cfg, 32)
    est = estimate_memory(cfg, 32)
    assert est.total / GiB <= 0.9 * 80 and est.stage == 0 and est.pipeline_stages == 2
    flat = load_config("examples/configs/llama3_70b_128k.yaml", [
        "--parallel.pipeline_model_parallel_size=1", "--parallel.virtual_pipeline_model_parallel_size=null",
        "--parallel.context_parallel_size=4"])
    validate(flat, 32)
    assert estimate_memory(flat, 32).total / GiB > 80  # the same 32 GPUs without PP: does not fit
    assert pipeline_bubble(2, 5, 8) == pytest.approx(1 / 40)
    no_vpp = load_config("examples/configs/llama3_70b_128k.yaml", ["--parallel.virtual_pipeline_model_parallel_size=null"])
    assert estimate_step_seconds(no_vpp, 32, 400.0) / estimate_step_seconds(cfg, 32, 400.0) == pytest.approx(
        (1 + 1 / 8) / (1 + 1 / 40))


def test_70b_512k_config_fits():
    cfg = load_config("examples/configs/llama3_70b_512k.yaml")
    validate(cfg, 64)
    assert estimate_memory(cfg, 64).total / GiB <= 0.9 * 80
