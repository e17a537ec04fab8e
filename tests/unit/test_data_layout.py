"""PairBatch layouts: brute-force check that shared_prefix gives every response / NLL target the
same visible context, position ids and target as two_sequences; padding; reference batches."""

from pathlib import Path

import numpy as np
import pytest

from megatron_longpo.config import ParallelConfig, seq_length_multiple
from megatron_longpo.data.layout import build_pair_batch, build_reference_batch
from megatron_longpo.data.sample import PreferenceSample
from megatron_longpo.data.schema import parse_record
from megatron_longpo.data.sequences import build_sample
from megatron_longpo.data.synthetic import random_text
from megatron_longpo.data.templates import get_template
from megatron_longpo.data.tokenizer import Tokenizer

SAMPLE_TOKENIZER = Path(__file__).resolve().parents[2] / "examples" / "data" / "tokenizer.model"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(SAMPLE_TOKENIZER)


def built_samples(tok, n=3):
    tpl = get_template("mistral", tok)
    out = []
    for i in range(n):
        turns = [{"short_context": random_text(8, seed=100 + i), "instruction": f"Question {i}?",
                  "chosen": random_text(4 + 3 * i, seed=200 + i), "rejected": random_text(9 - 2 * i, seed=300 + i)}]
        if i % 2 == 0:
            turns.append({"short_context": "ctx", "instruction": "And then?", "chosen": "Yes it is.",
                          "rejected": "No, never ever."})
        rec = parse_record({"id": f"s{i}", "document": random_text(20 + 15 * i, seed=i), "turns": turns}, f"f:{i}")
        s = build_sample(rec, tok, tpl).sample
        s.index = 10 + i
        out.append(s)
    return out


def handmade_sample(rng, P, Lc, Lr, vocab=50):
    """Random tokens and response masks satisfying the sample invariants (P may be 0)."""
    first = rng.integers(0, vocab)
    cb = np.concatenate([[first], rng.integers(0, vocab, Lc - 1)])
    rb = np.concatenate([[first], rng.integers(0, vocab, Lr - 1)])
    mc = np.concatenate([[0, 1], rng.integers(0, 2, Lc - 2)]).astype(np.uint8)
    mr = np.concatenate([[0, 1], rng.integers(0, 2, Lr - 2)]).astype(np.uint8)
    s = PreferenceSample(id=f"h{P}", prefix=rng.integers(0, vocab, P), chosen_branch=cb, rejected_branch=rb,
                         chosen_branch_mask=mc, rejected_branch_mask=mr)
    s.check()
    return s


def contexts(batch, segment_name):
    """{(segment, position id of the predicting token): (visible tokens, their position ids, target)}
    for every position with a segment, by brute force over the attention rule of the contract."""
    seg = getattr(batch, segment_name).numpy()
    tokens, pos, br, tgt = (batch.tokens.numpy(), batch.position_ids.numpy(), batch.branch_ids.numpy(),
                            batch.target_ids.numpy())
    out = {}
    for row, t in zip(*np.nonzero(seg >= 0)):
        vis = [u for u in range(t + 1) if br[row, u] >= 0 and not (br[row, t] == 2 and br[row, u] == 1)]
        key = (int(seg[row, t]), int(pos[row, t]))
        assert key not in out, f"two targets for {key}"
        out[key] = (tuple(tokens[row, vis]), tuple(pos[row, vis]), int(tgt[row, t]))
    return out


@pytest.mark.parametrize("nll_on", ["chosen", "rejected"])
@pytest.mark.parametrize("nll_target", ["sequence", "responses"])
@pytest.mark.parametrize("source", ["built", "handmade"])
def test_layouts_give_identical_contexts(tok, nll_target, source, nll_on):
    if source == "built":
        samples = built_samples(tok)
    else:
        rng = np.random.default_rng(0)
        samples = [handmade_sample(rng, 0, 6, 9), handmade_sample(rng, 13, 7, 3), handmade_sample(rng, 5, 2, 2)]
    two = build_pair_batch(samples, "two_sequences", 8, pad_id=3, nll_target=nll_target, nll_on=nll_on)
    shared = build_pair_batch(samples, "shared_prefix", 8, pad_id=3, nll_target=nll_target, nll_on=nll_on)
    B = len(samples)
    assert two.tokens.shape[0] == 2 * B and shared.tokens.shape[0] == B
    for name in ("response_segment", "nll_segment"):
        c2, cs = contexts(two, name), contexts(shared, name)
        assert c2 == cs
        # every context is a causal prefix with positions 0..p
        for (_, p), (toks, pos, _) in c2.items():
            assert pos == tuple(range(p + 1))
    # independent expectations from the samples themselves
    r2 = contexts(two, "response_segment")
    n2 = contexts(two, "nll_segment")
    for b, s in enumerate(samples):
        for seg, seq, mask in ((b, s.chosen, s.chosen_mask), (B + b, s.rejected, s.rejected_mask)):
            want = {(seg, t): (tuple(seq[: t + 1]), tuple(range(t + 1)), int(seq[t + 1]))
                    for t in range(len(seq) - 1) if mask[t + 1]}
            assert {k: v for k, v in r2.items() if k[0] == seg} == want
        S, m = (s.chosen, s.chosen_mask) if nll_on == "chosen" else (s.rejected, s.rejected_mask)
        want_nll = {(b, t): (tuple(S[: t + 1]), tuple(range(t + 1)), int(S[t + 1]))
                    for t in range(len(S) - 1) if nll_target == "sequence" or m[t + 1]}
        assert {k: v for k, v in n2.items() if k[0] == b} == want_nll
    np.testing.assert_array_equal(two.sample_index.numpy(), [s.index for s in samples])


def test_shared_prefix_row_contents(tok):
    samples = built_samples(tok, 2)
    batch = build_pair_batch(samples, "shared_prefix", 1, pad_id=3)
    s = samples[1]
    P, Lc, Lr = s.prefix_length, len(s.chosen_branch), len(s.rejected_branch)
    row = batch.tokens[1].numpy()
    np.testing.assert_array_equal(row[: P + Lc + Lr], np.concatenate([s.prefix, s.chosen_branch, s.rejected_branch]))
    np.testing.assert_array_equal(batch.position_ids[1, :P + Lc + Lr].numpy(), np.concatenate(
        [np.arange(P), np.arange(P, P + Lc), np.arange(P, P + Lr)]))
    np.testing.assert_array_equal(batch.branch_ids[1, :P + Lc + Lr].numpy(), [0] * P + [1] * Lc + [2] * Lr)
    # the last prefix position predicts the common first branch token; branch ends have no target
    assert batch.target_ids[1, P - 1] == s.chosen_branch[0] == s.rejected_branch[0]
    assert batch.nll_segment[1, P + Lc - 1] == -1 and batch.response_segment[1, P + Lc - 1] == -1
    assert batch.nll_segment[1, P - 1] == 1 and batch.response_segment[1, P - 1] == -1
    assert (batch.nll_segment[1, P + Lc:] == -1).all()  # the rejected branch never counts in the NLL


@pytest.mark.parametrize("parallel", [
    ParallelConfig(), ParallelConfig(context_parallel_size=2),
    ParallelConfig(tensor_model_parallel_size=3, context_parallel_size=2, sequence_parallel=True),
    ParallelConfig(context_parallel_size=2, fp8="hybrid"),
])
@pytest.mark.parametrize("layout", ["two_sequences", "shared_prefix"])
def test_padding_to_the_parallel_multiple(tok, parallel, layout):
    samples = built_samples(tok)
    m = seq_length_multiple(parallel)
    batch = build_pair_batch(samples, layout, m, pad_id=3)
    need = max(s.two_sequences_length if layout == "two_sequences" else s.shared_prefix_length for s in samples)
    S = batch.seq_len
    assert S % m == 0 and need <= S < need + m
    pad = batch.branch_ids == -1
    assert int((~pad).sum()) == sum(
        (len(s.chosen) + len(s.rejected)) if layout == "two_sequences" else s.shared_prefix_length for s in samples)
    assert batch.num_tokens() == int((~pad).sum())
    assert (batch.tokens[pad] == 3).all() and (batch.response_segment[pad] == -1).all()
    assert (batch.nll_segment[pad] == -1).all() and (batch.target_ids[pad] == 0).all()
    fixed = build_pair_batch(samples, layout, m, pad_id=3, pad_to_length=S + 2 * m)
    assert fixed.seq_len == S + 2 * m
    with pytest.raises(ValueError, match="more than pad_to_length"):
        build_pair_batch(samples, layout, 1, pad_id=3, pad_to_length=need - 1)


def test_reference_batch(tok):
    samples = built_samples(tok)
    refs = [r for s in samples for r in s.reference_sequences()]
    batch = build_reference_batch(refs, pad_to_multiple=4, pad_id=3)
    assert batch.tokens.shape[0] == len(refs) and batch.tokens.shape[1] % 4 == 0
    for i, (toks, mask) in enumerate(refs):
        L = len(toks)
        assert batch.lengths[i] == L
        np.testing.assert_array_equal(batch.tokens[i, :L].numpy(), toks)
        np.testing.assert_array_equal(batch.position_ids[i, :L].numpy(), np.arange(L))
        sel = batch.response_segment[i].numpy() == i
        # the targets of the response positions are exactly the masked tokens (none is at index 0)
        np.testing.assert_array_equal(batch.target_ids[i].numpy()[sel], toks[mask.astype(bool)])
        assert set(np.unique(batch.response_segment[i].numpy())) <= {-1, i}
