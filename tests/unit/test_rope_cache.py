"""RoPE tables: bounded per-model cache, identical values to Megatron's, none built when unused."""

import torch

from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config, tiny_model_config


def _run(backend_core: bool):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_longpo.models.provider import build_model
    from megatron_longpo.models.rope import ROPE_CACHE_ENTRIES
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed

    init_model_parallel(parallel_config())
    set_seed(0)
    mcfg = tiny_model_config("llama")
    # core_attention=None keeps Megatron's table path (as TE attention does); the default is the
    # project attention, whose angles come from position ids.
    kw = {"core_attention": _local_attention()} if backend_core else {}
    model = build_model(mcfg, parallel_config(), **kw)
    table = model.rotary_pos_emb.forward
    sizes = []
    for seq in (16, 24, 32, 40, 48, 16):
        tokens = torch.randint(0, mcfg.vocab_size, (1, seq))
        model(tokens, torch.arange(seq).unsqueeze(0), None, return_hidden=True)
        sizes.append(len(table.cache))
    # Same values as Megatron's own (undecorated) table
    ref = RotaryEmbedding.forward.__wrapped__(model.rotary_pos_emb, 40)
    same = torch.equal(table(40), ref)
    return sizes, ROPE_CACHE_ENTRIES, same


def _local_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def test_table_cache_is_bounded_and_exact():
    ((sizes, entries, same),) = run_distributed(_run, 1, args=(True,), timeout=120)
    assert max(sizes) == entries == 2 and sizes[-1] == 2
    assert same


def test_project_attention_builds_no_table():
    ((sizes, _, _),) = run_distributed(_run, 1, args=(False,), timeout=120)
    assert sizes == [0] * 6
