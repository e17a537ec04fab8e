"""Command line of tools/generate_longpo_data.py (see docs/generation.md)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

from megatron_longpo.config import ConfigError
from megatron_longpo.generation import backends as B
from megatron_longpo.generation.args import build_parser
from megatron_longpo.generation.backends import GenerationError
from megatron_longpo.generation.documents import iter_documents
from megatron_longpo.generation.driver import merge_shards, run_shard, shard_from_env
from megatron_longpo.generation.filters import FilterConfig
from megatron_longpo.generation.model_source import resolved_model
from megatron_longpo.generation.pipeline import GenerationConfig, Pipeline
from megatron_longpo.generation.prompts import load_prompts
from megatron_longpo.generation.questions import load_question_pool

def _sha(text: Optional[str]) -> Optional[str]:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_sha(path: Optional[str]) -> Optional[str]:
    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(
        seed=args.seed, max_turns=args.max_turns, chunk_min_tokens=args.chunk_min_tokens,
        chunk_max_tokens=args.chunk_max_tokens, min_document_tokens=args.min_document_tokens,
        max_document_tokens=args.max_document_tokens, max_question_prompt_tokens=args.max_question_prompt_tokens,
        max_new_tokens=args.max_new_tokens, question_prefix=not args.no_question_prefix,
        max_context_tokens=args.max_model_len if args.backend != "hf" else None,
        filters=FilterConfig(max_repeat_ratio_chosen=args.max_repeat_ratio_chosen,
                             max_repeat_ratio_rejected=args.max_repeat_ratio_rejected,
                             min_content_words=args.min_content_words),
    )


def check_backend_options(args: argparse.Namespace) -> None:
    """Backend options that cannot work together, refused before any model loads."""
    if args.backend == "openai":
        if not (args.openai_base_url and args.openai_model):
            raise ConfigError("--backend openai needs --openai-base-url and --openai-model (or OPENAI_BASE_URL / "
                              "OPENAI_MODEL)")
        if args.long_rope_theta is not None and args.long_base_url is None:
            # One server serves one RoPE base: the chosen answers (short context, the model's own base)
            # would silently be generated at the enlarged base too, or the rejected ones at the original.
            raise ConfigError(
                "--backend openai with --long-rope-theta needs --long-base-url: a server runs one RoPE base, so start "
                "a second server with the enlarged base (vllm serve MODEL --hf-overrides "
                f"'{{\"rope_theta\": {args.long_rope_theta:g}}}') for the long-context (rejected) answers and pass its "
                "URL; --openai-base-url keeps the model's own base for questions and chosen answers (docs/generation.md)")
    elif args.long_base_url is not None:
        raise ConfigError(f"--long-base-url is for --backend openai; --backend {args.backend} applies "
                          "--long-rope-theta itself")


def run(args: argparse.Namespace, env: dict[str, str]) -> int:
    output = Path(args.output)
    if args.merge:
        s = merge_shards(output, args.num_shards)
        print(_describe(s))
        return 0
    if not args.input:
        raise ConfigError("--input is required (documents to generate from), unless --merge")
    if not args.model:
        raise ConfigError("--model is required: an HF model directory or a megatron_longpo checkpoint (openai: the tokenizer)")
    shard = shard_from_env(args.num_shards, args.shard_index, env)
    cfg = generation_config(args)
    cfg.check()
    if args.batch_documents < 1:
        raise ConfigError(f"--batch-documents {args.batch_documents}: must be >= 1")
    prompts = load_prompts(args.prompts)
    pool = load_question_pool(args.questions) if args.questions else None
    template = B.load_chat_template(args.chat_template)
    docs = list(iter_documents(args.input, args.text_field, args.id_field))  # validates every input first
    if pool is not None:
        unknown = sorted(pool.document_ids - {d.id for d in docs})
        if unknown:
            print(f"generate: warning: --questions names {len(unknown)} document id(s) not in --input, e.g. "
                  f"{unknown[:3]}", file=sys.stderr)
    check_backend_options(args)
    options: dict[str, Any] = {
        "inputs": [str(Path(p).resolve()) for p in args.input], "text_field": args.text_field, "id_field": args.id_field,
        "model": str(Path(args.model).resolve()), "backend": args.backend, "openai_model": args.openai_model,
        "openai_api": args.openai_api if args.backend == "openai" else None,
        "long_rope_theta": args.long_rope_theta, "long_endpoint": args.long_base_url is not None, "config": asdict(cfg),
        "prompts_sha": _file_sha(prompts.source), "questions_sha": _file_sha(args.questions),
        "chat_template_sha": _sha(template),
    }
    progress = not args.no_progress
    with resolved_model(args.model, args.work_dir, progress) as model_dir:
        fmt = B.ChatFormatter(model_dir, template)
        if args.backend == "hf":
            backend: B.Backend = B.HFBackend(model_dir, fmt, long_rope_theta=args.long_rope_theta, device=args.device)
        elif args.backend == "vllm":
            if args.max_model_len is None:  # vLLM's own default limit; drop what it would refuse
                hf_cfg = json.loads((Path(model_dir) / "config.json").read_text())
                limit = hf_cfg.get("max_position_embeddings")
                cfg = replace(cfg, max_context_tokens=int(limit) if limit else None)
            backend = B.VLLMBackend(str(model_dir), str(model_dir), B.VLLMConfig(
                tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len,
                gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype,
                enforce_eager=args.enforce_eager, seed=args.seed), args.long_rope_theta)
        else:
            backend = B.OpenAIBackend(B.OpenAIConfig(
                base_url=args.openai_base_url, model=args.openai_model, api_key=env.get("OPENAI_API_KEY"),
                api=args.openai_api, timeout_s=args.openai_timeout, max_retries=args.openai_max_retries,
                concurrency=args.openai_concurrency), long_base_url=args.long_base_url)
        try:
            pipeline = Pipeline(cfg, prompts, fmt, backend, pool)
            s = run_shard(docs, pipeline, output, shard, options, batch_documents=args.batch_documents, progress=progress)
        finally:
            backend.close()
    print(f"generate: {shard.name}: " + _describe(s))
    if shard.num_shards == 1:
        print(_describe(merge_shards(output, 1)))
    else:
        print(f"generate: when all {shard.num_shards} shards are done: "
              f"python tools/generate_longpo_data.py --output {output} --merge")
    return 0


def _describe(s: dict[str, Any]) -> str:
    d, t = s["documents"], s["turns"]
    head = f"wrote {s['output']}: " if "output" in s else ""
    return (f"{head}{d['written']} records from {d['read']} documents ({t['written']} turns); "
            f"dropped documents {d['dropped'] or 'none'}, turns {t['dropped'] or 'none'}; "
            f"{s['tokens']['generated']} tokens generated")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args, dict(os.environ))
    except (ConfigError, GenerationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
