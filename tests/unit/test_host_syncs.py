"""The per-micro-batch path (model forward, log-probs, loss, backward) makes no host-device sync.

SyncCounter (megatron_longpo/testing/syncs.py) counts every call that blocks the host on a GPU
(.item, int(), bool(), .tolist, .cpu, nonzero, ...) outside the declared host-phase functions,
which take only CPU tensors. Positive controls show the counter sees each kind of sync.
"""

import pytest
import torch

from megatron_longpo.config import LossConfig
from megatron_longpo.loss.logprobs import vocab_parallel_target_logprobs
from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config, tiny_model_config
from megatron_longpo.testing.pairs import synthetic_pair_batch
from megatron_longpo.testing.syncs import SyncCounter


def test_counter_sees_syncs():
    x = torch.arange(6.0)
    with SyncCounter() as c:
        x.sum().item()
        int(x[0])
        bool(x[1] > 0)
        x.nonzero()
        x.tolist()
    assert c.count == 5, c.sites
    rows, w = torch.randn(4, 8), torch.randn(16, 8)
    t = torch.tensor([1, 2, 3, 4])
    with SyncCounter() as c:  # the device-side range check: min and max read back
        vocab_parallel_target_logprobs(rows, w, t, vocab_size=16)
    assert c.count == 2, c.sites
    with SyncCounter() as c:
        vocab_parallel_target_logprobs(rows, w, t, vocab_size=16, check_targets=False)
    assert c.count == 0, c.sites


def _count_microbatch_syncs(layout: str, mode: str):
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.training.step import microbatch_forward

    mcfg = tiny_model_config("mistral")
    g = init_model_parallel(parallel_config())
    set_seed(0)
    model = build_model(mcfg, parallel_config(), pair_layout=layout)
    batch = synthetic_pair_batch(layout, pairs=2, prefix=20, response=6, vocab=mcfg.vocab_size, multiple=8)
    loss_cfg = LossConfig(mode=mode, nll_reduction="token_mean")
    with SyncCounter() as c:
        loss, metrics = microbatch_forward(model, batch, g, loss_cfg, mcfg.vocab_size, False, token_normalizer=17.0)
        loss.backward()
    return dict(c.sites), float(loss)


@pytest.mark.parametrize("layout", ["two_sequences", "shared_prefix"])
def test_microbatch_forward_backward_has_no_host_sync(layout):
    (sites, loss), = run_distributed(_count_microbatch_syncs, 1, args=(layout, "longpo"), timeout=120)
    assert torch.isfinite(torch.tensor(loss))
    assert sites == {}, f"host-device syncs in the micro-batch path: {sites}"
