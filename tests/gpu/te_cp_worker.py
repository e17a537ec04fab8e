"""torchrun worker for test_te_cp_gpu: TE context parallelism vs the project CP attention.

    torchrun --nproc-per-node 2 tests/gpu/te_cp_worker.py CP_COMM_TYPE

Same weights (TE layer spec), CP=2, one two_sequences micro-batch: the LongPO loss and the
CP-summed parameter gradients of TE attention (cp_comm_type) must match the project attention.
Exits non-zero with the differences on a mismatch.
"""

import sys

import torch
import torch.distributed as dist


def main(comm: str) -> int:
    from megatron_longpo.config import LossConfig
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import destroy, init_distributed, init_model_parallel, set_seed
    from megatron_longpo.testing.models import parallel_config, tiny_model_config
    from megatron_longpo.testing.pairs import synthetic_pair_batch
    from megatron_longpo.training.step import microbatch_forward

    # heads 8, groups 2: a2a needs both divisible by cp=2
    mcfg = tiny_model_config("mistral", transformer_impl="transformer_engine", params_dtype="bf16")
    out = {}
    state = None
    for backend in ("sdpa", "te"):
        pc = parallel_config(cp=2, attention_backend=backend, cp_comm_type=comm)
        init_distributed(pc)
        groups = init_model_parallel(pc)
        set_seed(0)
        model = build_model(mcfg, pc, pair_layout="two_sequences")
        if state is None:
            state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        else:
            model.load_state_dict(state, strict=False)
        batch = synthetic_pair_batch("two_sequences", 2, 500, 40, mcfg.vocab_size, multiple=64)
        loss, _ = microbatch_forward(model, batch, groups, LossConfig(mode="longpo"), mcfg.vocab_size, False)
        loss.backward()
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad.detach().float().clone()
            dist.all_reduce(g, group=groups.cp_group)
            grads[n] = g
        out[backend] = (float(loss), grads)
        del model
    (l1, g1), (l2, g2) = out["sdpa"], out["te"]
    bad = []
    if abs(l1 - l2) > 1e-2 * abs(l1):
        bad.append(f"loss {l1} (project) vs {l2} (TE {comm})")
    for n in g1:
        err = ((g1[n] - g2[n]).norm() / g1[n].norm().clamp_min(1e-12)).item()
        if err > 5e-2:  # both bf16; different kernels and summation orders
            bad.append(f"{n}: relative gradient difference {err:.3g}")
    if dist.get_rank() == 0:
        print(f"[te_cp_worker] {comm}: loss {l1} vs {l2}; {len(bad)} mismatches", flush=True)
        for b in bad:
            print("  " + b, flush=True)
    destroy()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
