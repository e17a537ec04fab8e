"""segment_logprob_sums under TP / SP / CP equals float64 log_softmax of the full logits.

Hidden states come from a fixed float64 random tensor (no model), sharded as the model would
deliver them: zigzag over CP along the sequence, then contiguous over TP with sequence
parallelism. Sums, counts, and the gradients w.r.t. the local hidden shard and the local
vocab shard of the output weight are compared with a single float64 computation on full data.
"""

import pytest
import torch

from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config

pytestmark = pytest.mark.distributed

S, B, H, V, V_PAD = 32, 3, 16, 50, 64
SETS = (4, 2)  # two segment sets: 4 and 2 segments


def _data(seed: int, sparse: bool):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V_PAD, H, generator=g, dtype=torch.float64)  # padding rows random on purpose
    targets = torch.randint(0, V, (B, S), generator=g)
    segs = []
    for n in SETS:
        seg = torch.randint(-1, n, (B, S), generator=g)
        if sparse:
            seg[:, S // 4:] = -1  # only zigzag chunk 0 (CP rank 0) has needed positions
        segs.append(seg)
    segs[0][segs[0] == 3] = -1  # an empty segment
    coefs = [torch.randn(n, generator=g, dtype=torch.float64) for n in SETS]
    return hidden, weight, targets, segs, coefs


def _loss(outs, coefs):
    # Nonlinear in the sums, so the gradient depends on the CP-combined values.
    return sum((o.sums * c).sum() + 0.01 * (o.sums ** 2).sum() for o, c in zip(outs, coefs))


def reference(seed: int, sparse: bool):
    hidden, weight, targets, segs, coefs = _data(seed, sparse)
    hidden.requires_grad_()
    weight.requires_grad_()
    logp = torch.log_softmax(torch.einsum("sbh,vh->bsv", hidden, weight[:V]), -1)
    logp = logp.gather(2, targets[..., None]).squeeze(2)  # [B, S]
    outs = []
    for seg, n in zip(segs, SETS):
        sums = torch.stack([logp[seg == k].sum() for k in range(n)])
        counts = torch.tensor([float((seg == k).sum()) for k in range(n)], dtype=torch.float64)
        outs.append(type("O", (), {"sums": sums, "counts": counts}))
    _loss(outs, coefs).backward()
    return [o.sums.detach() for o in outs], [o.counts for o in outs], hidden.grad, weight.grad


def _worker(tp: int, cp: int, sp: bool, seed: int, sparse: bool):
    from megatron_longpo.loss.logprobs import segment_logprob_sums
    from megatron_longpo.runtime.distributed import init_model_parallel
    from megatron_longpo.runtime.zigzag import zigzag_slice

    g = init_model_parallel(parallel_config(tp=tp, cp=cp, sequence_parallel=sp))
    hidden, weight, targets, segs, coefs = _data(seed, sparse)
    local_h = zigzag_slice(hidden, g.cp_rank, g.cp_size, dim=0)  # [S/cp, B, H]
    if sp:
        local_h = local_h.chunk(g.tp_size, dim=0)[g.tp_rank]  # [S/cp/tp, B, H]
    local_h = local_h.clone().requires_grad_()
    v_local = V_PAD // g.tp_size
    local_w = weight[g.tp_rank * v_local:(g.tp_rank + 1) * v_local].clone().requires_grad_()
    outs = segment_logprob_sums(
        local_h, local_w, zigzag_slice(targets, g.cp_rank, g.cp_size),
        [zigzag_slice(s, g.cp_rank, g.cp_size) for s in segs], list(SETS),
        vocab_size=V, tp_group=g.tp_group, cp_group=g.cp_group, sequence_parallel=sp, chunk_size=5,
    )
    _loss(outs, coefs).backward()
    return dict(
        tp_rank=g.tp_rank, cp_rank=g.cp_rank,
        sums=[o.sums.detach() for o in outs], counts=[o.counts for o in outs],
        hidden_grad=local_h.grad, weight_grad=local_w.grad,
    )


@pytest.mark.parametrize(
    "tp,cp,sp,sparse",
    [
        (1, 1, False, False),
        (2, 1, False, False),
        (2, 1, True, False),
        (1, 2, False, False),
        (1, 2, False, True),
        (2, 2, False, False),
        (2, 2, True, True),
    ],
)
def test_parallel_matches_full_log_softmax(tp, cp, sp, sparse):
    from megatron_longpo.runtime.zigzag import zigzag_slice

    seed = 7 + tp + 3 * cp + sparse
    ref_sums, ref_counts, ref_hgrad, ref_wgrad = reference(seed, sparse)
    outs = run_distributed(_worker, tp * cp, args=(tp, cp, sp, seed, sparse))
    assert sorted((o["tp_rank"], o["cp_rank"]) for o in outs) == [(t, c) for t in range(tp) for c in range(cp)]
    v_local = V_PAD // tp
    for o in outs:
        for k in range(len(SETS)):
            torch.testing.assert_close(o["sums"][k], ref_sums[k], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(o["counts"][k], ref_counts[k])
        exp_h = zigzag_slice(ref_hgrad, o["cp_rank"], cp, dim=0)
        if sp:
            exp_h = exp_h.chunk(tp, dim=0)[o["tp_rank"]]
        torch.testing.assert_close(o["hidden_grad"], exp_h, rtol=1e-10, atol=1e-12)
        if sparse and o["cp_rank"] > 0:
            assert torch.all(o["hidden_grad"] == 0)
    # The weight gradient of a vocab shard is split over CP ranks (each saw its own positions);
    # DDP sums it over CP. Check that sum here.
    for t in range(tp):
        wg = sum(o["weight_grad"] for o in outs if o["tp_rank"] == t)
        torch.testing.assert_close(wg, ref_wgrad[t * v_local:(t + 1) * v_local], rtol=1e-10, atol=1e-12)
    assert ref_hgrad.abs().sum() > 0 and ref_wgrad[:V].abs().sum() > 0
    assert torch.all(ref_wgrad[V:] == 0)
