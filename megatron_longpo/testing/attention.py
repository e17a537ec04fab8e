"""Brute-force references for the attention and pair-layout tests (CPU and GPU).

- :func:`rule_mask` / :func:`reference_attention`: float64 softmax attention over full sequences
  with the branch rule of models/attention/plan.py written out position by position.
- :func:`run_pair_model`: one tiny GPTModel run on this rank's slice of PairBatches (executed on
  every rank by :func:`megatron_longpo.testing.distributed.run_distributed`), with full float64
  logits, per-sequence log-prob sums and a LongPO-style loss and its gradients; with
  ``attention="megatron"`` it uses Megatron's DotProductAttention and RoPE table (the reference).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_longpo.data.batch import PairBatch
from megatron_longpo.models.attention import allowed, core_attention_class
from megatron_longpo.models.provider import build_model
from megatron_longpo.models.sharding import gather_full_state_dict, load_full_state_dict
from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
from megatron_longpo.runtime.zigzag import zigzag_slice, zigzag_unslice
from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config, tiny_model_config
from megatron_longpo.testing.pairs import SINGLE_TURN, make_pairs, raw_pair_batch

BETA, LAM = 0.5, 1.0  # large enough that the preference term moves every gradient


def rule_mask(seq: int, layout) -> torch.Tensor:
    """[S, S] bool, True where query t may attend key k (brute force over the rule)."""
    p, r = layout if layout is not None else (seq, seq)
    return torch.tensor([[allowed(t, k, p, r) for k in range(seq)] for t in range(seq)])


def reference_attention(q, k, v, layouts, scale):
    """float64 softmax attention over full sequences with the rule mask; q [b,h,S,d], k/v [b,g,S,d]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k) * scale
    mask = torch.stack([rule_mask(q.shape[2], lay) for lay in layouts])[:, None].to(scores.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)


def run_pair_model(
    arch: str,
    tp: int,
    cp: int,
    full_sd,
    batches: list[PairBatch],
    attention: str = "project",
    recompute: bool = False,
    sp: bool = False,
    backward: bool = True,
    kv_gather_chunks: int = 1,
):
    """Forward (+ LongPO-style backward for batches[0]) on this rank's slice; full results back.

    attention: "project" (ContextParallelAttention + explicit RoPE) or "megatron"
    (DotProductAttention + Megatron's RoPE table, CP=1 only).
    """
    mcfg = tiny_model_config(arch)
    pcfg = parallel_config(tp=tp, cp=cp, sequence_parallel=sp)
    g = init_model_parallel(pcfg)
    set_seed(1)
    core = core_attention_class("sdpa", kv_gather_chunks) if attention == "project" else DotProductAttention
    model = build_model(
        mcfg, pcfg, core_attention=core,
        recompute_granularity="full" if recompute else None, recompute_method="uniform", recompute_num_layers=1,
    )
    if full_sd is not None:
        load_full_state_dict(model, full_sd, g.tp_rank, g.tp_size)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=model,
    )
    ddp.zero_grad_buffer()

    def cp_all_reduce(x):  # sum over CP; gradient flows into this rank's own part only
        if cp == 1:
            return x
        tot = x.detach().clone()
        dist.all_reduce(tot, group=g.cp_group)
        return x + (tot - x.detach())

    def cp_unslice(x):  # [rows, S/cp, ...] -> [rows, S, ...]
        if cp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(cp)]
        dist.all_gather(parts, x.contiguous(), group=g.cp_group)
        return zigzag_unslice(parts, dim=1)

    results = []
    for i, batch in enumerate(batches):
        inp = batch.for_cp_rank(g.cp_rank, cp)
        logits = model(inp.tokens, inp.position_ids, inp.attention_mask)  # [rows, S/cp, V/tp]
        logits = gather_from_tensor_model_parallel_region(logits)[..., : mcfg.vocab_size]
        logp = F.log_softmax(logits.double(), dim=-1)
        sl = lambda t: zigzag_slice(t, g.cp_rank, cp, dim=1)  # noqa: E731
        tok = logp.gather(-1, sl(batch.target_ids).unsqueeze(-1)).squeeze(-1)  # [rows, S/cp]
        B = batch.num_pairs
        seg, nseg = sl(batch.response_segment), sl(batch.nll_segment)
        resp = torch.zeros(2 * B, dtype=torch.float64).index_add(0, seg[seg >= 0], tok[seg >= 0])
        nll = torch.zeros(B, dtype=torch.float64).index_add(0, nseg[nseg >= 0], -tok[nseg >= 0])
        cnt = torch.zeros(B, dtype=torch.float64).index_add(0, nseg[nseg >= 0], torch.ones_like(tok[nseg >= 0]))
        resp, nll, cnt = cp_all_reduce(resp), cp_all_reduce(nll), cp_all_reduce(cnt)
        pw, pl = resp[:B], resp[B:]
        margin = (pw - batch.ref_chosen_logps) - (pl - batch.ref_rejected_logps)
        loss = (nll / cnt).mean() + LAM * (-F.logsigmoid(BETA * margin)).mean()
        out = dict(
            logps=resp.detach(), nll=nll.detach(), loss=loss.detach(),
            token_logps=cp_unslice(tok.detach()), logits=cp_unslice(logits.detach()),
        )
        if backward and i == 0:
            # DDP averages gradients over dp*cp; every CP rank holds the same loss -> x cp.
            (loss * cp).backward()
            finalize_model_grads([ddp])
            out["grads"] = gather_full_state_dict(model, g.tp_group, mcfg.vocab_size, grads=True)
        results.append(out)
    if backward and full_sd is None:
        results[0]["params"] = gather_full_state_dict(model, g.tp_group, mcfg.vocab_size)
    return results


@functools.lru_cache(maxsize=None)
def full_state_dict(arch: str):
    """Random TP=1 weights of the tiny model (vocab padding dropped), shared by every run."""
    b = raw_pair_batch(make_pairs(SINGLE_TURN, 16, 0), "two_sequences", 24)
    return run_distributed(run_pair_model, 1, args=(arch, 1, 1, None, [b]), kwargs=dict(attention="megatron"))[0][0]["params"]


def assert_grads_close(got: dict, ref: dict, rtol=1e-5, atol=1e-6) -> None:
    assert set(got) == set(ref)
    for name, g in ref.items():
        assert g.abs().sum() > 0, f"reference gradient of {name} is zero: the test would be vacuous"
        torch.testing.assert_close(got[name], g, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
