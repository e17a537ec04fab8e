"""TP=2 vs TP=1 on the real Megatron GPTModel: logits, per-token loss, every gradient."""

import pytest
import torch

from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config, random_tokens, tiny_model_config

pytestmark = pytest.mark.distributed


def _run(arch, tp, full_sd, seq, seed, sp=False):
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.models.sharding import gather_full_state_dict, load_full_state_dict
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed

    mcfg = tiny_model_config(arch)
    pcfg = parallel_config(tp=tp, sequence_parallel=sp)
    g = init_model_parallel(pcfg)
    set_seed(seed)
    model = build_model(mcfg, pcfg)
    if full_sd is not None:
        load_full_state_dict(model, full_sd, g.tp_rank, g.tp_size)
    tokens = random_tokens(2, seq, mcfg.vocab_size, seed=seed)
    labels = random_tokens(2, seq, mcfg.vocab_size, seed=seed + 1)
    pos = torch.arange(seq).unsqueeze(0).expand(2, -1)
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    # The training path: Megatron DDP + finalize_model_grads (sums SP norm grads over TP).
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=model,
    )
    ddp.zero_grad_buffer()
    # Megatron's own vocab-parallel CE (over the padded vocabulary).
    with torch.no_grad():
        mcore_loss = model(tokens, pos, None, labels=labels)  # [b, s]
    # Per-token loss over the TRUE vocabulary: padded rows differ between TP sizes.
    logits = gather_from_tensor_model_parallel_region(model(tokens, pos, None))[..., : mcfg.vocab_size]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    loss.sum().backward()
    finalize_model_grads([ddp])
    logits = logits.detach()
    with torch.no_grad():
        hidden = model(tokens, pos, None, return_hidden=True)  # [s(/tp), b, h]
        if sp:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        w = model.output_weight()
        from_hidden = torch.einsum("sbh,vh->bsv", hidden, w)
        from_hidden = gather_from_tensor_model_parallel_region(from_hidden)[..., : mcfg.vocab_size]
    return dict(
        loss=loss.detach(),
        mcore_loss=mcore_loss,
        padded_vocab=model.vocab_size,
        logits=logits,
        from_hidden=from_hidden,
        params=gather_full_state_dict(model, g.tp_group, mcfg.vocab_size),
        grads=gather_full_state_dict(model, g.tp_group, mcfg.vocab_size, grads=True),
    )


def _full_sd(arch):
    """TP=1 weights (vocab rows beyond vocab_size dropped) as the shared reference."""
    return run_distributed(_run, 1, args=(arch, 1, None, 8, 0))[0]["params"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("sp", [False, True])
def test_tp2_matches_tp1(arch, sp):
    full = _full_sd(arch)
    seq = 24
    ref = run_distributed(_run, 1, args=(arch, 1, full, seq, 3))[0]
    outs = run_distributed(_run, 2, args=(arch, 2, full, seq, 3, sp))
    for out in outs:
        torch.testing.assert_close(out["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-5, atol=1e-5)
        if out["padded_vocab"] == ref["padded_vocab"]:  # Megatron's CE includes padded rows
            torch.testing.assert_close(out["mcore_loss"], ref["mcore_loss"], rtol=1e-5, atol=1e-5)
        assert set(out["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            assert g.abs().sum() > 0, f"reference gradient of {name} is zero: test would be vacuous"
            torch.testing.assert_close(out["grads"][name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hidden_forward_reproduces_logits(arch):
    full = _full_sd(arch)
    for out in run_distributed(_run, 2, args=(arch, 2, full, 16, 5)):
        torch.testing.assert_close(out["from_hidden"], out["logits"], rtol=1e-5, atol=1e-5)
