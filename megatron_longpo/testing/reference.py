"""Small fixtures for the reference-cache tests and benchmark: synthetic LongPO data, a tiny
reference checkpoint made the way users make one (random HF model -> tools' converter), and an
independent float64 HF forward to check cached values against.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_longpo.architectures import ARCHITECTURES
from megatron_longpo.convert.hf_to_megatron import convert_hf_to_megatron
from megatron_longpo.testing.convert import hf_config, randomize_
from megatron_longpo.data.indexed import PreferenceDataset
from megatron_longpo.data.preprocess import PreprocessOptions, preprocess
from megatron_longpo.data.synthetic import random_text

SAMPLE_TOKENIZER = Path(__file__).resolve().parents[2] / "examples" / "data" / "tokenizer.model"
TOKENIZER_VOCAB = 768  # of the bundled sample tokenizer


def synthetic_records(n: int, seed: int = 0, short_words: tuple[int, int] = (6, 20), ratio: int = 8,
                      two_turn_every: int = 3) -> list[dict]:
    """``n`` LongPO records; short contexts of ``short_words`` words, documents ~``ratio`` x longer.
    Every ``two_turn_every``-th record has a second turn."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        turns = []
        for t in range(2 if two_turn_every and i % two_turn_every == 0 else 1):
            k = r.randint(*short_words)
            turns.append({
                "short_context": random_text(k, seed=seed * 1000 + 10 * i + t),
                "instruction": f"As described in the preceding text, what about item {i}.{t}?",
                "chosen": random_text(r.randint(3, 10), seed=seed * 1000 + 500 + 10 * i + t),
                "rejected": random_text(r.randint(3, 10), seed=seed * 1000 + 800 + 10 * i + t),
            })
        doc_words = ratio * sum(len(tt["short_context"].split()) for tt in turns)
        out.append({"id": f"rec-{seed}-{i:04d}", "document": random_text(doc_words, seed=seed * 1000 + 900 + i),
                    "turns": turns})
    return out


def make_dataset(prefix: str | Path, records: Sequence[dict], max_seq_length: int = 8192) -> str:
    """Preprocess ``records`` with the bundled tokenizer into ``prefix``; returns the prefix."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    src = prefix.parent / f"{prefix.name}.records.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    preprocess(PreprocessOptions(inputs=[str(src)], tokenizer=str(SAMPLE_TOKENIZER), output_prefix=str(prefix),
                                 max_seq_length=max_seq_length, progress=False, overwrite=True), log=lambda *_: None)
    return str(prefix)


def make_hf_model(out: str | Path, seed: int = 0, vocab_size: int = TOKENIZER_VOCAB, family: str = "mistral",
                  **overrides) -> Path:
    """A tiny random model of ``family`` (default Mistral: 8 heads, 2 KV groups, rope_theta 1e6;
    testing/convert.TINY_HF) with the sample tokenizer's vocabulary, saved with transformers, and
    that tokenizer next to it (a checkpoint converted without one is refused by training and precompute)."""
    cfg = hf_config(family, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHITECTURES[family].hf_class)(cfg)
    randomize_(model, seed)
    model.save_pretrained(str(out))
    shutil.copy(SAMPLE_TOKENIZER, Path(out) / "tokenizer.model")
    return Path(out)


def make_reference_checkpoint(workdir: str | Path, seed: int = 0, family: str = "mistral",
                              **overrides) -> tuple[Path, Path]:
    """(HF dir, Megatron checkpoint run dir) of the same tiny random model (fp32). Single process:
    run it where torch.distributed is not initialised or has world size 1."""
    workdir = Path(workdir)
    tag = f"{seed}" if family == "mistral" else f"{family}-{seed}"
    hf = make_hf_model(workdir / f"hf-{tag}", seed=seed, family=family, **overrides)
    ckpt = workdir / f"ckpt-{tag}"
    convert_hf_to_megatron(hf, ckpt, dtype="fp32", progress=False)
    return hf, ckpt


@torch.no_grad()
def hf_float64_sums(hf_dir: str | Path, sequences: Sequence[tuple[np.ndarray, np.ndarray]],
                    rope_theta: Optional[float] = None) -> np.ndarray:
    """Independent reference: sum over response targets of float64 log_softmax of the HF model's
    full logits, one sequence at a time (no padding, no batching)."""
    cfg = AutoConfig.from_pretrained(str(hf_dir))
    if rope_theta is not None:
        if getattr(cfg, "rope_parameters", None) is not None:
            cfg.rope_parameters["rope_theta"] = rope_theta
        else:
            cfg.rope_theta = rope_theta
    # eager experts: transformers' default grouped-GEMM MoE path has no float64 kernel
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), config=cfg, dtype=torch.float64,
                                                 attn_implementation="eager", experts_implementation="eager").eval()
    out = []
    for tokens, mask in sequences:
        t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
        logp = torch.log_softmax(model(input_ids=t, use_cache=False).logits[0].double(), dim=-1)  # [L, V]
        tgt = t[0, 1:]
        resp = torch.as_tensor(np.asarray(mask[1:], dtype=bool))
        out.append(float(logp[:-1].gather(1, tgt[:, None]).squeeze(1)[resp].sum()))
    return np.array(out, dtype=np.float64)


@torch.no_grad()
def hf_expert_counts(hf_dir: str | Path, sequences: Sequence[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """[layers, experts] tokens HF's own router sends to each expert over ``sequences`` (each
    alone): shows that a mixture-of-experts test's records exercise every expert."""
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager",
                                                 experts_implementation="eager").eval()
    k = model.config.num_experts_per_tok
    total = None
    for tokens, _ in sequences:
        t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
        out = model(input_ids=t, use_cache=False, output_router_logits=True)
        counts = torch.stack([torch.bincount(r.topk(k, -1).indices.reshape(-1), minlength=r.shape[-1])
                              for r in out.router_logits])
        total = counts if total is None else total + counts
    return total


def reference_items(prefix: str):
    """(dataset, index into turns.reshape(-1), [(tokens, mask)]) over every present (sample, turn,
    side) of a preprocessed dataset: what a reference cache holds, in its order (arrays copied)."""
    ds = PreferenceDataset(prefix)
    T = int(ds.num_turns.max())
    flat, seqs = [], []
    for i in range(len(ds)):
        for t, ref in enumerate(ds[i].references):
            flat += [(i * T + t) * 2, (i * T + t) * 2 + 1]
            seqs += [(np.array(ref.chosen), np.array(ref.chosen_mask)), (np.array(ref.rejected), np.array(ref.rejected_mask))]
    return ds, np.array(flat), seqs
