"""The prepared GPU check: everything the first GPU lent to this project should measure, in one run.

    python tools/gpu_check.py [--smoke] [--out gpu_check.json] [--sections a,b] [--budget-s 420]

Sections (each isolated: an exception or a failed tolerance in one is recorded and the next
runs; a section that would start after ``--budget-s`` is skipped):

Sections, in this order (each isolated: an exception or a failed tolerance in one is recorded and
the next runs; a section that would start after ``--budget-s`` is skipped). The JSON report is
rewritten atomically after EVERY section, so a run killed by a timeout keeps what ran:

- ``environment``: versions, GPU, whether Transformer Engine / flash-attn / FA3 / apex import (and
  why not), NVTE_* and CUDA_DEVICE_MAX_CONNECTIONS; a measured bf16 GEMM peak (TFLOP/s).
- ``attention``: the project attention in bf16 against a float64 brute force, CP 1/2/4 emulated
  (every rank's queries against the global K/V), GQA, causal and shared-prefix rows, output and
  gradients, tolerance ``atol + rtol*|ref|`` per element; an fp32 GQA block at length; the SDPA
  kernels that ran. Fails if the math kernel ran on CUDA. Then every block kernel that can run
  here (sdpa, flash, cudnn, fa3): its accuracy at CP 2 and its fwd+bwd TFLOP/s on one causal row
  of 32K and 64K tokens.
- ``loss``: a tiny model's LongPO loss and every parameter gradient, bf16 on this device against
  the same weights in float64 on the CPU (a separate CPU-only process), both pair layouts.
- ``checkpoint``: save -> load through the training checkpoint (NCCL on a GPU; model,
  distributed optimizer, RNG): weights and RNG bit-exact, the next step's loss and weights equal
  to the uninterrupted run's.
- ``te``: when Transformer Engine imports on CUDA: TE spec with the project attention vs TE
  attention (bf16) vs TE attention + FP8 (delayed), same weights: loss differences against
  thresholds (bf16 and FP8 separately) and throughput.
- ``train``: a ~1B-parameter model (bf16, GQA, 32K vocab) through the real train step (Megatron
  DDP with overlapped grad reduction, distributed optimizer, full recompute) at 32K and 64K pair
  tokens in both layouts: pair tokens/s, model TFLOP/s, MFU against 989 dense bf16 TFLOP/s
  (H100/H200 SXM datasheet) and against the measured GEMM peak, peak memory, host syncs per step,
  shared_prefix / two_sequences ratios.

The report's ``not_run`` lists the production pieces this machine could not exercise (no TE: no
TE layers, TE attention, cuDNN kernel, FP8, TE fused Adam; one GPU: no multi-GPU collectives).
``--smoke`` runs every section at toy size on the CPU (CI runs it: tests/unit/test_gpu_check.py);
there ``te`` is skipped because TE needs CUDA. Prints a summary at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import megatron.core
import torch
from torch.profiler import ProfilerActivity, profile

from megatron_longpo.checkpoint import read_meta
from megatron_longpo.config import (
    DataConfig,
    LongPOConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainingConfig,
    seq_length_multiple,
)
from megatron_longpo.fsutil import write_text_atomic
from megatron_longpo.loss.longpo import scored_positions
from megatron_longpo.models.attention import attend_local, kernels
from megatron_longpo.models.provider import build_model
from megatron_longpo.runtime import capabilities
from megatron_longpo.runtime.distributed import current_groups, init_distributed, init_model_parallel, set_seed
from megatron_longpo.runtime.zigzag import zigzag_slice, zigzag_unslice
from megatron_longpo.testing.pairs import synthetic_pair_batch
from megatron_longpo.testing.syncs import SyncCounter, cuda_sync_warnings
from megatron_longpo.training.flops import attended_pairs, train_flops
from megatron_longpo.training.checkpointing import TrainState, find_checkpoint, load_checkpoint, save_training_checkpoint
from megatron_longpo.training.loop import _build_model, _wrap_ddp
from megatron_longpo.training.memory_model import estimate_memory
from megatron_longpo.training.optimizer import build_optimizer
from megatron_longpo.training.step import microbatch_forward, train_step

PEAK_BF16_TFLOPS = 989.0  # dense bf16 tensor-core peak of an H100/H200 SXM
SECTIONS = ("environment", "attention", "loss", "checkpoint", "te", "train")
BLOCK_KERNELS = ("sdpa", "flash", "cudnn", "fa3")


@dataclass
class Sizes:
    """Problem sizes of one run (full on a GPU, toy with --smoke)."""

    attn: dict
    attn_long: int
    loss_model: dict
    loss_prefix: int
    loss_response: int
    train_model: dict
    train_tokens: tuple[int, ...]
    train_response: int
    train_steps: int
    te_model: dict
    te_tokens: int
    kernel_tokens: tuple[int, ...]  # one causal row per kernel timing
    kernel_heads: tuple[int, int, int]  # (query heads, kv heads, head dim)
    gemm: int  # square bf16 GEMM size of the peak measurement
    ckpt_model: dict


FULL = Sizes(
    attn=dict(b=2, h=16, g=4, d=128, seq=4096),
    attn_long=16384,
    loss_model=dict(arch="mistral", num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=8,
                    num_query_groups=2, vocab_size=1000, max_position_embeddings=4096),
    loss_prefix=300, loss_response=40,
    # ~1.03B parameters: 20 x 45M layers + 2 x 65.5M untied embedding/output
    train_model=dict(arch="llama", num_layers=20, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                     num_query_groups=4, vocab_size=32000, max_position_embeddings=131072, rope_theta=1e7),
    train_tokens=(32768, 65536), train_response=1024, train_steps=3,
    te_model=dict(arch="llama", num_layers=4, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                  num_query_groups=4, vocab_size=32000, max_position_embeddings=32768),
    te_tokens=8192,
    kernel_tokens=(32768, 65536), kernel_heads=(32, 8, 128), gemm=8192,
    ckpt_model=dict(arch="llama", num_layers=2, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=8,
                    num_query_groups=4, vocab_size=32000, max_position_embeddings=8192),
)
SMOKE = Sizes(
    attn=dict(b=2, h=4, g=2, d=16, seq=64),
    attn_long=128,
    loss_model=dict(arch="mistral", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
                    num_query_groups=2, vocab_size=300, max_position_embeddings=512),
    loss_prefix=20, loss_response=6,
    train_model=dict(arch="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_query_groups=2, vocab_size=250, max_position_embeddings=512),
    train_tokens=(64, 128), train_response=8, train_steps=1,
    te_model=dict(arch="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, vocab_size=250, max_position_embeddings=512),
    te_tokens=64,
    kernel_tokens=(128, 256), kernel_heads=(4, 2, 16), gemm=128,
    ckpt_model=dict(arch="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, vocab_size=250, max_position_embeddings=512),
)

# Tolerances (bf16: 8 significand bits, unit roundoff 2^-9 = 2e-3 per rounding; errors of a few
# roundings per op accumulate over the softmax / layers to the 1e-2 range; float64 is exact here).
# Attention output per element: |out - out64| <= ATTN_ATOL + ATTN_RTOL * |out64| (storing a value
# of magnitude 4-8 in bf16 alone is off by up to 0.0156, so a pure atol cannot be tight and fair).
ATTN_ATOL = 1e-2  # output elements are O(1) averages of values ~N(0,1)
ATTN_RTOL = 1.6e-2  # four bf16 roundings (2^-8 each) of the output's own magnitude
ATTN_GRAD_REL = 3e-2  # ||g - g64|| / ||g64|| per input tensor
# TE comparison on the same weights, relative loss difference to the bf16 project-attention run:
TE_BF16_LOSS_REL = 1e-2  # TE attention (cuDNN / flash) in bf16: a different summation order only
TE_FP8_LOSS_REL = 5e-2  # + FP8 GEMMs (e4m3 forward: 3 mantissa bits, per-tensor delayed scaling)
LOSS_REL = 1e-2  # |L - L64| / |L64|
GRAD_REL = 6e-2  # per parameter tensor, relative norm error (bf16 weights, 2 layers)


_DEADLINE = [math.inf]  # wall-clock time (time.time()) after which long sections stop starting runs


def _out_of_time() -> bool:
    return time.time() > _DEADLINE[0]


class CheckFailed(AssertionError):
    """A measured value is outside its tolerance (the section records it as failed)."""


def _device() -> torch.device:
    return capabilities.device()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------


def _import_status(name: str) -> dict:
    try:
        mod = __import__(name)
    except BaseException as e:  # noqa: BLE001 - a broken optional install must not stop the check
        return {"imports": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {"imports": True, "version": getattr(mod, "__version__", None)}


def measure_gemm_tflops(n: int, repeats: int = 10) -> dict:
    """bf16 (fp32 on CPU) [n, n] x [n, n] matmul throughput: the attainable peak beside the datasheet."""
    dev = _device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync()
    dt = (time.perf_counter() - t0) / repeats
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "seconds": dt, "tflops": 2 * n**3 / dt / 1e12}


# The measured GEMM peak, kept for the train section's second MFU (None until environment ran).
_MEASURED = {"gemm_tflops": None}


def section_environment(sizes: Sizes, smoke: bool) -> dict:
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "megatron_core": getattr(megatron.core, "__version__", None),
        "cuda_available": torch.cuda.is_available(),
        "transformer_engine": _import_status("transformer_engine"),
        "flash_attn": _import_status("flash_attn"),
        "flash_attn_interface": _import_status("flash_attn_interface"),
        "apex": _import_status("apex"),
        "capabilities": dataclasses.asdict(capabilities.Capabilities.detect()),
        "env": {k: os.environ.get(k) for k in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN",
                                               "CUDA_DEVICE_MAX_CONNECTIONS", "CUDA_VISIBLE_DEVICES")},
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    gemm = measure_gemm_tflops(sizes.gemm)
    _MEASURED["gemm_tflops"] = gemm["tflops"]
    out["gemm_peak"] = {**gemm, "datasheet_bf16_tflops": PEAK_BF16_TFLOPS,
                        "fraction_of_datasheet": gemm["tflops"] / PEAK_BF16_TFLOPS}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpus_visible=torch.cuda.device_count(),
                   capability=list(torch.cuda.get_device_capability(0)), memory_gib=props.total_memory / 2**30,
                   cudnn=torch.backends.cudnn.version())
    return out


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------


def _rule_mask(seq: int, layout: Optional[tuple[int, int]], device) -> torch.Tensor:
    """[S, S] bool from the rule (models/attention/plan.allowed), vectorised."""
    t = torch.arange(seq, device=device)[:, None]
    k = torch.arange(seq, device=device)[None, :]
    causal = k <= t
    if layout is None:
        return causal
    p, r = layout
    return causal & ((t < r) | (k < p) | (k >= r))


def _reference_attention(q, k, v, layouts, scale):
    rep = q.shape[1] // k.shape[1]
    k64, v64 = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k64) * scale
    mask = torch.stack([_rule_mask(q.shape[2], lay, q.device) for lay in layouts])[:, None]
    return torch.einsum("bhqk,bhkd->bhqd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v64)


def _sdpa_ops(fn: Callable[[], Any]) -> Counter:
    """aten SDPA op names that ran in ``fn`` (forward and backward)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter({e.key: e.count for e in prof.key_averages() if "scaled_dot_product" in e.key})


def section_attention(sizes: Sizes, smoke: bool) -> dict:
    dev = _device()
    a = sizes.attn
    b, h, g, d, seq = a["b"], a["h"], a["g"], a["d"], a["seq"]
    layouts = [None, (seq // 3 + 1, seq // 2 + 3)]
    scale = d ** -0.5
    kernels.KERNEL_CHOICES.clear()
    results: dict[str, Any] = {"shape": dict(a), "layouts": [list(x) if x else None for x in layouts], "cp": {}}
    failures = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(b, n, seq, d, generator=gen) for n in (h, g, g)]
    ops: Counter = Counter()
    for cp in (1, 2, 4):
        q, k, v = (t.to(dev, torch.bfloat16).requires_grad_() for t in base)

        def run():
            parts = [attend_local(zigzag_slice(q, r, cp, dim=2), k, v, layouts, r, cp, scale=scale) for r in range(cp)]
            out = zigzag_unslice(parts, dim=2)
            (out.double() * w).sum().backward()
            return out

        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = _reference_attention(qd, kd, vd, layouts, scale)
        w = torch.randn(ref.shape, generator=gen).to(dev, torch.float64)
        (ref * w).sum().backward()
        holder = {}
        ops += _sdpa_ops(lambda: holder.setdefault("out", run()))
        out = holder["out"]
        err = (out.double() - ref).abs().max().item()
        worst = tolerance_ratio(out, ref)
        grad_err = {n: ((x.grad.double() - r.grad).norm() / r.grad.norm()).item()
                    for n, x, r in (("dq", q, qd), ("dk", k, kd), ("dv", v, vd))}
        results["cp"][str(cp)] = {"max_abs_err": err, "max_err_over_tol": worst, "grad_rel_err": grad_err}
        if worst > 1 or max(grad_err.values()) > ATTN_GRAD_REL:
            failures.append(f"cp={cp}: max |err| / (atol {ATTN_ATOL} + rtol {ATTN_RTOL} * |ref|) = {worst:.3g} (must be "
                            f"<= 1), grad rel err {grad_err} (tol {ATTN_GRAD_REL})")
        del q, k, v, qd, kd, vd, ref, out, holder
        _free()
    # fp32 GQA at length: the case that used to fall to the math kernel ([b, h, S, S] scores).
    seq_l = sizes.attn_long
    q = torch.randn(1, h, seq_l, d, device=dev, requires_grad=True)
    k = torch.randn(1, g, seq_l, d, device=dev, requires_grad=True)
    v = torch.randn(1, g, seq_l, d, device=dev, requires_grad=True)
    _free()
    _peak_reset()
    base_mem = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    long_layout = [(seq_l // 3, seq_l // 2)]  # one shared-prefix row: square and non-square blocks
    ops_long = _sdpa_ops(lambda: attend_local(q, k, v, long_layout, 0, 1, scale=scale).sum().backward())
    _sync()
    scores_gib = h * seq_l * seq_l * 4 / 2**30
    results["fp32_gqa_long"] = {
        "seq": seq_l, "seconds": time.perf_counter() - t0, "sdpa_ops": dict(ops_long),
        "peak_gib_above_inputs": (_peak_gib() - base_mem) if base_mem is not None else None,
        "dense_scores_would_be_gib": scores_gib,
    }
    del q, k, v
    _free()
    ops += ops_long
    results["sdpa_ops"] = dict(ops)
    results["kernel_choices"] = dict(kernels.KERNEL_CHOICES)
    math_ops = [n for n in ops if "math" in n]
    if dev.type == "cuda" and math_ops:
        failures.append(f"the math SDPA kernel ran: {math_ops}")
    results["kernels"] = {}
    for kernel in BLOCK_KERNELS:
        if _out_of_time():
            results["kernels"][kernel] = {"skipped": "time budget spent"}
            continue
        why = kernel_unavailable(kernel)
        if why:
            results["kernels"][kernel] = {"skipped": why}
            continue
        res = kernel_accuracy_and_speed(kernel, sizes, base, layouts, scale)
        results["kernels"][kernel] = res
        if res["max_err_over_tol"] > 1 or res["grad_rel_err_max"] > ATTN_GRAD_REL:
            failures.append(f"kernel {kernel}: max err/tol {res['max_err_over_tol']:.3g}, grad rel err "
                            f"{res['grad_rel_err_max']:.3g}")
    if failures:
        raise CheckFailed("; ".join(failures), results)
    return results


def tolerance_ratio(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max over elements of |out - ref| / (ATTN_ATOL + ATTN_RTOL * |ref|): <= 1 passes."""
    ref = ref.detach().double()
    return ((out.detach().double() - ref).abs() / (ATTN_ATOL + ATTN_RTOL * ref.abs())).max().item()


def kernel_unavailable(kernel: str) -> Optional[str]:
    """Why a block kernel cannot run here (None: it can). sdpa runs everywhere."""
    needs = {"flash": (capabilities.flash_attn_available, "flash_attn"),
             "cudnn": (capabilities.te_available, "transformer_engine"),
             "fa3": (capabilities.fa3_available, "flash_attn_interface")}
    if kernel not in needs:
        return None
    runs, package = needs[kernel]
    return None if runs() else capabilities.unavailable_reason(package)


def kernel_accuracy_and_speed(kernel: str, sizes: Sizes, base: list, layouts: list, scale: float) -> dict:
    """One block kernel: CP=2 output/gradients vs float64, then fwd+bwd TFLOP/s on one causal row."""
    dev = _device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the CUDA kernels take bf16 only
    q, k, v = (t.to(dev, dtype).requires_grad_() for t in base)
    parts = [attend_local(zigzag_slice(q, r, 2, dim=2), k, v, layouts, r, 2, scale=scale, kernel=kernel) for r in range(2)]
    out = zigzag_unslice(parts, dim=2)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _reference_attention(qd, kd, vd, layouts, scale)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(dev, torch.float64)
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    grad = max(((x.grad.double() - r.grad).norm() / r.grad.norm()).item() for x, r in ((q, qd), (k, kd), (v, vd)))
    res: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "max_err_over_tol": tolerance_ratio(out, ref),
                           "grad_rel_err_max": grad, "tflops": {}}
    del q, k, v, qd, kd, vd, ref, out, parts
    _free()
    h, g, d = sizes.kernel_heads
    for seq in sizes.kernel_tokens:
        qs, ks, vs = (torch.randn(1, n, seq, d, device=dev, dtype=dtype, requires_grad=True) for n in (h, g, g))

        def step():
            attend_local(qs, ks, vs, [None], 0, 1, scale=d ** -0.5, kernel=kernel).sum().backward()

        step()  # warm-up
        _sync()
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        _sync()
        dt = (time.perf_counter() - t0) / 3
        # causal: seq*(seq+1)/2 pairs; forward 4*A*h*d (QK^T, AV), backward 2.5x forward (flash-attn convention)
        flops = 3.5 * 4 * seq * (seq + 1) / 2 * h * d
        res["tflops"][str(seq)] = {"seconds": dt, "tflops": flops / dt / 1e12}
        del qs, ks, vs
        _free()
    return res


# ----------------------------------------------------------------------------------------------
# loss: device bf16 vs CPU float64 (separate CPU-only process)
# ----------------------------------------------------------------------------------------------


def _model_cfg(d: dict, **kw) -> ModelConfig:
    return ModelConfig(**{**d, **kw})


def microbatch_loss_and_grads(model, batch, loss_cfg: LossConfig, vocab: int) -> tuple[float, dict, dict]:
    """LongPO loss, metrics and every parameter gradient (float64, CPU) of one micro-batch, TP=CP=1."""
    model.zero_grad(set_to_none=True)
    loss, metrics = microbatch_forward(model, batch, current_groups(), loss_cfg, vocab, False)
    loss.backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), {k: float(v) for k, v in metrics.items()}, grads


def reference_main(inp: str, out: str) -> None:
    """CPU float64 side of the loss section (``python -m megatron_longpo.checks.gpu_check --reference``)."""
    data = torch.load(inp, weights_only=False)
    parallel = ParallelConfig(distributed_backend="gloo")
    init_distributed(parallel)
    init_model_parallel(parallel)
    res = {}
    for layout, item in data["cases"].items():
        mcfg = ModelConfig(**data["model"])
        model = build_model(mcfg, parallel, pair_layout=layout, initialize=False)
        missing, unexpected = model.load_state_dict(item["state"], strict=False)
        bad = [k for k in missing if not k.endswith("_extra_state")]
        if bad or unexpected:
            raise RuntimeError(f"reference model does not match the device model: missing {bad}, unexpected {unexpected}")
        model.double()
        res[layout] = microbatch_loss_and_grads(model, item["batch"], LossConfig(**data["loss"]), mcfg.vocab_size)
    torch.save(res, out)


def _run_reference(payload: dict, workdir: Path) -> dict:
    inp, out = workdir / "reference_in.pt", workdir / "reference_out.pt"
    torch.save(payload, inp)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "megatron_longpo.checks.gpu_check", "--reference", str(inp), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"CPU float64 reference process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return torch.load(out, weights_only=False)


def section_loss(sizes: Sizes, smoke: bool, workdir: Path) -> dict:
    parallel = ParallelConfig(attention_backend="sdpa")
    init_model_parallel(parallel)
    mcfg = _model_cfg(sizes.loss_model, params_dtype="bf16", transformer_impl="local")
    loss_cfg = LossConfig(mode="longpo", beta=0.1, lam=1.0, nll_weight=1.0)
    payload: dict = {"model": dataclasses.asdict(dataclasses.replace(mcfg, params_dtype="fp32")),
                     "loss": dataclasses.asdict(loss_cfg), "cases": {}}
    device_side = {}
    for layout in ("two_sequences", "shared_prefix"):
        set_seed(0)
        model = build_model(mcfg, parallel, pair_layout=layout)
        batch = synthetic_pair_batch(layout, 2, sizes.loss_prefix, sizes.loss_response, mcfg.vocab_size, multiple=8)
        device_side[layout] = microbatch_loss_and_grads(model, batch, loss_cfg, mcfg.vocab_size)
        state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()
                 if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
        payload["cases"][layout] = {"state": state, "batch": batch}
        del model
        _free()
    ref = _run_reference(payload, workdir)
    results: dict[str, Any] = {"dtype": "bf16", "device": str(_device()), "reference": "cpu float64", "layouts": {}}
    failures = []
    for layout, (loss, metrics, grads) in device_side.items():
        rloss, rmetrics, rgrads = ref[layout]
        if grads.keys() != rgrads.keys():
            raise RuntimeError(f"{layout}: gradient sets differ: {sorted(set(grads) ^ set(rgrads))[:4]}")
        rel = {n: ((grads[n] - rgrads[n]).norm() / rgrads[n].norm().clamp_min(1e-30)).item() for n in rgrads}
        worst = max(rel, key=rel.get)
        loss_rel = abs(loss - rloss) / max(abs(rloss), 1e-30)
        results["layouts"][layout] = {"loss": loss, "loss_float64": rloss, "loss_rel_err": loss_rel,
                                      "grad_tensors": len(rel), "grad_rel_err_max": rel[worst],
                                      "grad_rel_err_worst_param": worst,
                                      "grad_rel_err_median": sorted(rel.values())[len(rel) // 2]}
        if loss_rel > LOSS_REL or rel[worst] > GRAD_REL:
            failures.append(f"{layout}: loss rel err {loss_rel:.3g} (tol {LOSS_REL}), worst grad rel err "
                            f"{rel[worst]:.3g} at {worst} (tol {GRAD_REL})")
    if failures:
        raise CheckFailed("; ".join(failures), results)
    return results


# ----------------------------------------------------------------------------------------------
# checkpoint: save -> load round trip through the training checkpoint (NCCL on a GPU)
# ----------------------------------------------------------------------------------------------


def _rng_snapshot() -> dict:
    snap = {"torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available():
        snap["cuda"] = torch.cuda.get_rng_state().clone()
    return snap


def _weights(model) -> dict:
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _optimizer_tensors(optimizer) -> dict:
    """fp32 main params and moments of a Megatron optimizer (plain, distributed or chained), by position."""
    out = {}
    for i, opt in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        inner = opt.optimizer  # the torch (or TE / apex fused) optimizer Megatron wraps
        for j, group in enumerate(inner.param_groups):
            for n, p in enumerate(group["params"]):
                out[f"{i}.{j}.{n}.param"] = p.detach().float().cpu().clone()
                for k, v in inner.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and v.numel() > 1:
                        out[f"{i}.{j}.{n}.{k}"] = v.detach().float().cpu().clone()
    return out


def _first_difference(a: dict, b: dict) -> Optional[str]:
    for k in a:
        if k not in b or not torch.equal(a[k], b[k]):
            return k
    return None


def section_checkpoint(sizes: Sizes, smoke: bool, workdir: Path) -> dict:
    """Train a step, save, train one more (the uninterrupted run); rebuild from another seed, load,
    train the same step: weights and RNG must be bit-exact after load, the next step identical."""
    cfg = train_config(sizes.ckpt_model, 2 * sizes.loss_prefix, smoke)
    cfg.training.recompute_granularity = None
    groups = init_model_parallel(cfg.parallel)
    mult = seq_length_multiple(cfg.parallel)
    batch = synthetic_pair_batch("two_sequences", 1, sizes.loss_prefix, sizes.loss_response, cfg.model.vocab_size,
                                 multiple=mult)

    def build(seed: int):
        set_seed(seed)
        [model] = _build_model(cfg)  # no PP here: one chunk
        [ddp] = _wrap_ddp([model], cfg)
        optimizer, scheduler = build_optimizer([ddp], cfg.optim, cfg.model, cfg.training.train_iters)
        return model, ddp, optimizer, scheduler

    def step(ddp, optimizer, scheduler) -> float:
        res = train_step(ddp, optimizer, [batch], groups, cfg.loss, cfg.model.vocab_size, False)
        scheduler.step(1)
        return float(res.metrics["loss"])

    run = workdir / "ckpt_run"
    model, ddp, optimizer, scheduler = build(0)
    step(ddp, optimizer, scheduler)
    saved_weights, saved_optimizer, saved_rng = _weights(model), _optimizer_tensors(optimizer), _rng_snapshot()
    save_training_checkpoint(run, TrainState(1, 1), model, optimizer, scheduler, {}, groups, cfg.model)
    next_loss = step(ddp, optimizer, scheduler)
    next_weights = _weights(model)
    distributed_optimizer = ddp.ddp_config.use_distributed_optimizer
    del model, ddp, optimizer, scheduler
    _free()

    model, ddp, optimizer, scheduler = build(1234)  # different init: everything must come from disk
    state = load_checkpoint(run, model, optimizer, scheduler, groups, cfg.model, own_checkpoint=True)
    loaded_rng = _rng_snapshot()
    loaded_diff = _first_difference(saved_weights, _weights(model))
    optimizer_diff = _first_difference(saved_optimizer, _optimizer_tensors(optimizer))
    rng_equal = all(torch.equal(saved_rng[k], loaded_rng[k]) for k in saved_rng)
    resumed_loss = step(ddp, optimizer, scheduler)
    resumed_diff = _first_difference(next_weights, _weights(model))
    results = {
        "backend": torch.distributed.get_backend(), "distributed_optimizer": distributed_optimizer,
        "optimizer_sharding": read_meta(find_checkpoint(run)).extra["train_state"].get("optimizer_sharding"),
        "iteration": state.iteration, "weights_bit_exact": loaded_diff is None,
        "optimizer_tensors": len(saved_optimizer), "optimizer_bit_exact": optimizer_diff is None, "rng_bit_exact": rng_equal,
        "next_step_loss": next_loss, "resumed_next_step_loss": resumed_loss,
        "next_step_weights_equal": resumed_diff is None,
    }
    del model, ddp, optimizer, scheduler
    _free()
    problems = [p for p, bad in (
        (f"weights differ after load (first: {loaded_diff})", loaded_diff is not None),
        (f"optimizer state differs after load (first: {optimizer_diff})", optimizer_diff is not None),
        ("RNG state differs after load", not rng_equal),
        (f"next-step loss {resumed_loss!r} != {next_loss!r}", resumed_loss != next_loss),
    ) if bad]  # next-step weights: reported only (a backward with atomics need not be bit-reproducible)
    if problems:
        raise CheckFailed("; ".join(problems), results)
    return results


# ----------------------------------------------------------------------------------------------
# train: ~1B model through the real train step
# ----------------------------------------------------------------------------------------------


def train_config(model: dict, pair_tokens: int, smoke: bool) -> LongPOConfig:
    """The run the ``train`` section measures (also the benchmark config to reproduce it)."""
    # The smoke run is fp32: Megatron's bf16 optimizer wrapper asserts CUDA tensors.
    return LongPOConfig(
        model=ModelConfig(**model, params_dtype="fp32" if smoke else "bf16",
                          transformer_impl="local" if smoke else "auto"),
        parallel=ParallelConfig(attention_backend="sdpa"),  # one model for both layouts
        data=DataConfig(max_seq_length=2 * pair_tokens),
        loss=LossConfig(mode="longpo"),
        optim=OptimConfig(lr=1e-6, use_distributed_optimizer=True),
        training=TrainingConfig(micro_batch_size=1, global_batch_size=1, train_iters=10,
                                recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    )


def _count_syncs(fn: Callable[[], Any]) -> tuple[Any, int, dict]:
    if torch.cuda.is_available():
        with cuda_sync_warnings() as sites:
            out = fn()
        return out, sum(sites.values()), dict(sites.most_common(8))
    with SyncCounter() as c:
        out = fn()
    return out, c.count, dict(c.sites.most_common(8))


def section_train(sizes: Sizes, smoke: bool) -> dict:
    cfg = train_config(sizes.train_model, max(sizes.train_tokens), smoke)
    groups = init_model_parallel(cfg.parallel)
    set_seed(0)
    [model] = _build_model(cfg)  # no PP here: one chunk
    [ddp] = _wrap_ddp([model], cfg)
    optimizer, scheduler = build_optimizer([ddp], cfg.optim, cfg.model, cfg.training.train_iters)
    n_params = sum(p.numel() for p in model.parameters())
    results: dict[str, Any] = {
        "model": dict(sizes.train_model), "parameters": n_params,
        "ddp": {"overlap_grad_reduce": ddp.ddp_config.overlap_grad_reduce,
                "use_distributed_optimizer": ddp.ddp_config.use_distributed_optimizer},
        "recompute": "full/uniform/1", "response_tokens": sizes.train_response, "runs": {}, "ratios": {},
    }
    mult = seq_length_multiple(cfg.parallel)
    for tokens in sizes.train_tokens:
        prefix = tokens - 2 * (sizes.train_response + 1)
        if _out_of_time():
            results.setdefault("skipped_runs", []).append(f"{tokens} tokens: time budget spent")
            continue
        for layout in ("two_sequences", "shared_prefix"):
            batch = synthetic_pair_batch(layout, 1, prefix, sizes.train_response, cfg.model.vocab_size, multiple=mult)
            micro = [batch]
            step = lambda: train_step(ddp, optimizer, micro, groups, cfg.loss, cfg.model.vocab_size, False)  # noqa: E731
            _free()
            _peak_reset()
            step()  # warm-up (allocator, kernels, torch.compile of the fused activations)
            _sync()
            res, n_sync, sites = _count_syncs(step)  # untimed: the sync debug mode adds work
            _sync()
            times = []
            for _ in range(sizes.train_steps):
                t0 = time.perf_counter()
                res = step()
                _sync()
                times.append(time.perf_counter() - t0)
            dt = min(times)
            n_logit = scored_positions(cfg.loss, batch.response_segment, batch.nll_segment)
            flops = train_flops(cfg.model, batch.num_tokens(), attended_pairs(batch.branch_ids), n_logit)
            # full recompute runs the forward a second time: hardware FLOPs are 4/3 of the model's
            tflops = flops / dt / 1e12
            gemm = _MEASURED["gemm_tflops"]
            est = estimate_memory(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pair_layout=layout)),
                                  1, seq_tokens=batch.seq_len)
            results["runs"][f"{layout}@{tokens}"] = {
                "pair_tokens": tokens, "rows": batch.tokens.shape[0], "seq_len": batch.seq_len,
                "tokens_processed": batch.num_tokens(), "step_seconds": dt, "pair_tokens_per_s": tokens / dt,
                "model_tflops": tflops, "hardware_tflops_with_recompute": tflops * 4 / 3,
                "mfu": tflops / PEAK_BF16_TFLOPS, "mfu_of_measured_gemm_peak": (tflops / gemm) if gemm else None,
                "peak_memory_gib": _peak_gib(),
                "estimated_memory_gib": est.total / 2**30,
                "host_syncs_per_step": n_sync, "sync_sites": sites, "loss": res.metrics.get("loss"),
            }
        a, b = results["runs"].get(f"shared_prefix@{tokens}"), results["runs"].get(f"two_sequences@{tokens}")
        if a is None or b is None:
            continue
        results["ratios"][str(tokens)] = {
            "time_shared_over_two": a["step_seconds"] / b["step_seconds"],
            "memory_shared_over_two": (a["peak_memory_gib"] / b["peak_memory_gib"]) if b["peak_memory_gib"] else None,
        }
    del ddp, model, optimizer, scheduler
    _free()
    bad = [k for k, r in results["runs"].items() if not math.isfinite(r["loss"] or float("nan"))]
    if bad:
        raise CheckFailed(f"non-finite loss in {bad}", results)
    return results


# ----------------------------------------------------------------------------------------------
# te: TE spec with project attention vs TE attention vs FP8
# ----------------------------------------------------------------------------------------------


def section_te(sizes: Sizes, smoke: bool) -> dict:
    if not capabilities.te_available():
        raise SkipSection("Transformer Engine does not import with CUDA here")
    variants = {
        "te_spec+project_attention": ParallelConfig(attention_backend="sdpa"),
        "te_spec+te_attention": ParallelConfig(attention_backend="te"),
        "te_spec+te_attention+fp8_delayed": ParallelConfig(attention_backend="te", fp8="hybrid", fp8_recipe="delayed"),
    }
    mcfg = _model_cfg(sizes.te_model, params_dtype="bf16", transformer_impl="transformer_engine")
    loss_cfg = LossConfig(mode="longpo")
    results: dict[str, Any] = {"model": dict(sizes.te_model), "tokens": sizes.te_tokens, "variants": {}}
    state = None
    base_loss = None
    failures: list[str] = []
    for name, parallel in variants.items():
        if _out_of_time():
            results.setdefault("skipped_runs", []).append(f"{name}: time budget spent")
            continue
        init_model_parallel(parallel)
        set_seed(0)
        model = build_model(mcfg, parallel, pair_layout="two_sequences")
        if state is None:
            state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        else:
            model.load_state_dict(state, strict=False)
        mult = seq_length_multiple(parallel)
        batch = synthetic_pair_batch("two_sequences", 1, sizes.te_tokens - 2 * 65, 64, mcfg.vocab_size, multiple=mult)
        fwd = lambda: microbatch_forward(model, batch, current_groups(), loss_cfg, mcfg.vocab_size, False)  # noqa: E731
        loss, _ = fwd()
        loss.backward()
        _sync()
        t0 = time.perf_counter()
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            loss, _ = fwd()
            loss.backward()
        _sync()
        dt = (time.perf_counter() - t0) / 3
        base_loss = float(loss) if base_loss is None else base_loss
        rel = abs(float(loss) - base_loss) / max(abs(base_loss), 1e-30)
        tol = TE_FP8_LOSS_REL if parallel.fp8 else TE_BF16_LOSS_REL
        results["variants"][name] = {"loss": float(loss), "loss_diff_vs_first": float(loss) - base_loss,
                                     "loss_rel_diff": rel, "tolerance": tol,
                                     "fwd_bwd_seconds": dt, "tokens_per_s": batch.num_tokens() / dt}
        if rel > tol:
            failures.append(f"{name}: loss differs by {rel:.3g} relative from te_spec+project_attention (tol {tol})")
        del model
        _free()
    if failures:
        raise CheckFailed("; ".join(failures), results)
    return results


# ----------------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------------


class SkipSection(Exception):
    """The section cannot run here (reason in the message); recorded as skipped."""


def run_sections(names, sizes: Sizes, smoke: bool, budget_s: float, workdir: Path,
                 log: Callable[[str], None] = print, funcs: Optional[dict[str, Callable[[], dict]]] = None,
                 after_each: Callable[[dict], None] = lambda sections: None) -> dict:
    """Run each named section isolated; ``funcs`` overrides the section functions (tests).

    No section starts after ``budget_s``; the long ones (train, te) also stop starting new runs.
    ``after_each(sections so far)`` runs after every section (main writes the report there).
    """
    start = time.time()
    _DEADLINE[0] = start + budget_s
    funcs = funcs or {
        "environment": lambda: section_environment(sizes, smoke),
        "attention": lambda: section_attention(sizes, smoke),
        "loss": lambda: section_loss(sizes, smoke, workdir),
        "checkpoint": lambda: section_checkpoint(sizes, smoke, workdir),
        "train": lambda: section_train(sizes, smoke),
        "te": lambda: section_te(sizes, smoke),
    }
    out: dict[str, dict] = {}
    for name in names:
        elapsed = time.time() - start
        if elapsed > budget_s:
            out[name] = {"status": "skipped", "reason": f"time budget of {budget_s:.0f}s spent ({elapsed:.0f}s)"}
            after_each(out)
            continue
        log(f"[gpu_check] {name} ...")
        t0 = time.time()
        try:
            res = {"status": "ok", "result": funcs[name]()}
        except SkipSection as e:
            res = {"status": "skipped", "reason": str(e)}
        except CheckFailed as e:
            res = {"status": "failed", "error": str(e.args[0]), "result": e.args[1] if len(e.args) > 1 else None}
        except Exception as e:  # noqa: BLE001 - one section's crash must not hide the others
            res = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        res["seconds"] = time.time() - t0
        out[name] = res
        log(f"[gpu_check] {name}: {res['status']} ({res['seconds']:.1f}s)")
        _free()
        after_each(out)
    return out


def not_run(caps: capabilities.Capabilities, world_size: int, sections: dict) -> list[str]:
    """The production pieces this run could not exercise."""
    missing = []
    if not caps.cuda:
        missing.append("CUDA: every GPU kernel, NCCL, the distributed optimizer (CPU runs the plain optimizer)")
    if not caps.te:
        missing.append("Transformer Engine: TE layer spec, TE attention (its CP), the cudnn block kernel, FP8, "
                       "TE fused Adam, gradient-accumulation fusion")
    if not caps.flash_attn:
        missing.append("flash-attn 2: the flash block kernel")
    if not caps.fa3:
        missing.append("FlashAttention-3: the fa3 block kernel")
    if not caps.grad_accum_fusion:
        missing.append("apex: fused_weight_gradient_mlp_cuda (the output layer's wgrad fusion)")
    if world_size < 2:
        missing.append("more than one GPU: TP / CP / DP collectives over NCCL (tests/gpu multi-GPU cases)")
    missing += [f"section {n}: {s['status']} ({s.get('reason') or s.get('error', '')[:200]})"
                for n, s in sections.items() if s["status"] not in ("ok",)]
    return missing


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary(report: dict) -> str:
    """Readable summary of a report."""
    lines = [f"GPU check ({'smoke, CPU toy sizes' if report['smoke'] else 'full'}) on {report['device']}: "
             f"{report['seconds']:.0f}s"]
    for name, sec in report["sections"].items():
        lines.append(f"== {name}: {sec['status']}" + (f" ({sec['seconds']:.1f}s)" if "seconds" in sec else ""))
        if sec.get("reason"):
            lines.append(f"   {sec['reason']}")
        if sec.get("error"):
            lines.append(f"   {sec['error'][:600]}")
        r = sec.get("result") or {}
        if name == "environment":
            lines.append("   " + ", ".join(f"{k}={_fmt(r.get(k))}" for k in ("python", "torch", "torch_cuda",
                                                                           "megatron_core", "gpu", "capability")))
            lines.append("   imports: " + ", ".join(f"{k}={'yes' if r.get(k, {}).get('imports') else 'no'}"
                                                     for k in ("transformer_engine", "flash_attn", "flash_attn_interface",
                                                               "apex")))
            if r.get("gemm_peak"):
                gp = r["gemm_peak"]
                lines.append(f"   GEMM {gp['n']}^3 {gp['dtype']}: {_fmt(gp['tflops'])} TFLOP/s measured "
                             f"({_fmt(gp['fraction_of_datasheet'])} of the {PEAK_BF16_TFLOPS:.0f} datasheet)")
        elif name == "attention":
            for cp, v in (r.get("cp") or {}).items():
                lines.append(f"   cp={cp}: max|out-out64|={_fmt(v['max_abs_err'])} grad rel err "
                             + " ".join(f"{k}={_fmt(x)}" for k, x in v["grad_rel_err"].items()))
            if "fp32_gqa_long" in r:
                f = r["fp32_gqa_long"]
                lines.append(f"   fp32 GQA S={f['seq']}: {_fmt(f['seconds'])}s, ops {f['sdpa_ops']}, peak above inputs "
                             f"{_fmt(f['peak_gib_above_inputs'])} GiB (dense scores would be {_fmt(f['dense_scores_would_be_gib'])} GiB)")
            lines.append(f"   kernel choices: {r.get('kernel_choices')}")
            for kernel, v in (r.get("kernels") or {}).items():
                if "skipped" in v:
                    lines.append(f"   kernel {kernel}: not run ({v['skipped']})")
                else:
                    lines.append(f"   kernel {kernel}: err/tol {_fmt(v['max_err_over_tol'])}, grad rel "
                                 f"{_fmt(v['grad_rel_err_max'])}; " + ", ".join(
                                     f"{t} tokens {_fmt(x['tflops'])} TFLOP/s" for t, x in v["tflops"].items()))
        elif name == "checkpoint":
            if r:
                lines.append(f"   {r['backend']}, distributed optimizer {r['distributed_optimizer']} "
                             f"({r['optimizer_sharding']}): weights bit-exact {r['weights_bit_exact']}, optimizer "
                             f"({r['optimizer_tensors']} tensors) {r['optimizer_bit_exact']}, RNG "
                             f"{r['rng_bit_exact']}, next-step loss {_fmt(r['next_step_loss'])} vs resumed "
                             f"{_fmt(r['resumed_next_step_loss'])}, next-step weights equal {r['next_step_weights_equal']}")
        elif name == "loss":
            for lay, v in (r.get("layouts") or {}).items():
                lines.append(f"   {lay}: loss {_fmt(v['loss'])} vs float64 {_fmt(v['loss_float64'])} (rel {_fmt(v['loss_rel_err'])}); "
                             f"grads: worst rel err {_fmt(v['grad_rel_err_max'])} ({v['grad_rel_err_worst_param']}), "
                             f"median {_fmt(v['grad_rel_err_median'])} over {v['grad_tensors']} tensors")
        elif name == "train":
            if r:
                lines.append(f"   {r['parameters'] / 1e9:.3f}B params, ddp {r['ddp']}, recompute {r['recompute']}")
            for k, v in (r.get("runs") or {}).items():
                lines.append(f"   {k}: {_fmt(v['pair_tokens_per_s'])} pair tok/s, {_fmt(v['model_tflops'])} TFLOP/s, "
                             f"MFU {_fmt(v['mfu'])} (of measured GEMM peak {_fmt(v.get('mfu_of_measured_gemm_peak'))}), "
                             f"peak {_fmt(v['peak_memory_gib'])} GiB "
                             f"(estimate {_fmt(v['estimated_memory_gib'])}), "
                             f"host syncs/step {v['host_syncs_per_step']}, step {_fmt(v['step_seconds'])}s")
            for k, v in (r.get("ratios") or {}).items():
                lines.append(f"   {k} tokens: shared_prefix/two_sequences time {_fmt(v['time_shared_over_two'])}, "
                             f"memory {_fmt(v['memory_shared_over_two'])}")
        elif name == "te":
            for k, v in (r.get("variants") or {}).items():
                lines.append(f"   {k}: loss {_fmt(v['loss'])} (rel diff {_fmt(v.get('loss_rel_diff'))}, tol "
                             f"{_fmt(v.get('tolerance'))}), {_fmt(v['tokens_per_s'])} tok/s fwd+bwd")
    if report.get("not_run"):
        lines.append("== not run here (production pieces this machine could not exercise):")
        lines += [f"   - {x}" for x in report["not_run"]]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="One-shot GPU check of the megatron_longpo GPU path (docs/scaling.md).")
    ap.add_argument("--smoke", action="store_true", help="every section at toy size on the CPU (CI)")
    ap.add_argument("--out", default="gpu_check.json", help="JSON report path (written atomically)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="no section or long run starts after this many seconds (the whole check stays under 8 minutes)")
    ap.add_argument("--reference", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reference:
        reference_main(*args.reference)
        return 0
    names = [s for s in args.sections.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # toy sizes on the CPU, also on a GPU machine
        if torch.cuda.is_available():
            ap.error("--smoke must start without CUDA initialised; run it as its own process")
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: the full check needs a GPU (use --smoke for the CPU toy run)")
    sizes = SMOKE if args.smoke else FULL
    init_distributed(ParallelConfig())  # world size 1: nccl on the GPU, gloo for --smoke
    t0 = time.time()
    caps = capabilities.Capabilities.detect()

    def report_of(sections: dict) -> dict:
        return {
            "smoke": args.smoke, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "seconds": time.time() - t0, "complete": list(sections) == names, "sections": sections,
            "not_run": not_run(caps, torch.distributed.get_world_size(), sections), "tolerances": {
                "attention_atol": ATTN_ATOL, "attention_rtol": ATTN_RTOL, "attention_grad_rel": ATTN_GRAD_REL,
                "loss_rel": LOSS_REL, "grad_rel": GRAD_REL, "te_bf16_loss_rel": TE_BF16_LOSS_REL,
                "te_fp8_loss_rel": TE_FP8_LOSS_REL},
            "peak_bf16_tflops": PEAK_BF16_TFLOPS,
        }

    def write(sections: dict) -> None:  # after every section: a timeout keeps what ran
        write_text_atomic(args.out, json.dumps(report_of(sections), indent=2, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        sections = run_sections(names, sizes, args.smoke, args.budget_s, Path(tmp), after_each=write)
    report = report_of(sections)
    write(sections)
    print(summary(report), flush=True)
    print(f"[gpu_check] report: {args.out}", flush=True)
    return 0 if all(s["status"] in ("ok", "skipped") for s in sections.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
