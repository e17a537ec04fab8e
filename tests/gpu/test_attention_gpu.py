"""Project CP attention on CUDA: bf16 equalities and fused SDPA kernels (skipped without CUDA).

Single process. CP is emulated at the attention level (every rank's local queries against the
same global K/V, K/V gradients accumulated = the all-gather / reduce-scatter pair); the model-level
check runs the real GPTModel at CP=1 in bf16.
"""

import pytest
import torch

from megatron_longpo.models.attention import attend_local
from megatron_longpo.runtime.zigzag import zigzag_slice, zigzag_unslice
from megatron_longpo.testing.attention import reference_attention

pytestmark = pytest.mark.gpu

BF16 = dict(rtol=2e-2, atol=2e-2)


def _qkv(b, h, g, seq, d, seed=0):
    torch.manual_seed(seed)
    mk = lambda n: torch.randn(b, n, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    return mk(h), mk(g), mk(g)


def _emulated(q, k, v, layouts, cp, kernel="sdpa"):
    parts = [attend_local(zigzag_slice(q, r, cp, dim=2), k, v, layouts, r, cp, scale=d_scale(q), kernel=kernel) for r in range(cp)]
    return zigzag_unslice(parts, dim=2)


def d_scale(q):
    return q.shape[-1] ** -0.5


@pytest.mark.parametrize("cp,seq", [(1, 256), (2, 264), (4, 320)])
def test_bf16_cp_attention_matches_float64(cp, seq):
    b, h, g, d = 2, 8, 2, 64
    layouts = [None, (seq // 3 + 1, seq // 2 + 3)]
    _assert_matches_float64(_qkv(b, h, g, seq, d), layouts, cp, "sdpa")


def _assert_matches_float64(qkv, layouts, cp, kernel):
    """Emulated-CP output and input gradients of ``kernel`` in bf16 vs the float64 brute force."""
    q, k, v = qkv
    out = _emulated(q, k, v, layouts, cp, kernel=kernel)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qd, kd, vd, layouts, d_scale(q))
    torch.testing.assert_close(out.double(), ref, **BF16)
    w = torch.randn_like(ref)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    for a, r in ((q, qd), (k, kd), (v, vd)):
        err = (a.grad.double() - r.grad).norm() / r.grad.norm()
        assert err < 3e-2, f"{kernel}: relative gradient error {err:.3g}"


def test_sdpa_uses_fused_kernels_without_dense_masks(monkeypatch):
    """Restricted to FLASH/EFFICIENT the attention runs (no math fallback) and builds no mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import CausalBias
    from torch.profiler import ProfilerActivity, profile

    def no_materialize(*a, **k):
        raise AssertionError("a dense causal mask was materialised")

    monkeypatch.setattr(CausalBias, "_materialize", no_materialize)
    q, k, v = _qkv(1, 8, 2, 512, 64, seed=1)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = _emulated(q, k, v, [(100, 300)], cp=2)
            out.float().square().sum().backward()
            torch.cuda.synchronize()
    ops = {e.key for e in prof.key_averages()}
    fused = {o for o in ops if "flash_attention" in o or "efficient_attention" in o}
    assert fused, f"no fused attention op ran; ops: {sorted(ops)}"
    assert not any("attention_math" in o for o in ops), "SDPA fell back to the math kernel"


def test_flash_attn_kernel_matches_sdpa():
    from megatron_longpo.runtime.capabilities import flash_attn_available

    if not flash_attn_available():
        pytest.skip("flash-attn >= 2.1 not installed")
    q, k, v = _qkv(2, 8, 2, 264, 64, seed=2)
    layouts = [None, (90, 140)]
    a = _emulated(q, k, v, layouts, 2, kernel="flash")
    b = _emulated(q, k, v, layouts, 2, kernel="sdpa")
    torch.testing.assert_close(a, b, **BF16)


@pytest.mark.parametrize("kernel", ["cudnn", "fa3"])
@pytest.mark.parametrize("cp,seq", [(1, 256), (2, 264), (4, 320)])
def test_block_kernel_matches_float64(kernel, cp, seq):
    """TE cuDNN (causal_bottom_right) and FA3 as block kernels: output and gradients vs float64."""
    from megatron_longpo.runtime.capabilities import fa3_available, te_available, unavailable_reason

    available = {"cudnn": te_available, "fa3": fa3_available}[kernel]
    if not available():
        pytest.skip(f"{kernel}: {unavailable_reason({'cudnn': 'transformer_engine', 'fa3': 'flash_attn_interface'}[kernel])}")
    b, h, g, d = 2, 8, 2, 128
    layouts = [None, (seq // 3 + 1, seq // 2 + 3)]
    _assert_matches_float64(_qkv(b, h, g, seq, d, seed=3), layouts, cp, kernel)


@pytest.fixture(scope="module")
def single_process_groups():
    from megatron_longpo.runtime.distributed import destroy, init_distributed, init_model_parallel
    from megatron_longpo.testing.models import parallel_config

    pcfg = parallel_config()
    init_distributed(pcfg)
    yield init_model_parallel(pcfg)
    destroy()


def _model_logps(groups, batch, core, weights=None, arch="llama"):
    import torch.nn.functional as F

    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import set_seed
    from megatron_longpo.testing.models import parallel_config, tiny_model_config

    mcfg = tiny_model_config(arch, params_dtype="bf16")
    set_seed(3)
    model = build_model(mcfg, parallel_config(), core_attention=core)
    if weights is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[n])
    inp = batch.to("cuda").for_cp_rank(groups.cp_rank, groups.cp_size)
    logits = model(inp.tokens.cuda(), inp.position_ids.cuda(), inp.attention_mask)[..., : mcfg.vocab_size]
    tok = F.log_softmax(logits.double(), -1).gather(-1, batch.target_ids.cuda()[..., None]).squeeze(-1)
    seg = batch.response_segment.cuda()
    logps = torch.zeros(2 * batch.num_pairs, dtype=torch.float64, device="cuda").index_add(0, seg[seg >= 0], tok[seg >= 0])
    logps.sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return logps.detach(), grads, weights


def test_bf16_model_shared_prefix_matches_two_sequences(single_process_groups):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_longpo.models.attention import ContextParallelAttention
    from megatron_longpo.testing.pairs import MULTI_TURN, make_pairs, raw_pair_batch

    pairs = make_pairs(MULTI_TURN, 250, seed=4)
    two = raw_pair_batch(pairs, "two_sequences", 24)
    shared = raw_pair_batch(pairs, "shared_prefix", 24)
    ref, ref_g, weights = _model_logps(single_process_groups, two, DotProductAttention)
    got, got_g, _ = _model_logps(single_process_groups, shared, ContextParallelAttention, weights)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0.25)
    for name, g in ref_g.items():
        err = (got_g[name] - g).norm() / g.norm()
        assert err < 5e-2, f"{name}: relative gradient error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_never_reaches_the_math_kernel(dtype):
    """fp32 + GQA used to fall back to math ([b, h, S, S] scores); choose_sdpa expands K/V instead.

    Asserts on the GPU what tests/unit/test_gpu_rules.py checks of the pure choice: the ops that
    ran are fused ones, and the peak memory is far below one dense score matrix.
    """
    from torch.profiler import ProfilerActivity, profile

    from megatron_longpo.models.attention.kernels import choose_sdpa

    seq, h, g, d = 8192, 8, 2, 64
    torch.manual_seed(0)
    q = torch.randn(1, h, seq, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(1, g, seq, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(1, g, seq, d, device="cuda", dtype=dtype, requires_grad=True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = attend_local(q, k, v, [(seq // 3, seq // 2)], 0, 1, scale=d ** -0.5)
        out.float().sum().backward()
        torch.cuda.synchronize()
    ops = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
    assert not any("math" in o for o in ops), ops
    assert any("flash" in o or "efficient" in o for o in ops), ops
    dense = h * seq * seq * 4
    assert torch.cuda.max_memory_allocated() - base < dense / 4
    assert choose_sdpa("cuda", dtype, True, True, d).backends  # the choice the kernels used
