"""Chunked log-probs and segment sums (single process) against float64 log_softmax of full logits."""

import pytest
import torch

from megatron_longpo.loss.logprobs import segment_logprob_sums, vocab_parallel_target_logprobs

V, V_PAD, H = 50, 64, 12


def _weight(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # Padding rows are random, not zero: any leak of them into the softmax changes the result.
    return torch.randn(V_PAD, H, generator=g, dtype=torch.float64).to(dtype)


def _reference_logprobs(rows, weight, targets):
    logits = rows.to(torch.float64) @ weight.to(torch.float64)[:V].t()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_target_logprobs_and_grads_match_log_softmax(chunk):
    g = torch.Generator().manual_seed(chunk)
    n = 23
    rows = (2 * torch.randn(n, H, generator=g, dtype=torch.float64)).requires_grad_()
    w = _weight(1).requires_grad_()
    t = torch.randint(0, V, (n,), generator=g)
    t[0], t[1] = 0, V - 1  # first and last real ids
    coef = torch.randn(n, generator=g, dtype=torch.float64)

    out = vocab_parallel_target_logprobs(rows, w, t, vocab_size=V, chunk_size=chunk)
    (out * coef).sum().backward()
    rows_ref, w_ref = rows.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = _reference_logprobs(rows_ref, w_ref, t)
    (ref * coef).sum().backward()

    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows.grad, rows_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)
    assert torch.all(w.grad[V:] == 0), "padded vocabulary rows must get no gradient"


def test_gradcheck():
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(6, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = _weight(2).requires_grad_()
    t = torch.randint(0, V, (6,), generator=g)
    assert torch.autograd.gradcheck(lambda r, ww: vocab_parallel_target_logprobs(r, ww, t, vocab_size=V, chunk_size=4), (rows, w))


def test_low_precision_inputs_give_fp32_logprobs():
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(10, H, generator=g)
    w = _weight(5, torch.float32)
    t = torch.randint(0, V, (10,), generator=g)
    ref = _reference_logprobs(rows, w, t)
    out32 = vocab_parallel_target_logprobs(rows, w, t, vocab_size=V, chunk_size=3)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)
    rb, wb = rows.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    outb = vocab_parallel_target_logprobs(rb, wb, t, vocab_size=V, chunk_size=3)
    assert outb.dtype == torch.float32
    torch.testing.assert_close(outb.double(), ref, rtol=0.05, atol=0.1)  # bf16 logits
    outb.sum().backward()
    assert rb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16


def _brute_segment_sums(hidden, weight, targets, seg, n):
    """hidden [s, b, h]; loops over every (row, position)."""
    s, b, _ = hidden.shape
    logits = torch.einsum("sbh,vh->bsv", hidden.double(), weight.double()[:V])
    logp = torch.log_softmax(logits, -1)
    sums = [torch.zeros((), dtype=torch.float64) for _ in range(n)]
    counts = [0] * n
    for r in range(b):
        for p in range(s):
            k = int(seg[r, p])
            if k >= 0:
                sums[k] = sums[k] + logp[r, p, targets[r, p]]
                counts[k] += 1
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float64)


def test_segment_sums_match_brute_force():
    g = torch.Generator().manual_seed(11)
    s, b = 9, 3
    hidden = torch.randn(s, b, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = _weight(6).requires_grad_()
    targets = torch.randint(0, V, (b, s), generator=g)
    seg_a = torch.randint(-1, 4, (b, s), generator=g)
    seg_a[seg_a == 2] = -1  # segment 2 of set A has no token: sum 0, count 0
    seg_b = torch.randint(-2, 2, (b, s), generator=g).clamp(min=-1)  # overlaps set A arbitrarily
    out = segment_logprob_sums(hidden, w, targets, [seg_a, seg_b], [4, 2], vocab_size=V, chunk_size=4)
    coef_a = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    loss = (out[0].sums * coef_a).sum() + (out[1].sums ** 2).sum() * 0.01
    loss.backward()

    h_ref, w_ref = hidden.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ra, ca = _brute_segment_sums(h_ref, w_ref, targets, seg_a, 4)
    rb, cb = _brute_segment_sums(h_ref, w_ref, targets, seg_b, 2)
    ((ra * coef_a).sum() + (rb ** 2).sum() * 0.01).backward()
    torch.testing.assert_close(out[0].sums, ra, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1].sums, rb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0].counts, ca)
    torch.testing.assert_close(out[1].counts, cb)
    assert out[0].counts[2] == 0 and out[0].sums[2] == 0
    torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


def test_no_needed_position_gives_zeros_and_keeps_the_graph():
    hidden = torch.randn(4, 2, H, dtype=torch.float64, requires_grad=True)
    w = _weight(0).requires_grad_()
    none = torch.full((2, 4), -1)
    out = segment_logprob_sums(hidden, w, torch.zeros(2, 4, dtype=torch.long), [none], [3], vocab_size=V)
    assert torch.all(out[0].sums == 0) and torch.all(out[0].counts == 0)
    # The backward must reach hidden (the model's backward collectives depend on it) and the
    # output weight (every DDP parameter gets a gradient).
    out[0].sums.sum().backward()
    assert hidden.grad is not None and torch.all(hidden.grad == 0)
    assert w.grad is not None and torch.all(w.grad == 0)


def test_bad_inputs_are_rejected():
    hidden = torch.randn(4, 2, H, dtype=torch.float64)
    w = _weight(0)
    tgt = torch.zeros(2, 4, dtype=torch.long)
    seg = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="target ids must lie in"):
        segment_logprob_sums(hidden, w, tgt + V, [seg], [1], vocab_size=V)
    with pytest.raises(ValueError, match="segment count"):
        segment_logprob_sums(hidden, w, tgt, [seg + 1], [1], vocab_size=V)
    with pytest.raises(ValueError, match="does not match target_ids"):
        segment_logprob_sums(hidden[:3], w, tgt, [seg], [1], vocab_size=V)
    with pytest.raises(ValueError, match="vocab_size"):
        segment_logprob_sums(hidden, w, tgt, [seg], [1], vocab_size=V_PAD + 1)
    with pytest.raises(ValueError, match="chunk_size"):
        segment_logprob_sums(hidden, w, tgt, [seg], [1], vocab_size=V, chunk_size=0)
