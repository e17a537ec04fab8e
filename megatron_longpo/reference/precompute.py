"""Precompute the reference log-prob cache (``tools/precompute_reference.py``, run with torchrun).

Order of work (everything that can fail cheaply fails first, on every rank, before any model):
  1. options, output path, dataset sidecar, mode support, reference checkpoint + its own config,
     vocabulary, world size % tp (and the expert layout: --ep / --etp)
  2. process groups (TP = --tp, PP = --pp, DP = world / (tp * pp), a MoE model's experts over --ep
     of the DP ranks), dataset, work plan (compute.plan_batches)
  3. rank 0 prepares or resumes ``CACHE.partial/`` and shares the set of finished batches
  4. the reference model (its own config) is built and loaded at TP = --tp
  5. each DP rank computes its share of the unfinished batches (under --ep, filler forwards keep
     the DP ranks in step: runtime/distributed.dp_share); its TP-rank-0 process appends one
     JSON line per batch to its own part file (flushed per batch, fsynced when 5 s have passed
     since the last fsync, and at the end), so a killed run loses at most the batch in flight
  6. rank 0 assembles the part files into the cache (temp dir + rename) and removes the partial dir

Resume: ``CACHE.partial/state.json`` records everything the values depend on (dataset, checkpoint,
model config, mode, TP, batching, plan hash). A re-run with the same options skips the finished
batches; the plan does not depend on the number of ranks, so a resumed run may use another world
size (or --ep: expert parallelism moves tokens, not arithmetic), and since every batch is computed
exactly as in an uninterrupted run, the final arrays are bit-identical to it (given the same TP and
hardware).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import megatron.core
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_longpo.config import (
    DEFAULT_LOGPROB_CHUNK_SIZE,
    ConfigError,
    ParallelConfig,
    expert_option_errors,
    seq_length_multiple,
    validate_model,
)
from megatron_longpo.data.indexed import (
    PreferenceDataset,
    check_dataset_supports_mode,
    check_dataset_vocab,
    load_metadata,
)
from megatron_longpo.checkpoint import tokenizer_dir
from megatron_longpo.data.checks import tokenizer_mismatch
from megatron_longpo.data.schema import DataError
from megatron_longpo.fsutil import write_text_atomic
from megatron_longpo.gpu_rules import fp8_rule_errors
from megatron_longpo.reference.cache import FORMAT_VERSION, ReferenceCacheError, write_cache
from megatron_longpo.reference.compute import (
    DEFAULT_PAD_MULTIPLE,
    DEFAULT_TOKENS_PER_BATCH,
    MODES,
    item_lengths,
    item_sequences,
    num_turn_slots,
    plan_batches,
    sequence_logprob_sums,
    sum_turns,
)
from megatron_longpo.reference.fingerprint import dataset_identity
from megatron_longpo.reference.model import effective_model_config, load_reference_model, read_reference_checkpoint
from megatron_longpo.reference.precompute_args import build_arg_parser
from megatron_longpo.runtime.distributed import (
    destroy,
    dp_share,
    group_max,
    init_distributed,
    init_model_parallel,
    lockstep_any,
    set_seed,
)
from megatron_longpo.runtime.signals import StopFlag, write_run_status

PARTIAL_SUFFIX = ".partial"
STATE_FILE = "state.json"


class PrecomputeError(ConfigError):
    """Bad options or inputs of the precompute; the message names the option and the fix."""


@dataclass
class PrecomputeOptions:
    load: str  # reference checkpoint (run dir or iteration dir)
    data: str  # preprocessed dataset prefix
    output: str  # cache directory to write
    mode: str = "longpo"  # longpo: short contexts per turn; dpo: long sequences S_w / S_l
    tp: int = 1
    pp: int = 1  # pipeline stages of the reference model (forward-only schedule)
    ep: int = 1  # expert parallelism of a mixture-of-experts reference model
    etp: Optional[int] = None  # tensor parallelism inside each expert (None: --tp)
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH
    pad_to_multiple: int = DEFAULT_PAD_MULTIPLE
    rope_theta: Optional[float] = None  # override the checkpoint's RoPE base (rare)
    params_dtype: Optional[str] = None  # override the checkpoint's dtype: fp32 | bf16
    attention_backend: str = "auto"
    logprob_chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE
    fp8: Optional[str] = None  # the policy's FP8 format (hybrid | e4m3) for the reference forward
    fp8_recipe: str = "delayed"
    overwrite: bool = False  # replace an existing cache at --output
    restart: bool = False  # discard an interrupted run's partial results
    progress: bool = True
    fsync_interval_s: float = 5.0
    stop_after_batches: Optional[int] = None  # testing hook: stop (as if killed) after K batches per rank
    check_tokenizer: bool = True  # the data's tokenizer splits text like the one --load ships (as training checks)


@dataclass
class PrecomputeResult:
    complete: bool
    path: Optional[Path]  # the cache (None when interrupted)
    batches_total: int
    batches_skipped: int  # finished by an earlier, interrupted run
    batches_here: int  # computed by this rank in this run
    tokens_here: int  # sequence tokens of those batches
    seconds: float  # whole call, model loading included
    compute_seconds: float = 0.0  # the forward loop of this rank
    meta: Optional[dict] = None
    stopped_by_signal: bool = False  # SIGUSR1 / SIGTERM / Ctrl-C / stop file: resumable, exit 0


def partial_dir(output: str | Path) -> Path:
    return Path(str(output) + PARTIAL_SUFFIX)


# ----------------------------------------------------------------------------------------------
# Step 1: cheap checks (no process group, no tensors)
# ----------------------------------------------------------------------------------------------


def _check_options(o: PrecomputeOptions) -> None:
    if o.mode not in MODES:
        raise PrecomputeError(f"--mode {o.mode!r} is not one of {list(MODES)}")
    if o.tp < 1 or o.pp < 1:
        raise PrecomputeError(f"--tp and --pp must be >= 1 (got {o.tp}, {o.pp})")
    if o.tokens_per_batch <= 0:
        raise PrecomputeError(f"--tokens-per-batch must be > 0 (got {o.tokens_per_batch})")
    if o.pad_to_multiple <= 0:
        raise PrecomputeError(f"--pad-to-multiple must be > 0 (got {o.pad_to_multiple})")
    if o.logprob_chunk_size <= 0:
        raise PrecomputeError(f"--logprob-chunk-size must be > 0 (got {o.logprob_chunk_size})")
    if o.params_dtype not in (None, "fp32", "bf16"):
        raise PrecomputeError(f"--params-dtype {o.params_dtype!r} is not one of ['fp32', 'bf16']")
    if o.rope_theta is not None and o.rope_theta <= 0:
        raise PrecomputeError(f"--rope-theta must be > 0 (got {o.rope_theta})")
    out = Path(o.output)
    if out.exists() and not o.overwrite:
        raise PrecomputeError(f"--output {out} already exists; pass --overwrite to replace it (it is kept until the new cache is complete)")
    if out.exists() and not out.is_dir():
        raise PrecomputeError(f"--output {out} exists and is not a cache directory; choose another path")


def fp8_reference_errors(model_cfg, parallel: ParallelConfig) -> list[str]:
    """The FP8 rules (gpu_rules.py) for the reference forward, in precompute option names."""
    rename = {"parallel.fp8": "--fp8", "model.params_dtype=bf16": "a bf16 checkpoint (or --params-dtype bf16)",
              "parallel.tensor_model_parallel_size": "--tp", "parallel.fp8=null": "no --fp8"}
    errs = fp8_rule_errors(model_cfg, parallel)
    for old, new in rename.items():
        errs = [e.replace(old, new) for e in errs]
    return errs


def _inputs(o: PrecomputeOptions, world: int):
    _check_options(o)
    if world % (o.tp * o.pp):
        raise PrecomputeError(f"the world size {world} (torchrun --nproc-per-node x nodes) must be a multiple of "
                              f"--tp x --pp = {o.tp * o.pp}")
    meta = load_metadata(o.data)
    check_dataset_supports_mode(meta, o.mode, option="--data")
    ckpt = read_reference_checkpoint(o.load, "--load")
    tdir = tokenizer_dir(o.load) if o.check_tokenizer else None
    why = tdir and tokenizer_mismatch(meta, "--data", o.data, o.load, tdir, disable="--no-check-tokenizer")
    if why:  # training refuses this data for this model: do not spend a precompute on it
        raise PrecomputeError(why)
    model_cfg = effective_model_config(ckpt, rope_theta=o.rope_theta, params_dtype=o.params_dtype)
    # A mixture-of-experts model at TP > 1 runs with sequence parallelism (Megatron-Core's MoE rule).
    parallel = ParallelConfig(tensor_model_parallel_size=o.tp, pipeline_model_parallel_size=o.pp,
                              expert_model_parallel_size=o.ep, expert_tensor_parallel_size=o.etp,
                              attention_backend=o.attention_backend,  # type: ignore[arg-type]
                              sequence_parallel=model_cfg.num_experts is not None and o.tp > 1,
                              fp8=o.fp8, fp8_recipe=o.fp8_recipe)  # type: ignore[arg-type]
    errs = expert_option_errors(model_cfg, parallel, world, f"the reference model of --load {o.load}")
    if errs:
        raise PrecomputeError("; ".join(errs))
    try:
        validate_model(model_cfg, parallel)
    except ConfigError as e:
        raise PrecomputeError(f"the reference model of --load {o.load} cannot run with --tp {o.tp} --pp {o.pp} "
                              f"--ep {o.ep}: {e}") from e
    errs = fp8_reference_errors(model_cfg, parallel)
    if errs:
        raise PrecomputeError(f"--fp8 {o.fp8} with the reference model of --load {o.load}: {'; '.join(errs)}")
    check_dataset_vocab(meta, model_cfg.vocab_size, option="--data")
    return meta, ckpt, model_cfg, parallel


# ----------------------------------------------------------------------------------------------
# Part files (resume)
# ----------------------------------------------------------------------------------------------


def _plan_digest(plan: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for b in plan:
        h.update(np.asarray(b, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def prepare_partial(pdir: Path, key: dict[str, Any], restart: bool) -> None:
    """Create ``pdir`` with ``state.json`` = key, or check that an existing one matches."""
    if pdir.exists() and restart:
        shutil.rmtree(pdir)
    state = pdir / STATE_FILE
    if pdir.exists():
        try:
            old = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        if old is None:
            if any(pdir.glob("part-*.jsonl")):
                raise PrecomputeError(f"{pdir} holds partial results without a readable {STATE_FILE}; add --restart to discard them")
        elif old != key:
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            raise PrecomputeError(
                f"{pdir} holds an interrupted precompute with other settings ({', '.join(diff)} differ); re-run with "
                "the options it was started with to resume it, or add --restart to discard it"
            )
        else:
            return
    pdir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(state, json.dumps(key, indent=2, sort_keys=True))


def read_parts(pdir: Path, plan: list[np.ndarray]) -> dict[int, tuple[list[float], list[int]]]:
    """Finished batches {batch: (sums, counts)} of every part file; a torn last line is ignored."""
    done: dict[int, tuple[list[float], list[int]]] = {}
    for f in sorted(pdir.glob("part-*.jsonl")):
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # the write in flight when the process died
                try:
                    rec = json.loads(line)
                    k, sums, counts = int(rec["batch"]), rec["sums"], rec["counts"]
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    raise PrecomputeError(f"{f} has a damaged line; add --restart to discard the partial results") from None
                if not 0 <= k < len(plan) or len(sums) != len(plan[k]) or len(counts) != len(plan[k]):
                    raise PrecomputeError(f"{f}: batch {k} does not fit the work plan; add --restart to discard the partial results")
                done.setdefault(k, (sums, counts))
    return done


class PartWriter:
    """Appends one JSON line per finished batch to this rank's own part file."""

    def __init__(self, pdir: Path, rank: int, fsync_interval_s: float):
        self.path = pdir / f"part-r{rank:05d}-{uuid.uuid4().hex[:8]}.jsonl"
        self.f = open(self.path, "a", encoding="utf-8")
        self.interval = fsync_interval_s
        self.last_sync = time.monotonic()

    def write(self, batch: int, sums: np.ndarray, counts: np.ndarray) -> None:
        # json writes floats with repr(): the exact float64 comes back on reading.
        rec = {"batch": int(batch), "sums": [float(x) for x in sums], "counts": [int(x) for x in counts]}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()  # in the OS after this: survives the process being killed
        if time.monotonic() - self.last_sync >= self.interval:
            os.fsync(self.f.fileno())  # on disk: survives the node going down
            self.last_sync = time.monotonic()

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


# ----------------------------------------------------------------------------------------------
# Collective helpers: rank 0 acts, every rank learns the outcome (no hang on a rank-0 error)
# ----------------------------------------------------------------------------------------------


def _on_rank0(fn: Callable[[], Any]) -> Any:
    out: list[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            out = [fn(), None]
        except (ValueError, OSError) as e:  # ConfigError / DataError / file errors: every rank raises it
            out = [None, e]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(out, src=0)
    if out[1] is not None:
        raise out[1]
    return out[0]


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _assemble(plan, done, n: int, turns: int) -> tuple[np.ndarray, np.ndarray]:
    values = np.full(n * turns * 2, np.nan, dtype=np.float64)
    counts = np.zeros(n * turns * 2, dtype=np.int32)
    missing = [k for k in range(len(plan)) if k not in done]
    if missing:
        raise PrecomputeError(f"{len(missing)} batches have no result (first: {missing[:5]}); re-run the same command to compute them")
    for k, items in enumerate(plan):
        sums, cnt = done[k]
        values[items] = sums
        counts[items] = cnt
    return values.reshape(n, turns, 2), counts.reshape(n, turns, 2)


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "megatron_core": megatron.core.__version__}


def precompute(o: PrecomputeOptions, log: Callable[[str], None] = print) -> PrecomputeResult:
    """Run the precompute on every rank of the default process group (initialised if needed)."""
    t0 = time.time()
    stop = StopFlag().install()  # SIGUSR1 / SIGTERM / Ctrl-C / stop file: finish this batch, then stop
    try:
        return _precompute(o, log, stop, t0)
    finally:
        stop.uninstall()


def _precompute(o: PrecomputeOptions, log: Callable[[str], None], stop: StopFlag, t0: float) -> PrecomputeResult:
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    data_meta, ckpt, model_cfg, parallel = _inputs(o, world)  # step 1, identical on every rank
    init_distributed(parallel)
    rank = dist.get_rank()
    groups = init_model_parallel(parallel)
    if parallel.sequence_parallel:
        set_seed(0)  # the sequence-parallel embedding forks Megatron's RNG tracker (dropout is 0)
    is_main = rank == 0
    say = log if is_main else (lambda _msg: None)

    dataset = PreferenceDataset(o.data)
    n, turns = len(dataset), num_turn_slots(dataset, o.mode)
    ids, lengths = item_lengths(dataset, o.mode, turns)
    pad_multiple = int(np.lcm(o.pad_to_multiple, seq_length_multiple(parallel)))
    plan = plan_batches(ids, lengths, o.tokens_per_batch, pad_multiple)
    length_of = dict(zip(ids.tolist(), lengths.tolist()))
    if int(lengths.max()) > model_cfg.max_position_embeddings:
        say(f"warning: the longest {o.mode} sequence has {int(lengths.max())} tokens, more than the reference model's "
            f"max_position_embeddings={model_cfg.max_position_embeddings} (rope_theta={model_cfg.rope_theta})")
    ds_ident = dataset_identity(data_meta, o.data)
    key = {
        "format_version": FORMAT_VERSION, "mode": o.mode, "dataset": ds_ident["fingerprint"],
        "checkpoint": ckpt.identity.fingerprint, "reference_model": dataclasses.asdict(model_cfg), "tp": o.tp,
        "tokens_per_batch": o.tokens_per_batch, "pad_to_multiple": pad_multiple,
        "logprob_chunk_size": o.logprob_chunk_size, "attention_backend": o.attention_backend,
        "num_batches": len(plan), "plan_sha256": _plan_digest(plan),
        **({"fp8": [o.fp8, o.fp8_recipe]} if o.fp8 else {}),  # absent without FP8: older partial runs still resume
    }
    pdir = partial_dir(o.output)

    def resume() -> list[int]:
        prepare_partial(pdir, key, o.restart)
        return sorted(read_parts(pdir, plan))

    finished = set(_on_rank0(resume))
    remaining = [k for k in range(len(plan)) if k not in finished]
    # None: a filler forward that keeps this rank in step with its expert-parallel peers.
    share = [None if j is None else remaining[j] for j in dp_share(len(remaining), groups)]
    mine = [k for k in share if k is not None]
    if finished:
        say(f"resuming {pdir}: {len(finished)} of {len(plan)} batches already done")

    model = load_reference_model(ckpt, model_cfg, parallel, keep_fp8=o.fp8 is not None)
    # One writer per model replica (every TP / CP / PP rank of it holds the same results).
    writer = PartWriter(pdir, rank, o.fsync_interval_s) \
        if groups.tp_rank == 0 and groups.cp_rank == 0 and groups.pp_rank == 0 else None
    my_tokens = sum(length_of[int(i)] for k in mine for i in plan[k])
    pbar = None
    if is_main and o.progress:
        pbar = tqdm(total=my_tokens, unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr,
                    desc=f"reference {o.mode} (rank 0 of dp={groups.dp_size})")
    stopped = signalled = False
    tokens_done = batches_done = 0
    t_loop = time.time()
    try:
        for j, k in enumerate(share):
            items = plan[k] if k is not None else plan[-1][:1]  # filler: the shortest item
            seqs = item_sequences(dataset, items, o.mode, turns)
            sums, counts = sequence_logprob_sums(
                model, seqs, groups, vocab_size=model_cfg.vocab_size, pad_id=dataset.pad_id,
                pad_to_multiple=pad_multiple, chunk_size=o.logprob_chunk_size,
                sequence_parallel=parallel.sequence_parallel,
            )
            if k is not None:
                if writer is not None:
                    writer.write(k, sums, counts)
                batch_tokens = sum(len(s[0]) for s in seqs)
                tokens_done += batch_tokens
                batches_done += 1
                if pbar is not None:
                    pbar.update(batch_tokens)
                    rate = tokens_done / max(time.time() - t_loop, 1e-9)
                    pbar.set_postfix(batches=f"{j + 1}/{len(mine)}", all_ranks=f"~{rate * groups.dp_size:,.0f} tok/s",
                                     refresh=False)
            if o.stop_after_batches is not None and j + 1 >= o.stop_after_batches:
                stopped = True
                break
            # The part file has every finished batch; ranks that run the same forwards stop together.
            if lockstep_any(stop.requested(), groups):
                stopped = signalled = True
                break
    finally:
        if writer is not None:
            writer.close()
        if pbar is not None:
            pbar.close()
    loop_s = max(time.time() - t_loop, 1e-9)
    del model
    signalled = group_max(int(signalled), None) > 0  # every rank reports the same outcome
    stopped = group_max(int(stopped), None) > 0
    result = PrecomputeResult(
        complete=False, path=None, batches_total=len(plan), batches_skipped=len(finished),
        batches_here=batches_done, tokens_here=tokens_done, seconds=time.time() - t0, compute_seconds=loop_s,
    )
    if signalled:
        result.stopped_by_signal = True
        say(f"stopped by {stop.describe()}: {batches_done} batches done here; partial results in {pdir}, "
            f"run the same command again to continue")
        if is_main:
            write_run_status("stopped", "signal", True, batches_done_rank0=batches_done)
        return result
    if stopped:
        say(f"stopped after {o.stop_after_batches} batches per rank (testing hook); partial results in {pdir}")
        return result

    def finalize() -> dict:
        values, counts = _assemble(plan, read_parts(pdir, plan), n, turns)
        meta = {
            "mode": o.mode,
            "num_samples": n,
            "max_turns": turns,
            "sides": ["chosen", "rejected"],
            "dataset": ds_ident,
            "reference_checkpoint": ckpt.identity.to_json(),
            "reference_model": dataclasses.asdict(model_cfg),
            "rope_theta_override": o.rope_theta,
            "compute": {
                "params_dtype": model_cfg.params_dtype, "logprob_dtype": "float32",
                "values_dtype": "float64", "tp": o.tp, "ep": o.ep, "etp": o.etp, "world_size": world,
                "tokens_per_batch": o.tokens_per_batch, "pad_to_multiple": pad_multiple,
                "logprob_chunk_size": o.logprob_chunk_size, "attention_backend": o.attention_backend,
                "fp8": o.fp8, "fp8_recipe": o.fp8_recipe if o.fp8 else None,
                "num_batches": len(plan), "plan_sha256": key["plan_sha256"],
            },
            "stats": {
                "sequences": int(len(ids)), "sequence_tokens": int(lengths.sum()), "response_tokens": int(counts.sum()),
                "batches_resumed": len(finished), "seconds_last_run": round(time.time() - t0, 3),
            },
            "versions": _versions(),
        }
        written = write_cache(o.output, values, counts, sum_turns(values), meta, overwrite=o.overwrite)
        shutil.rmtree(pdir, ignore_errors=True)
        return written

    dist.barrier()  # every part file is closed
    result.meta = _on_rank0(finalize)
    result.complete, result.path, result.seconds = True, Path(o.output), time.time() - t0
    if is_main:
        write_run_status("done", None, False, output=str(o.output))
    say(f"reference cache written to {o.output}: {n} samples, {len(ids)} sequences, {int(lengths.sum()):,} tokens; "
        f"this run {result.seconds:.1f}s, rank 0 {tokens_done / loop_s:,.0f} tok/s (~{tokens_done / loop_s * groups.dp_size:,.0f} "
        f"tok/s over dp={groups.dp_size})")
    return result


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_arg_parser().parse_args(argv)
    opts = PrecomputeOptions(
        load=a.load, data=a.data, output=a.output, mode=a.mode, tp=a.tp, pp=a.pp, ep=a.ep, etp=a.etp,
        tokens_per_batch=a.tokens_per_batch,
        pad_to_multiple=a.pad_to_multiple, rope_theta=a.rope_theta, params_dtype=a.params_dtype,
        attention_backend=a.attention_backend, logprob_chunk_size=a.logprob_chunk_size, fp8=a.fp8,
        fp8_recipe=a.fp8_recipe, overwrite=a.overwrite,
        restart=a.restart, progress=not a.no_progress, stop_after_batches=a.stop_after_batches,
        check_tokenizer=not a.no_check_tokenizer,
    )
    rank = int(os.environ.get("RANK", "0"))
    try:
        res = precompute(opts)
    except (ConfigError, DataError, ReferenceCacheError) as e:
        if rank == 0:
            print(f"precompute_reference.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C
        if rank == 0:
            print("precompute_reference.py: interrupted; finished batches are kept, run again to continue",
                  file=sys.stderr, flush=True)
        return 130
    finally:
        if dist.is_initialized():
            destroy()
    return 0 if res.complete or res.stopped_by_signal else 3
