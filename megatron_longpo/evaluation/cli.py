"""tools/evaluate.py: synthetic long-context scores of Megatron checkpoints under TP / CP / DP.

    torchrun --nproc-per-node N tools/evaluate.py --load CKPT [CKPT ...] \
        --tasks niah_single,variable_tracking --lengths 4096,131072 [--samples 8] [--tp K] [--cp K] [--pp K] [--ep K] \
        --output results.json [--plot results.png]

Every check that can fail (options, checkpoints, tokenizer, task lengths) runs before a model is
built. Each checkpoint is built with its own model config (``longpo_meta.json``) on the requested
layout; world size / (tp * cp) ranks split the samples data-parallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist
from tqdm import tqdm

from megatron_longpo.checkpoint import load_model_checkpoint
from megatron_longpo.checkpoint.format import CheckpointMeta, read_meta, resolve_checkpoint_dir, tokenizer_dir
from megatron_longpo.config import ConfigError, ParallelConfig, expert_option_errors, validate_model
from megatron_longpo.data.schema import DataError
from megatron_longpo.evaluation.args import build_arg_parser, csv_list
from megatron_longpo.evaluation.report import plot_accuracy, require_matplotlib, results_document, write_results
from megatron_longpo.evaluation.scoring import plan_batches
from megatron_longpo.evaluation.setup import SuiteOptions, build_evaluator, text_pipeline
from megatron_longpo.evaluation.suite import Evaluator, format_table
from megatron_longpo.models.provider import build_model
from megatron_longpo.runtime.distributed import destroy, init_distributed, init_model_parallel, set_seed


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
    path: Path
    iter_dir: Path
    meta: CheckpointMeta
    label: str


def _default_tokenizer(ckpt: Path) -> str:
    d = tokenizer_dir(ckpt)
    if d is None:
        raise ConfigError(f"checkpoint {ckpt} has no tokenizer/ directory; pass --tokenizer")
    if not (d / "tokenizer.json").exists() and not (d / "tokenizer_config.json").exists() and (d / "tokenizer.model").exists():
        return str(d / "tokenizer.model")  # a bare sentencepiece model
    return str(d)


def _checkpoints(a: argparse.Namespace) -> list[_Checkpoint]:
    labels = csv_list(a.labels) if a.labels else None
    if labels is not None and len(labels) != len(a.load):
        raise ConfigError(f"--labels names {len(labels)} checkpoints but --load has {len(a.load)}")
    out = []
    for k, path in enumerate(a.load):
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"--load {p} does not exist")
        iter_dir = resolve_checkpoint_dir(p)
        meta = read_meta(iter_dir)
        out.append(_Checkpoint(p, iter_dir, meta, labels[k] if labels else f"{iter_dir.parent.name}@{meta.iteration}"))
    if len({c.meta.model.vocab_size for c in out}) > 1:
        raise ConfigError("--load checkpoints have different model.vocab_size; evaluate them in separate runs")
    return out


def _model_config(c: _Checkpoint, a: argparse.Namespace):
    cfg = c.meta.model
    if a.rope_theta is not None:
        cfg = dataclasses.replace(cfg, rope_theta=a.rope_theta)
    if a.params_dtype is not None:
        cfg = dataclasses.replace(cfg, params_dtype=a.params_dtype)
    return cfg


def _progress(evaluator: Evaluator, dp_rank: int, dp_size: int, desc: str, enabled: bool):
    if not enabled:
        return None
    plan = plan_batches([len(s.tokens) for s in evaluator.samples], evaluator.kw["tokens_per_batch"],
                        evaluator.kw["pad_multiple"])
    mine = sum(len(evaluator.samples[i].tokens) for b in plan[dp_rank::dp_size] for i in b)
    return tqdm(total=mine, unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr, desc=desc)


def evaluate(a: argparse.Namespace, log=print) -> dict:
    """Run the evaluation on every rank of the default group (initialised here); returns the JSON doc."""
    t0 = time.time()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = ParallelConfig(tensor_model_parallel_size=a.tp, context_parallel_size=a.cp, pipeline_model_parallel_size=a.pp,
                              expert_model_parallel_size=a.ep, expert_tensor_parallel_size=a.etp,
                              sequence_parallel=a.sequence_parallel, attention_backend=a.attention_backend)
    if world % (a.tp * a.cp * a.pp):
        raise ConfigError(f"world size {world} must be divisible by --tp * --cp * --pp = {a.tp * a.cp * a.pp}")
    if a.samples <= 0 or a.tokens_per_batch <= 0 or a.logprob_chunk_size <= 0:
        raise ConfigError("--samples, --tokens-per-batch and --logprob-chunk-size must be > 0")
    if a.plot:
        require_matplotlib()
    ckpts = _checkpoints(a)
    for c in ckpts:
        errs = expert_option_errors(c.meta.model, parallel, world, f"--load {c.path}")
        if errs:
            raise ConfigError("; ".join(errs))
        try:
            validate_model(_model_config(c, a), parallel)
        except ConfigError as e:
            raise ConfigError(f"--load {c.path}: {e}") from e
    tok_path = a.tokenizer or _default_tokenizer(ckpts[0].path)
    tok, template = text_pipeline(tok_path, a.chat_template, None, "--tokenizer")
    opts = SuiteOptions(tasks=a.tasks, lengths=a.lengths, samples=a.samples, seed=a.seed, tokenizer=tok_path,
                        chat_template=template.name, haystack=a.haystack, tokens_per_batch=a.tokens_per_batch)
    evaluator = build_evaluator(opts, tok, template, vocab_size=ckpts[0].meta.model.vocab_size, parallel=parallel,
                                chunk_size=a.logprob_chunk_size, option="evaluation (--tasks/--lengths/--haystack)")
    init_distributed(parallel)
    groups = init_model_parallel(parallel)
    set_seed(a.seed)  # Megatron's RNG tracker: model construction draws from it (weights are then loaded)
    rank0 = dist.get_rank() == 0
    say = log if rank0 else (lambda _m: None)
    say(f"[evaluate] {len(evaluator.samples)} samples ({len(a.tasks)} tasks x {len(a.lengths)} lengths x {a.samples}), "
        f"{evaluator.total_tokens:,} tokens per checkpoint; tp={groups.tp_size} cp={groups.cp_size} pp={groups.pp_size} "
        f"ep={groups.ep_size} dp={groups.dp_size}; "
        f"tokenizer {tok_path} template {template.name}")
    entries = []
    for c in ckpts:
        model_cfg = _model_config(c, a)
        model = build_model(model_cfg, parallel)
        load_model_checkpoint(c.iter_dir, model, model_cfg)
        model.requires_grad_(False)
        pbar = _progress(evaluator, groups.dp_rank, groups.dp_size, f"evaluate {c.label}", rank0 and not a.no_progress)
        try:
            res = evaluator.evaluate(model, groups, on_batch=pbar.update if pbar is not None else None)
        finally:
            if pbar is not None:
                pbar.close()
        say(f"[evaluate] {c.label} ({c.iter_dir}, rope_theta {model_cfg.rope_theta:g}) in {res.seconds:.1f}s: "
            f"teacher-forced exact match\n{format_table(res)}")
        entries.append({"label": c.label, "path": str(c.iter_dir.resolve()), "iteration": c.meta.iteration,
                        "rope_theta": model_cfg.rope_theta, **res.to_json()})
        del model
    doc = results_document(
        suite={"tasks": list(a.tasks), "lengths": list(a.lengths), "samples": a.samples, "seed": a.seed,
               "tokenizer": str(tok_path), "chat_template": template.name, "haystack": list(a.haystack) or "built-in filler"},
        parallel={"tp": groups.tp_size, "cp": groups.cp_size, "pp": groups.pp_size, "ep": groups.ep_size,
                  "dp": groups.dp_size, "world_size": world,
                  "sequence_parallel": a.sequence_parallel},
        checkpoints=entries,
    )
    if rank0:
        write_results(a.output, doc)
        say(f"[evaluate] results written to {a.output}")
        if a.plot:
            plot_accuracy(doc, a.plot)
            say(f"[evaluate] plot written to {a.plot}")
    dist.barrier()
    say(f"[evaluate] done in {time.time() - t0:.1f}s")
    return doc


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_arg_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        evaluate(a)
    except (ConfigError, DataError) as e:
        if rank == 0:
            print(f"evaluate.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            destroy()
    return 0
