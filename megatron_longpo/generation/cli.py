"""Command line of tools/generate_longpo_data.py (see docs/generation.md)."""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

from megatron_longpo.config import ConfigError
from megatron_longpo.generation import backends as B
from megatron_longpo.generation.args import build_parser
from megatron_longpo.generation.backends import GenerationError
from megatron_longpo.generation.documents import Document, iter_documents
from megatron_longpo.generation.driver import (ShardSpec, check_run_options, merge_shards, run_shard, run_short_phase,
                                               shard_from_env, shards_dir, short_phase_path)
from megatron_longpo.generation.filters import FilterConfig
from megatron_longpo.generation.model_source import resolved_model
from megatron_longpo.generation.pipeline import GenerationConfig, Pipeline
from megatron_longpo.generation.prompts import Prompts, load_prompts
from megatron_longpo.generation.questions import QuestionPool, load_question_pool


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


@dataclass
class _Run:
    """Everything a generation process (the parent, or one phase's process) needs, checked once."""

    args: argparse.Namespace
    shard: ShardSpec
    cfg: GenerationConfig
    prompts: Prompts
    pool: Optional[QuestionPool]
    template: str  # --chat-template (data/templates.py TEMPLATE_CHOICES)
    docs: list[Document]
    options: dict[str, Any]


def prepare(args: argparse.Namespace, env: dict[str, str], warn: bool = True) -> _Run:
    """Every check that can fail before a model loads: options, prompts, questions, documents."""
    if not args.input:
        raise ConfigError("--input is required (documents to generate from), unless --merge")
    if not args.model:
        raise ConfigError("--model is required: an HF model directory or a megatron_longpo checkpoint (openai: the tokenizer)")
    check_backend_options(args)
    shard = shard_from_env(args.num_shards, args.shard_index, env)
    cfg = generation_config(args)
    cfg.check()
    if args.batch_documents < 1:
        raise ConfigError(f"--batch-documents {args.batch_documents}: must be >= 1")
    prompts = load_prompts(args.prompts)
    pool = load_question_pool(args.questions) if args.questions else None
    template = args.chat_template
    docs = list(iter_documents(args.input, args.text_field, args.id_field))  # validates every input first
    if pool is not None and warn:
        unknown = sorted(pool.document_ids - {d.id for d in docs})
        if unknown:
            print(f"generate: warning: --questions names {len(unknown)} document id(s) not in --input, e.g. "
                  f"{unknown[:3]}", file=sys.stderr)
    options: dict[str, Any] = {
        "inputs": [str(Path(p).resolve()) for p in args.input], "text_field": args.text_field, "id_field": args.id_field,
        "model": str(Path(args.model).resolve()), "backend": args.backend, "openai_model": args.openai_model,
        "openai_api": args.openai_api if args.backend == "openai" else None,
        "long_rope_theta": args.long_rope_theta, "long_endpoint": args.long_base_url is not None, "config": asdict(cfg),
        "prompts_sha": _file_sha(prompts.source), "questions_sha": _file_sha(args.questions),
        "chat_template": template,
    }
    return _Run(args, shard, cfg, prompts, pool, template, docs, options)


def _backend(r: _Run, model_dir: Path, fmt: B.ChatFormatter, long: Optional[bool]) -> B.Backend:
    a = r.args
    if a.backend == "hf":
        return B.HFBackend(model_dir, fmt, long_rope_theta=a.long_rope_theta, device=a.device)
    if a.backend == "vllm":
        return B.VLLMBackend(str(model_dir), str(model_dir), B.VLLMConfig(
            tensor_parallel_size=a.tensor_parallel_size, max_model_len=a.max_model_len,
            gpu_memory_utilization=a.gpu_memory_utilization, dtype=a.dtype, enforce_eager=a.enforce_eager,
            seed=a.seed), a.long_rope_theta, long=long)
    return B.OpenAIBackend(B.OpenAIConfig(
        base_url=a.openai_base_url, model=a.openai_model, api_key=os.environ.get("OPENAI_API_KEY"), api=a.openai_api,
        timeout_s=a.openai_timeout, max_retries=a.openai_max_retries, concurrency=a.openai_concurrency),
        long_base_url=a.long_base_url)


def run_phase(r: _Run, model_dir: Path, phase: Optional[str]) -> Optional[dict[str, Any]]:
    """One process's share: both phases (``None``), or only ``short`` / ``long`` of a phased run."""
    cfg = r.cfg
    if r.args.backend == "vllm" and r.args.max_model_len is None:  # vLLM's own default limit: drop what it refuses
        limit = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
        cfg = replace(cfg, max_context_tokens=int(limit) if limit else None)
    fmt = B.ChatFormatter(model_dir, r.template)
    # Records name the template their prompts were rendered with; preprocessing refuses another one.
    template = fmt.describe() if r.args.backend != "openai" or r.args.openai_api != "chat" else \
        {"name": "openai-chat-server", "fingerprint": None}  # the server rendered the messages
    backend = _backend(r, model_dir, fmt, {None: None, "short": False, "long": True}[phase])
    output, progress = Path(r.args.output), not r.args.no_progress
    try:
        pipeline = Pipeline(cfg, r.prompts, fmt, backend, r.pool, meta={"chat_template": template})
        if phase == "short":
            run_short_phase(r.docs, pipeline, output, r.shard, r.options, batch_documents=r.args.batch_documents,
                            progress=progress)
            return None
        states = short_phase_path(output, r.shard) if phase == "long" else None
        return run_shard(r.docs, pipeline, output, r.shard, r.options, batch_documents=r.args.batch_documents,
                         progress=progress, short_states=states)
    finally:
        backend.close()


def _phase_process(argv: list[str], model_dir: str, phase: str) -> None:
    """Entry of one phase's own process (spawned: a fresh CUDA context and vLLM engine)."""
    try:
        run_phase(prepare(build_parser().parse_args(argv), dict(os.environ), warn=False), Path(model_dir), phase)
    except (ConfigError, GenerationError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _phased(r: _Run, model_dir: Path, argv: list[str]) -> dict[str, Any]:
    """vllm with --long-rope-theta: every question and chosen answer in one process (one engine at
    the model's own RoPE base), then every rejected answer in another (the enlarged base). Each
    process exits after its phase, which frees its GPU memory; both resume from their journals."""
    output = Path(r.args.output)
    check_run_options(shards_dir(output), r.options)
    final = shards_dir(output) / f"{r.shard.name}.jsonl"
    ctx = multiprocessing.get_context("spawn")
    for phase in ("short", "long"):
        if final.is_file() or (phase == "short" and short_phase_path(output, r.shard).is_file()):
            continue
        p = ctx.Process(target=_phase_process, args=(argv, str(model_dir), phase), name=f"generate-{phase}")
        p.start()
        p.join()
        if p.exitcode != 0:
            raise GenerationError(f"the {phase}-context phase process of {r.shard.name} exited with {p.exitcode}; "
                                  "rerun the same command to resume")
    return json.loads((shards_dir(output) / f"{r.shard.name}.summary.json").read_text())


def run(args: argparse.Namespace, env: dict[str, str], argv: Optional[list[str]] = None) -> int:
    output = Path(args.output)
    if args.merge:
        s = merge_shards(output, args.num_shards)
        print(_describe(s))
        return 0
    r = prepare(args, env)
    with resolved_model(args.model, args.work_dir, not args.no_progress) as model_dir:
        if args.backend == "vllm" and args.long_rope_theta is not None:
            s = _phased(r, Path(model_dir), list(sys.argv[1:] if argv is None else argv))
        else:
            s = run_phase(r, Path(model_dir), None)
    assert s is not None
    shard = r.shard
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
        return run(args, dict(os.environ), argv)
    except (ConfigError, GenerationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
