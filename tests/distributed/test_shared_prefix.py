"""shared_prefix == two_sequences on the real GPTModel, with CP and TP, single- and multi-turn.

The reference is always the plain layout on ONE process with Megatron's own DotProductAttention
(and Megatron's RoPE table): two full sequences per pair, nothing shared. The shared-prefix runs
use the project CP attention and explicit-position RoPE. Both compute per-sequence log-prob sums
(float64 log_softmax over the true vocabulary, summed over response targets) and a LongPO-style
loss from them; every parameter gradient must match.

The PairBatch builder here follows the contract in megatron_longpo/data/batch.py and is shared by
tests/distributed/test_cp_attention.py and tests/unit/test_attention.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from megatron_longpo.data.batch import PairBatch
from megatron_longpo.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed

BETA, LAM = 0.5, 1.0  # large enough that the preference term moves every gradient


# ----------------------------------------------------------------------------------------------
# PairBatch builder (independent of the data pipeline)
# ----------------------------------------------------------------------------------------------


@dataclass
class RawPair:
    """One preference pair as token lists: S_w = prefix + chosen, S_l = prefix + rejected."""

    prefix: list[int]
    chosen: list[int]
    rejected: list[int]
    chosen_resp: list[bool]  # per branch token: is it a response token
    rejected_resp: list[bool]


def random_pair(gen: torch.Generator, vocab: int, prefix_len: int, chosen_resps: list[int], rejected_resps: list[int], instr_len: int = 2) -> RawPair:
    """A (multi-turn when len(resps) > 1) pair; both branches start with the same non-response token.

    Branch = [t0] + resp_1 + instr_2 + resp_2 + ...; later instructions are shared text, the
    responses differ. Contract: the prefix ends one token before the first response token.
    """
    assert len(chosen_resps) == len(rejected_resps)

    def toks(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    prefix, t0 = toks(prefix_len), toks(1)
    instrs = [toks(instr_len) for _ in chosen_resps[1:]]

    def branch(resps: list[int]) -> tuple[list[int], list[bool]]:
        tokens, flags = list(t0), [False]
        for i, n in enumerate(resps):
            if i:
                tokens += instrs[i - 1]
                flags += [False] * instr_len
            tokens += toks(n)
            flags += [True] * n
        return tokens, flags

    c, cf = branch(chosen_resps)
    r, rf = branch(rejected_resps)
    return RawPair(prefix, c, r, cf, rf)


def build_pair_batch(pairs: list[RawPair], layout: str, seq_len: int) -> PairBatch:
    """Lay out ``pairs`` as a PairBatch (contract: megatron_longpo/data/batch.py)."""
    B = len(pairs)
    rows = 2 * B if layout == "two_sequences" else B
    shape = (rows, seq_len)
    tokens = torch.zeros(shape, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    tgt = torch.zeros(shape, dtype=torch.long)
    resp = torch.full(shape, -1, dtype=torch.long)
    nll = torch.full(shape, -1, dtype=torch.long)
    branch = torch.full(shape, -1, dtype=torch.long)

    def put(row: int, start: int, seq: list[int], flags: list[bool], first_pos: int, bid: int, seg: int, nll_b: int, last_target=None):
        """Tokens seq at [start, start+len); position t targets seq[t+1] (or last_target at the end)."""
        n = len(seq)
        tokens[row, start : start + n] = torch.tensor(seq)
        pos[row, start : start + n] = torch.arange(first_pos, first_pos + n)
        branch[row, start : start + n] = bid
        for i in range(n):
            if i + 1 < n:
                nxt, is_resp = seq[i + 1], flags[i + 1]
            elif last_target is not None:
                nxt, is_resp = last_target
            else:
                continue
            tgt[row, start + i] = nxt
            if is_resp:
                resp[row, start + i] = seg
            if nll_b >= 0:
                nll[row, start + i] = nll_b

    for b, p in enumerate(pairs):
        P = len(p.prefix)
        if layout == "two_sequences":
            sw, sl = p.prefix + p.chosen, p.prefix + p.rejected
            assert max(len(sw), len(sl)) <= seq_len
            put(b, 0, sw, [False] * P + p.chosen_resp, 0, 0, b, b)
            put(B + b, 0, sl, [False] * P + p.rejected_resp, 0, 0, B + b, -1)
        else:
            assert P + len(p.chosen) + len(p.rejected) <= seq_len
            assert not p.chosen_resp[0] and p.chosen[0] == p.rejected[0]
            # The last prefix token predicts the first branch token (shared, not a response).
            put(b, 0, p.prefix, [False] * P, 0, 0, -1, b, last_target=(p.chosen[0], False))
            put(b, P, p.chosen, p.chosen_resp, P, 1, b, b)
            put(b, P + len(p.chosen), p.rejected, p.rejected_resp, P, 2, B + b, -1)
    return PairBatch(
        tokens=tokens, position_ids=pos, target_ids=tgt, response_segment=resp, nll_segment=nll,
        branch_ids=branch, num_pairs=B, layout=layout,
        ref_chosen_logps=torch.linspace(-30.0, -20.0, B, dtype=torch.float64),
        ref_rejected_logps=torch.linspace(-25.0, -35.0, B, dtype=torch.float64),
    )


# Pair shapes: (prefix length, chosen response lengths, rejected response lengths) per pair.
# Prefix ends and branch starts avoid CP chunk boundaries (S=24: chunks of 6 at cp=2).
SINGLE_TURN = [(7, [5], [4]), (5, [3], [6])]
MULTI_TURN = [(6, [3, 2], [2, 3]), (3, [2, 2], [4, 1])]


def make_pairs(spec, vocab: int, seed: int) -> list[RawPair]:
    gen = torch.Generator().manual_seed(seed)
    return [random_pair(gen, vocab, p, c, r) for p, c, r in spec]


# ----------------------------------------------------------------------------------------------
# One model run (executed on every rank by run_distributed)
# ----------------------------------------------------------------------------------------------


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
):
    """Forward (+ LongPO-style backward for batches[0]) on this rank's slice; full results back.

    attention: "project" (ContextParallelAttention + explicit RoPE) or "megatron"
    (DotProductAttention + Megatron's RoPE table, CP=1 only).
    """
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_longpo.models.attention import ContextParallelAttention
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.models.sharding import gather_full_state_dict, load_full_state_dict
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.runtime.zigzag import zigzag_slice, zigzag_unslice
    from megatron_longpo.testing.models import parallel_config, tiny_model_config

    mcfg = tiny_model_config(arch)
    pcfg = parallel_config(tp=tp, cp=cp, sequence_parallel=sp)
    g = init_model_parallel(pcfg)
    set_seed(1)
    core = ContextParallelAttention if attention == "project" else DotProductAttention
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
    b = build_pair_batch(make_pairs(SINGLE_TURN, 16, 0), "two_sequences", 24)
    return run_distributed(run_pair_model, 1, args=(arch, 1, 1, None, [b]), kwargs=dict(attention="megatron"))[0][0]["params"]


def assert_grads_close(got: dict, ref: dict, rtol=1e-5, atol=1e-6) -> None:
    assert set(got) == set(ref)
    for name, g in ref.items():
        assert g.abs().sum() > 0, f"reference gradient of {name} is zero: the test would be vacuous"
        torch.testing.assert_close(got[name], g, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

CASES = [
    # (arch, tp, cp, turns, recompute, sp)
    pytest.param("llama", 1, 1, "single", False, False, id="cp1-single"),
    pytest.param("mistral", 1, 1, "multi", False, False, id="cp1-multi"),
    pytest.param("llama", 1, 2, "single", False, False, id="cp2-single"),
    pytest.param("mistral", 1, 2, "multi", True, False, id="cp2-multi-recompute"),
    pytest.param("qwen2", 2, 2, "single", False, False, id="tp2cp2-single"),
    pytest.param("llama", 2, 2, "multi", True, True, id="tp2cp2-multi-recompute-sp"),
]


@pytest.mark.parametrize("arch,tp,cp,turns,recompute,sp", CASES)
def test_shared_prefix_matches_two_sequences(arch, tp, cp, turns, recompute, sp):
    from megatron_longpo.testing.models import tiny_model_config

    vocab = tiny_model_config(arch).vocab_size
    spec = SINGLE_TURN if turns == "single" else MULTI_TURN
    pairs = make_pairs(spec, vocab, seed=11)
    seq = 24  # multiple of 2*cp (and *tp for SP), not of 16
    full = full_state_dict(arch)
    two = build_pair_batch(pairs, "two_sequences", seq)
    shared = build_pair_batch(pairs, "shared_prefix", seq)
    ref = run_distributed(run_pair_model, 1, args=(arch, 1, 1, full, [two]), kwargs=dict(attention="megatron"))[0][0]
    outs = run_distributed(run_pair_model, tp * cp, args=(arch, tp, cp, full, [shared]), kwargs=dict(recompute=recompute, sp=sp))
    for rank_out in outs:
        out = rank_out[0]
        torch.testing.assert_close(out["logps"], ref["logps"], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(out["nll"], ref["nll"], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
        assert_grads_close(out["grads"], ref["grads"])


def test_changing_chosen_branch_leaves_rejected_bit_identical():
    """Rejected tokens may not see the chosen branch: their log-probs do not move by one bit."""
    arch, cp = "llama", 2
    vocab = 250
    pairs = make_pairs(MULTI_TURN, vocab, seed=5)
    gen = torch.Generator().manual_seed(99)
    altered = []
    for p in pairs:
        chosen = [p.chosen[0]] + torch.randint(0, vocab, (len(p.chosen) - 1,), generator=gen).tolist()
        altered.append(RawPair(p.prefix, chosen, p.rejected, p.chosen_resp, p.rejected_resp))
    a = build_pair_batch(pairs, "shared_prefix", 24)
    b = build_pair_batch(altered, "shared_prefix", 24)
    out_a, out_b = run_distributed(
        run_pair_model, cp, args=(arch, 1, cp, full_state_dict(arch), [a, b]), kwargs=dict(backward=False)
    )[0]
    B = len(pairs)
    assert torch.equal(out_a["logps"][B:], out_b["logps"][B:])
    rejected = a.branch_ids == 2
    assert torch.equal(out_a["token_logps"][rejected], out_b["token_logps"][rejected])
    assert torch.equal(out_a["logits"][rejected], out_b["logits"][rejected])
    # The change is real: chosen log-probs move.
    assert (out_a["logps"][:B] - out_b["logps"][:B]).abs().min() > 1e-3
