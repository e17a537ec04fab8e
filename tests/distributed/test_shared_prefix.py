"""shared_prefix == two_sequences on the real GPTModel, with CP and TP, single- and multi-turn.

The reference is always the plain layout on ONE process with Megatron's own DotProductAttention
(and Megatron's RoPE table): two full sequences per pair, nothing shared. The shared-prefix runs
use the project CP attention and explicit-position RoPE. Both compute per-sequence log-prob sums
(float64 log_softmax over the true vocabulary, summed over response targets) and a LongPO-style
loss from them; every parameter gradient must match.

The PairBatch builder (megatron_longpo/testing/pairs.raw_pair_batch) follows the contract in
megatron_longpo/data/batch.py by hand, independent of the data pipeline; the model runs are
megatron_longpo/testing/attention.run_pair_model.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longpo.testing.attention import assert_grads_close, full_state_dict, run_pair_model
from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.pairs import MULTI_TURN, SINGLE_TURN, RawPair, make_pairs, raw_pair_batch

pytestmark = pytest.mark.distributed


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
    two = raw_pair_batch(pairs, "two_sequences", seq)
    shared = raw_pair_batch(pairs, "shared_prefix", seq)
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
    a = raw_pair_batch(pairs, "shared_prefix", 24)
    b = raw_pair_batch(altered, "shared_prefix", 24)
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
