"""Single-process checks of the project CP attention pieces against brute-force references.

CP is emulated: every rank's local queries attend to the same global K/V, and K/V gradients from
all emulated ranks accumulate, which is exactly what the all-gather / reduce-scatter pair does.
"""

import itertools

import pytest
import torch

from megatron_longpo.config import ConfigError, LongPOConfig, validate
from megatron_longpo.data.pair_layout import PairLayout
from megatron_longpo.models.attention import (
    ContextParallelAttention,
    CudnnContextParallelAttention,
    attend_local,
    core_attention_class,
    plan_blocks,
    resolve_attention_backend,
    row_layouts,
)
from megatron_longpo.models.attention.kernels import sdpa_lower_right
from megatron_longpo.models.rope import rope_angles
from megatron_longpo.runtime.zigzag import zigzag_indices, zigzag_slice, zigzag_unslice
from megatron_longpo.testing.attention import reference_attention, rule_mask
from megatron_longpo.testing.models import parallel_config
from megatron_longpo.testing.pairs import MULTI_TURN, SINGLE_TURN, make_pairs, raw_pair_batch


# ------------------------------------------------------------------------------------------------
# Block plan
# ------------------------------------------------------------------------------------------------


def _plan_cases():
    for seq, cp in [(12, 1), (12, 2), (24, 2), (24, 3), (40, 4), (24, 4)]:
        if seq % (2 * cp) and cp > 1:
            continue
        layouts = [None, (seq, seq), (1, 1), (5, 5), (7, 13), (3, 9), (6, 12), (1, seq - 1), (4, seq)]
        for lay in layouts:
            if lay is None or lay[1] <= seq:
                yield seq, cp, lay


@pytest.mark.parametrize("seq,cp,layout", list(_plan_cases()))
def test_block_plan_reproduces_the_rule(seq, cp, layout):
    full = rule_mask(seq, layout)
    for rank in range(cp):
        glob = zigzag_indices(seq, rank, cp).tolist()
        got = torch.zeros(len(glob), seq, dtype=torch.bool)
        covered = []
        for blk in plan_blocks(seq, rank, cp, *(layout or (None, None))):
            keys = [k for s, e in blk.kv_ranges for k in range(s, e)]
            lq, lk = blk.num_queries, blk.num_keys
            assert lk >= lq > 0
            for i in range(lq):
                covered.append(blk.q_start + i)
                for j in range(lk - lq + i + 1):  # lower-right causal over the concatenated keys
                    got[blk.q_start + i, keys[j]] = True
        assert covered == list(range(len(glob))), "blocks must tile the local queries in order"
        assert torch.equal(got, full[glob]), f"rank {rank}"


# ------------------------------------------------------------------------------------------------
# Kernels and the local attention
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lq,lk,h,g", [(5, 5, 4, 2), (5, 13, 4, 2), (3, 11, 2, 2), (1, 7, 8, 2)])
def test_sdpa_lower_right_matches_float64(lq, lk, h, g):
    torch.manual_seed(0)
    q = torch.randn(2, h, lq, 16, requires_grad=True)
    k = torch.randn(2, g, lk, 16, requires_grad=True)
    v = torch.randn(2, g, lk, 16, requires_grad=True)
    out = sdpa_lower_right(q, k, v, 0.25)
    mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    rep = h // g
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = torch.einsum("bhqd,bhkd->bhqk", qd, kd.repeat_interleave(rep, 1)) * 0.25
    ref = torch.einsum("bhqk,bhkd->bhqd", s.masked_fill(~mask, float("-inf")).softmax(-1), vd.repeat_interleave(rep, 1))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(ref)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cp,seq", [(1, 24), (2, 24), (3, 24), (4, 40)])
def test_attend_local_emulated_cp_matches_float64(cp, seq):
    """Forward and q/k/v gradients; rows with different layouts in one batch; GQA 4:2."""
    torch.manual_seed(cp)
    b, h, g, d = 3, 4, 2, 8
    layouts = [None, (7, 13), (5, 5 + seq // 3)]
    q = torch.randn(b, h, seq, d, requires_grad=True)
    k = torch.randn(b, g, seq, d, requires_grad=True)
    v = torch.randn(b, g, seq, d, requires_grad=True)
    parts = [
        attend_local(zigzag_slice(q, r, cp, dim=2), k, v, layouts, r, cp, scale=0.3) for r in range(cp)
    ]
    out = zigzag_unslice(parts, dim=2)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qd, kd, vd, layouts, 0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(ref)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    for a, bb in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(a.grad.double(), bb.grad, rtol=1e-5, atol=1e-6)


def test_row_layouts_rejects_dense_masks():
    assert row_layouts(None, 2) == [None, None]
    assert row_layouts(torch.tensor([[3, 5], [4, 4]]), 2) == [(3, 5), (4, 4)]
    with pytest.raises(ValueError, match="for_cp_rank"):
        row_layouts(torch.ones(2, 1, 8, 8, dtype=torch.bool), 2)


# ------------------------------------------------------------------------------------------------
# RoPE from explicit positions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", [False, True])
def test_rope_angles_match_megatron_table(scaling):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_longpo.runtime import cpu_compat

    cpu_compat.enable()  # get_emb moves inv_freq to torch.cuda.current_device(); no-op on CUDA
    rot = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=1e4, rope_scaling=scaling, use_cpu_initialization=True)
    table = rot.get_emb(40)  # [40, 1, 1, 16]
    pos = torch.arange(40).unsqueeze(0)
    assert torch.equal(rope_angles(rot.inv_freq, pos), table)
    # CP slice of explicit positions == Megatron's per-rank slice of the table.
    for r in range(4):
        local = zigzag_slice(pos, r, 4, dim=1)
        assert torch.equal(rope_angles(rot.inv_freq, local), zigzag_slice(table, r, 4, dim=0))
    # Shared-prefix positions: rejected branch continues from the prefix.
    branch = torch.tensor([[0, 1, 2, 3, 4, 5, 3, 4, 5, 6]])
    assert torch.equal(rope_angles(rot.inv_freq, branch)[:, 0], table[branch[0], 0])


# ------------------------------------------------------------------------------------------------
# model inputs of a CP rank (PairBatch.for_cp_rank), backend selection, config rule
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [SINGLE_TURN, MULTI_TURN])
def test_cp_rank_inputs_shared_prefix(spec):
    pairs = make_pairs(spec, 50, seed=1)
    batch = raw_pair_batch(pairs, "shared_prefix", 24)
    for r in range(2):
        inp = batch.for_cp_rank(r, 2)
        assert torch.equal(inp.tokens, zigzag_slice(batch.tokens, r, 2))
        assert torch.equal(inp.position_ids, zigzag_slice(batch.position_ids, r, 2))
        expect = [[len(p.prefix), len(p.prefix) + len(p.chosen)] for p in pairs]
        assert inp.attention_mask.tolist() == expect
        assert inp.attention_mask.device.type == "cpu"
    two = raw_pair_batch(pairs, "two_sequences", 24)
    assert two.for_cp_rank(0, 2).attention_mask is None


def test_cp_rank_inputs_reject_bad_batches():
    pairs = make_pairs(SINGLE_TURN, 50, seed=1)
    batch = raw_pair_batch(pairs, "shared_prefix", 24)
    bad = batch.branch_ids.clone()
    bad[1, 2] = 1  # a chosen token inside the prefix of row 1
    with pytest.raises(ValueError, match=r"row 1: .*0x2 1x1 0x2"):
        PairLayout.from_branch_ids("shared_prefix", bad)
    odd = raw_pair_batch(pairs, "shared_prefix", 26)
    with pytest.raises(ValueError, match="multiple of 2\\*cp = 4"):
        odd.for_cp_rank(0, 2)


def test_backend_resolution_on_this_machine():
    cuda = torch.cuda.is_available()
    for layout, impl in itertools.product(["two_sequences", "shared_prefix"], ["local"]):
        assert resolve_attention_backend(parallel_config(attention_backend="auto"), layout, impl) == "sdpa"
        assert resolve_attention_backend(parallel_config(attention_backend="sdpa"), layout, impl) == "sdpa"
    with pytest.raises(ConfigError, match="shared_prefix"):
        resolve_attention_backend(parallel_config(attention_backend="te"), "shared_prefix", "transformer_engine")
    with pytest.raises(RuntimeError, match="attention_backend=te needs Transformer Engine"):
        resolve_attention_backend(parallel_config(attention_backend="te"), "two_sequences", "local")
    if not cuda:
        for kernel in ("flash", "cudnn", "fa3"):  # every project kernel says why it cannot run
            with pytest.raises(RuntimeError, match=f"attention_backend={kernel} needs CUDA.*no CUDA device.*sdpa"):
                resolve_attention_backend(parallel_config(attention_backend=kernel), "shared_prefix", "local")


def test_config_rules_of_the_block_kernels():
    cfg = LongPOConfig()
    for kernel in ("flash", "cudnn", "fa3"):
        cfg.parallel.attention_backend = kernel
        with pytest.raises(ConfigError, match=f"attention_backend={kernel} runs bf16 only"):
            validate(cfg)
    cfg.model.params_dtype = "bf16"
    cfg.model.attention_dropout = 0.1
    with pytest.raises(ConfigError, match="attention_backend=fa3 has no attention dropout"):
        validate(cfg)
    cfg.parallel.attention_backend = "cudnn"
    validate(cfg)


def test_config_rejects_shared_prefix_on_te():
    cfg = LongPOConfig()
    cfg.data.pair_layout = "shared_prefix"
    cfg.parallel.attention_backend = "te"
    with pytest.raises(ConfigError, match="data.pair_layout=shared_prefix cannot run on parallel.attention_backend=te"):
        validate(cfg)
    cfg.parallel.attention_backend = "auto"
    validate(cfg)


def test_config_rules_of_the_overlapped_kv_gather():
    cfg = LongPOConfig()  # 2 KV heads, tp 1
    cfg.parallel.cp_kv_gather_chunks = 2
    validate(cfg)
    cfg.parallel.cp_kv_gather_chunks = 3
    with pytest.raises(ConfigError, match=r"cp_kv_gather_chunks=3 must divide the KV heads per TP rank"):
        validate(cfg)
    cfg.parallel.cp_kv_gather_chunks = 0
    with pytest.raises(ConfigError, match="cp_kv_gather_chunks must be >= 1"):
        validate(cfg)


def test_backend_classes_carry_the_gather_chunks():
    assert core_attention_class("sdpa") is ContextParallelAttention and core_attention_class("te", 2) is None
    cls = core_attention_class("cudnn", 4)
    assert issubclass(cls, CudnnContextParallelAttention) and cls.kv_gather_chunks == 4 and cls.kernel == "cudnn"
    assert ContextParallelAttention.kv_gather_chunks == 1  # the base class is untouched
