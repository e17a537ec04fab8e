"""Command line of tools/generate_longpo_data.py, importable without torch or transformers
(``--help`` and option errors answer at once; the run itself is cli.py, loaded after parsing)."""

from __future__ import annotations

import argparse
import os

from megatron_longpo.data.templates import TEMPLATE_CHOICES

USAGE = """\
Self-evolution data generation: long documents -> LongPO multi-turn records (docs/generation.md).

  python tools/generate_longpo_data.py --input docs/*.jsonl --output data/gen.jsonl --model HF_OR_CKPT \\
      [--backend hf|vllm|openai] [--seed 0] [--max-turns 2] [--long-rope-theta 1e7]

Sharded (one process per shard, e.g. a Slurm array; then one merge):
  ... --num-shards 8 --shard-index $I        (or SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)
  python tools/generate_longpo_data.py --output data/gen.jsonl --merge
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = ap.add_argument_group("inputs and outputs")
    io.add_argument("--input", nargs="+", metavar="PATH", help="plain text files (one document each), JSONL with a text field, or parquet")
    io.add_argument("--output", required=True, metavar="PATH", help="final merged JSONL of LongPO records")
    io.add_argument("--text-field", default="text", help="JSONL / parquet field holding the document (default: text)")
    io.add_argument("--id-field", default="id", help="JSONL / parquet field holding the document id (default: id; else FILE:LINE)")
    io.add_argument("--merge", action="store_true", help="combine the finished shards of --output into --output and stop")
    io.add_argument("--num-shards", type=int, default=None, help="split the documents over N processes (document i -> shard i %% N)")
    io.add_argument("--shard-index", type=int, default=None, help="the shard this process writes (0-based)")
    io.add_argument("--no-progress", action="store_true", help="no progress bars")

    m = ap.add_argument_group("model and backend")
    m.add_argument("--model", metavar="DIR", help="HF model directory, or a megatron_longpo checkpoint (exported on the fly)")
    m.add_argument("--backend", choices=["hf", "vllm", "openai"], default="hf")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--long-rope-theta", type=float, default=None,
                   help="RoPE base for the long-context (rejected) generation, e.g. 1e7 (default: the model's)")
    m.add_argument("--chat-template", choices=TEMPLATE_CHOICES, default="auto",
                   help="prompt format, the same choice (and rendering code) as tools/preprocess_data.py and "
                   "tools/evaluate.py: auto = the tokenizer's own template if it has one, else mistral; recorded in "
                   "every record, and preprocessing refuses another one")
    m.add_argument("--work-dir", default=None, help="where a Megatron checkpoint is exported (default: system temp)")
    m.add_argument("--batch-documents", type=int, default=16, help="documents per backend batch (vllm/openai: larger is faster)")
    m.add_argument("--device", default=None, help="hf backend: torch device (default: cuda if available, else cpu)")
    m.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per engine")
    m.add_argument("--max-model-len", type=int, default=None, help="vllm/openai: context length of the engine / server; longer prompt + --max-new-tokens are dropped "
                   "(vllm default: the model's max_position_embeddings)")
    m.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: share of GPU memory for weights + KV cache")
    m.add_argument("--dtype", default="bfloat16", help="vllm: weight/activation dtype")
    m.add_argument("--enforce-eager", action="store_true", help="vllm: no CUDA graphs (less memory, slower)")
    m.add_argument("--openai-base-url", default=os.environ.get("OPENAI_BASE_URL"), help="openai: e.g. http://host:8000/v1 (env OPENAI_BASE_URL)")
    m.add_argument("--openai-model", default=os.environ.get("OPENAI_MODEL"), help="openai: served model name (env OPENAI_MODEL)")
    m.add_argument("--long-base-url", default=None, metavar="URL",
                   help="openai: a second server for the long-context (rejected) answers, started with the enlarged "
                   "RoPE base; required with --long-rope-theta (one server runs one base)")
    m.add_argument("--openai-api", choices=["completions", "chat"], default="completions",
                   help="openai: completions sends the prompt token ids rendered here (same prompts as hf/vllm); chat sends messages")
    m.add_argument("--openai-concurrency", type=int, default=8, help="openai: requests in flight")
    m.add_argument("--openai-max-retries", type=int, default=5, help="openai: retries per request (backoff doubles from 1 s)")
    m.add_argument("--openai-timeout", type=float, default=600.0, help="openai: seconds per request")

    g = ap.add_argument_group("pipeline")
    g.add_argument("--max-turns", type=int, default=2, help="turns (chunks) per document record (default 2)")
    g.add_argument("--chunk-min-tokens", type=int, default=16384)
    g.add_argument("--chunk-max-tokens", type=int, default=30000)
    g.add_argument("--min-document-tokens", type=int, default=None, help="shorter documents dropped (default: --chunk-min-tokens)")
    g.add_argument("--max-document-tokens", type=int, default=None, help="longer documents dropped (e.g. the target length minus answers)")
    g.add_argument("--max-question-prompt-tokens", type=int, default=32768, help="question prompts longer than this are dropped")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="per question list / answer")
    g.add_argument("--questions", metavar="PATH", default=None,
                   help='JSONL pool {"question": T} / {"document_id": ID, "question": T[, "chunk_index": K]} used instead of model-written questions')
    g.add_argument("--no-question-prefix", action="store_true", help="do not put a prefix phrase before the question")
    g.add_argument("--prompts", metavar="PATH", default=None, help="prompts / prefixes / refusal phrases YAML (default: the bundled prompts.yaml)")
    g.add_argument("--min-content-words", type=int, default=2, help="answers need this many words of 3+ letters")
    g.add_argument("--max-repeat-ratio-chosen", type=float, default=0.9, help="drop chosen answers whose repeated-word ratio is above")
    g.add_argument("--max-repeat-ratio-rejected", type=float, default=0.95, help="drop rejected answers whose repeated-word ratio is above")
    return ap
