"""Project context-parallel attention on the real GPTModel: CP=2/4 and TP=2 x CP=2 equal CP=1.

Reference: one process, Megatron's DotProductAttention and RoPE table (no project code in the
attention path). Compared: full logits (CP slices stitched back), per-token and per-sequence
log-probs, a LongPO-style loss and every parameter gradient after Megatron DDP + finalize.
Sequence lengths are multiples of 2*cp but not of 16 (24 for cp=2, 40 for cp=4).
"""

import pytest
import torch

from megatron_longpo.testing.attention import assert_grads_close, full_state_dict, run_pair_model
from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.pairs import SINGLE_TURN, make_pairs, raw_pair_batch

pytestmark = pytest.mark.distributed

LONG_PAIRS = [(13, [9], [11]), (21, [6], [14])]  # fits S=40


def _compare(out, ref, batch):
    real = batch.branch_ids >= 0  # padding positions carry arbitrary position ids
    torch.testing.assert_close(out["logits"][real], ref["logits"][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["token_logps"][real], ref["token_logps"][real], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out["logps"], ref["logps"], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
    assert_grads_close(out["grads"], ref["grads"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cp1_matches_megatron_dot_product_attention(arch):
    """At CP=1 the project module (+ explicit RoPE) is Megatron's serial attention."""
    from megatron_longpo.testing.models import tiny_model_config

    pairs = make_pairs(SINGLE_TURN, tiny_model_config(arch).vocab_size, seed=3)
    batch = raw_pair_batch(pairs, "two_sequences", 24)
    full = full_state_dict(arch)
    ref = run_distributed(run_pair_model, 1, args=(arch, 1, 1, full, [batch]), kwargs=dict(attention="megatron"))[0][0]
    out = run_distributed(run_pair_model, 1, args=(arch, 1, 1, full, [batch]))[0][0]
    _compare(out, ref, batch)


CASES = [
    # (arch, tp, cp, seq, recompute)
    pytest.param("llama", 1, 2, 24, False, id="cp2"),
    pytest.param("mistral", 1, 4, 40, False, id="cp4"),
    pytest.param("qwen2", 2, 2, 24, False, id="tp2cp2"),
    pytest.param("llama", 1, 2, 24, True, id="cp2-recompute"),
]


@pytest.mark.parametrize("arch,tp,cp,seq,recompute", CASES)
def test_cp_matches_cp1(arch, tp, cp, seq, recompute):
    from megatron_longpo.testing.models import tiny_model_config

    spec = LONG_PAIRS if seq == 40 else SINGLE_TURN
    pairs = make_pairs(spec, tiny_model_config(arch).vocab_size, seed=7)
    batch = raw_pair_batch(pairs, "two_sequences", seq)
    full = full_state_dict(arch)
    ref = run_distributed(run_pair_model, 1, args=(arch, 1, 1, full, [batch]), kwargs=dict(attention="megatron"))[0][0]
    outs = run_distributed(run_pair_model, tp * cp, args=(arch, tp, cp, full, [batch]), kwargs=dict(recompute=recompute))
    for rank_out in outs:
        _compare(rank_out[0], ref, batch)


def test_overlapped_kv_gather_matches_cp1():
    """parallel.cp_kv_gather_chunks=2 at CP=4 (with recompute): K/V gathered per KV-head chunk,
    the second gather in flight during the first chunk's attention; same logits, loss, gradients."""
    from megatron_longpo.testing.models import tiny_model_config

    pairs = make_pairs(LONG_PAIRS, tiny_model_config("mistral").vocab_size, seed=7)
    batch = raw_pair_batch(pairs, "two_sequences", 40)
    full = full_state_dict("mistral")
    ref = run_distributed(run_pair_model, 1, args=("mistral", 1, 1, full, [batch]), kwargs=dict(attention="megatron"))[0][0]
    outs = run_distributed(run_pair_model, 4, args=("mistral", 1, 4, full, [batch]),
                           kwargs=dict(recompute=True, kv_gather_chunks=2))
    for rank_out in outs:
        _compare(rank_out[0], ref, batch)
