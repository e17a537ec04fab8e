"""Tiny-model smoke run: TP=2 GPTModel forward + backward on CPU (gloo).

    torchrun --nproc-per-node 2 examples/model_smoke.py
"""

import torch

from megatron_longpo.config import DataConfig, LongPOConfig, validate
from megatron_longpo.models.provider import build_model
from megatron_longpo.runtime.distributed import destroy, init_distributed, init_model_parallel, set_seed
from megatron_longpo.testing.models import parallel_config, tiny_model_config


def main() -> None:
    cfg = LongPOConfig(model=tiny_model_config("llama"), parallel=parallel_config(tp=2), data=DataConfig(max_seq_length=256))
    init_distributed(cfg.parallel)
    validate(cfg, torch.distributed.get_world_size())
    g = init_model_parallel(cfg.parallel)
    set_seed(cfg.training.seed)
    model = build_model(cfg.model, cfg.parallel)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 64))
    pos = torch.arange(64).unsqueeze(0)
    loss = model(tokens, pos, None, labels=tokens.roll(-1, 1)).mean()
    loss.backward()
    if torch.distributed.get_rank() == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"[smoke] tp={g.tp_size} params/rank={n} loss={loss.item():.4f} (ln V = {torch.log(torch.tensor(float(cfg.model.vocab_size))):.4f})")
    destroy()


if __name__ == "__main__":
    main()
