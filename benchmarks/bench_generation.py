#!/usr/bin/env python
"""Throughput of the generation pipeline with the hf backend on CPU, and its overhead.

Builds a small random Llama (transformers, from a config) with the tiny BPE tokenizer and
synthetic multi-paragraph documents, runs the whole pipeline (chunking, prompts through the chat
template, generation, filters, journal with fsync, merge) once, and prints side by side:
documents/s, generated tokens/s, the time inside ``model.generate`` and the share of wall time
spent outside the model (target: < 10%).

    python benchmarks/bench_generation.py [--docs 8 --hidden 256 --layers 4 --max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_longpo.generation.backends import ChatFormatter, HFBackend
from megatron_longpo.generation.documents import iter_documents
from megatron_longpo.generation.driver import ShardSpec, merge_shards, run_shard
from megatron_longpo.generation.filters import FilterConfig
from megatron_longpo.generation.pipeline import GenerationConfig, Pipeline
from megatron_longpo.generation.prompts import load_prompts
from megatron_longpo.generation.questions import load_question_pool
from megatron_longpo.testing.generation import build_tiny_chat_model, write_documents_jsonl


def build_model(out: Path, hidden: int, layers: int) -> Path:
    """The tiny chat model's tokenizer with a bigger random Llama (so the model does real work)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tiny_chat_model(out)
    cfg = LlamaConfig(vocab_size=250, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=65536, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--paragraphs", type=int, default=12, help="paragraphs per document")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-turns", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_gen_"))
    model = build_model(work / "model", args.hidden, args.layers)
    docs_path = write_documents_jsonl(work / "docs.jsonl", args.docs, paragraphs=(args.paragraphs, args.paragraphs),
                                      words=(10, 20), seed=0)
    pool = work / "questions.jsonl"
    pool.write_text('{"question": "What is the code of the harbor?"}\n{"question": "Which section mentions the bridge?"}\n')
    fmt = ChatFormatter(model)
    backend = HFBackend(model, fmt)
    backend.model(False)  # load outside the timed run
    cfg = GenerationConfig(seed=0, max_turns=args.max_turns, chunk_min_tokens=300, chunk_max_tokens=800,
                           max_new_tokens=args.max_new_tokens,
                           filters=FilterConfig(max_repeat_ratio_chosen=1.0, max_repeat_ratio_rejected=1.0,
                                                min_content_words=0))
    pipeline = Pipeline(cfg, load_prompts(), fmt, backend, load_question_pool(pool))
    docs = list(iter_documents([docs_path]))
    out = work / "out.jsonl"

    t0 = time.perf_counter()
    shard = run_shard(docs, pipeline, out, ShardSpec(), {"bench": True}, batch_documents=4, progress=False)
    summary = merge_shards(out, 1)
    wall = time.perf_counter() - t0
    model_s = backend.model_seconds
    gen = summary["tokens"]["generated"]
    doc_tokens = summary["tokens"]["documents"]
    print(f"hf backend on CPU ({torch.get_num_threads()} threads), random Llama hidden {args.hidden} x {args.layers} layers; "
          f"{len(docs)} documents, {doc_tokens / len(docs):.0f} tokens each, {summary['turns']['written']} turns, "
          f"{args.max_new_tokens} new tokens per answer")
    print(f"{'':28s}{'pipeline (wall)':>18s}{'model.generate only':>22s}")
    print(f"{'seconds':28s}{wall:18.2f}{model_s:22.2f}")
    print(f"{'documents/s':28s}{len(docs) / wall:18.3f}{len(docs) / model_s:22.3f}")
    print(f"{'generated tokens/s':28s}{gen / wall:18.1f}{gen / model_s:22.1f}")
    print(f"{'prompt tokens/s':28s}{summary['tokens']['prompts'] / wall:18.1f}{summary['tokens']['prompts'] / model_s:22.1f}")
    share = 1.0 - model_s / wall
    print(f"time outside the model: {share:.1%} of wall (target < 10%): {'OK' if share < 0.10 else 'ABOVE TARGET'}; "
          f"{(wall - model_s) / len(docs) * 1000:.1f} ms per document")
    print(json.dumps({"documents_per_s": len(docs) / wall, "generated_tokens_per_s": gen / wall,
                      "overhead_share": share, "shard": shard.get("shard")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
