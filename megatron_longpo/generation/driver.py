"""Sharded, resumable generation runs and the final merge.

Layout next to ``--output OUT.jsonl``::

    OUT.jsonl.shards/run.json                         options that determine the output (checked on rerun)
    OUT.jsonl.shards/shard-00000-of-00002.jsonl.partial   journal being written (one line per document)
    OUT.jsonl.shards/shard-00000-of-00002.jsonl           the same journal, renamed once complete
    OUT.jsonl.shards/shard-00000-of-00002.summary.json
    OUT.jsonl.shards/shard-00000-of-00002.short.jsonl[.partial]  phased runs (vllm with --long-rope-theta):
                                                      questions + chosen answers of every document, written
                                                      by the short-RoPE engine's process before the long one
    OUT.jsonl, OUT.summary.json                       written by the merge (temp file + rename)

Document i (global order over all inputs) belongs to shard i % num_shards. A journal line holds a
document's record (or null) and its drop counts; it is appended and fsynced per batch, so a killed
run loses at most the batch in flight. A rerun keeps the journal's complete lines (a torn last line
is cut off), skips those documents and continues; a complete shard is not run again. The merge
orders the records by document index, so any sharding gives the same output as one process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from tqdm import tqdm

from megatron_longpo.config import ConfigError
from megatron_longpo.fsutil import fsync_path, write_text_atomic
from megatron_longpo.generation.documents import Document
from megatron_longpo.generation.pipeline import DocResult, Pipeline


@dataclass(frozen=True)
class ShardSpec:
    num_shards: int = 1
    shard_index: int = 0

    def owns(self, doc_index: int) -> bool:
        return doc_index % self.num_shards == self.shard_index

    @property
    def name(self) -> str:
        return f"shard-{self.shard_index:05d}-of-{self.num_shards:05d}"


def shard_from_env(num_shards: Optional[int], shard_index: Optional[int], env: dict[str, str]) -> ShardSpec:
    """--num-shards/--shard-index, else SLURM_ARRAY_TASK_COUNT/SLURM_ARRAY_TASK_ID, else one shard.

    Under a Slurm array the shard index is the task id minus SLURM_ARRAY_TASK_MIN (arrays may
    start at 1).
    """
    if shard_index is None and "SLURM_ARRAY_TASK_ID" in env:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(env.get("SLURM_ARRAY_TASK_COUNT", "0")) or None
        if num_shards is None:
            if count is None:
                raise ConfigError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --num-shards")
            num_shards = count
        shard_index = task - lo
    if num_shards is None:
        num_shards = 1
    if shard_index is None:
        if num_shards != 1:
            raise ConfigError(
                f"--num-shards {num_shards} needs --shard-index I (0 <= I < {num_shards}) or a Slurm array "
                "(SLURM_ARRAY_TASK_ID); run one process per shard, then --merge"
            )
        shard_index = 0
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard-index {shard_index} / --num-shards {num_shards}: need 0 <= index < num_shards")
    return ShardSpec(num_shards, shard_index)


def shards_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def summary_path(output: Path) -> Path:
    name = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(name + ".summary.json")


_ABSENT = "(not set)"


def _flat(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested option dicts as dotted keys, so a rerun names the one option that differs."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run_options(directory: Path, options: dict[str, Any]) -> None:
    """Record the output-determining options; refuse to continue a run made with other ones."""
    directory.mkdir(parents=True, exist_ok=True)
    options = json.loads(json.dumps(options))  # compare in JSON form (tuples -> lists)
    path = directory / "run.json"
    if path.is_file():
        old, new = _flat(json.loads(path.read_text())), _flat(options)
        diff = sorted(k for k in set(old) | set(new) if old.get(k, _ABSENT) != new.get(k, _ABSENT))
        if diff:
            lines = [f"  {k}: before {old.get(k, _ABSENT)!r}, now {new.get(k, _ABSENT)!r}" for k in diff]
            raise ConfigError(
                f"{path}: this output was started with different options, so its finished documents would not "
                "match a fresh run:\n" + "\n".join(lines) +
                f"\nrerun with the original options, or use another --output (or delete {directory})"
            )
        return
    try:  # O_EXCL: concurrent shards of a fresh run race to create it
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return check_run_options(directory, options)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(options, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_journal(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """Complete lines of a journal; with ``repair`` a torn tail (killed mid-write) is cut off."""
    entries, good = [], 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # no newline: the last write was cut short
        try:
            entries.append(json.loads(data[pos:nl]))
        except json.JSONDecodeError:
            if repair and nl == len(data) - 1:
                break
            raise ConfigError(f"{path}: line {len(entries) + 1} is corrupt; delete the file to regenerate that shard")
        pos = good = nl + 1
    if good < len(data):
        if not repair:
            raise ConfigError(f"{path}: incomplete last line in a finished shard; delete it to regenerate the shard")
        with open(path, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return entries


def summarize(entries: Iterable[dict[str, Any]]) -> dict[str, Any]:
    docs, turns, stats = Counter(), Counter(), Counter()
    n = written = 0
    for e in entries:
        n += 1
        written += e["record"] is not None
        if e["dropped_document"]:
            docs[e["dropped_document"]] += 1
        turns.update(e["dropped_turns"])
        stats.update(e["stats"])
    return {
        "documents": {"read": n, "written": written, "dropped": dict(sorted(docs.items()))},
        "turns": {"attempted": stats["turns_attempted"], "written": stats["turns_written"],
                  "dropped": dict(sorted(turns.items()))},
        "tokens": {"documents": stats["document_tokens"], "prompts": stats["prompt_tokens"],
                   "generated": stats["generated_tokens"]},
        "answers_hit_max_new_tokens": stats["truncated_answers"],
    }


def _progress(total_docs: int, done_docs: int, enabled: bool):
    docs = tqdm(total=total_docs, initial=done_docs, unit="doc", desc="documents", dynamic_ncols=True,
                file=sys.stderr, disable=not enabled, position=0)
    toks = tqdm(total=0, unit="tok", unit_scale=True, desc="doc tokens", dynamic_ncols=True, file=sys.stderr,
                disable=not enabled, position=1)
    return docs, toks


def _resume(partial: Path, mine: list[Document]) -> set[int]:
    """Document indices a partial journal already holds (a torn tail cut off); refuses a journal
    that holds other documents than this shard's."""
    done_entries = read_journal(partial, repair=True) if partial.is_file() else []
    known = {doc.index: doc.id for doc in mine}
    stale = [e for e in done_entries if known.get(e["doc_index"]) != e["doc_id"]]
    if stale:
        e = stale[0]
        raise ConfigError(
            f"{partial}: holds document #{e['doc_index']} ({e['doc_id']!r}), which is not that document of this "
            "shard for the given --input; the inputs changed since the run started: use another --output or delete "
            f"{partial}"
        )
    return {e["doc_index"] for e in done_entries}


def short_phase_path(output: Path, shard: ShardSpec) -> Path:
    return shards_dir(output) / f"{shard.name}.short.jsonl"


def run_short_phase(documents: Iterable[Document], pipeline: Pipeline, output: Path, shard: ShardSpec,
                    options: dict[str, Any], *, batch_documents: int = 16, progress: bool = True) -> Path:
    """The short phase of a phased run (questions + chosen answers of every document of the shard,
    one engine): a journal of per-document states, resumable like the final journal; returns it."""
    d = shards_dir(output)
    check_run_options(d, options)
    final = short_phase_path(output, shard)
    partial = final.with_name(final.name + ".partial")
    if final.is_file():
        return final
    mine = [doc for doc in documents if shard.owns(doc.index)]
    done = _resume(partial, mine)
    todo = [doc for doc in mine if doc.index not in done]
    if done:
        print(f"generate: resuming the short phase of {shard.name}: {len(done)} of {len(mine)} documents done",
              file=sys.stderr)
    bar = tqdm(total=len(mine), initial=len(done), unit="doc", desc="short phase", dynamic_ncols=True,
               file=sys.stderr, disable=not progress)
    try:
        with open(partial, "a", encoding="utf-8") as f:
            for b in range(0, len(todo), batch_documents):
                batch = todo[b: b + batch_documents]
                f.write("".join(json.dumps(st, ensure_ascii=False) + "\n" for st in pipeline.short_phase(batch)))
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batch))
    finally:
        bar.close()
    if {e["doc_index"] for e in read_journal(partial)} != {doc.index for doc in mine}:
        raise RuntimeError(f"{partial}: journal does not cover the shard's documents; delete it and rerun")
    os.replace(partial, final)
    fsync_path(d)
    return final


def run_shard(
    documents: Iterable[Document], pipeline: Pipeline, output: Path, shard: ShardSpec, options: dict[str, Any],
    *, batch_documents: int = 16, progress: bool = True, short_states: Optional[Path] = None,
) -> dict[str, Any]:
    """Generate this shard's journal (resuming a partial one); return the shard summary. With
    ``short_states`` (the journal of :func:`run_short_phase`) only the long phase runs here."""
    d = shards_dir(output)
    check_run_options(d, options)
    final = d / f"{shard.name}.jsonl"
    partial = d / f"{shard.name}.jsonl.partial"
    summ = d / f"{shard.name}.summary.json"
    if final.is_file():
        print(f"generate: {final} is complete; nothing to do for {shard.name}", file=sys.stderr)
        return json.loads(summ.read_text()) if summ.is_file() else summarize(read_journal(final))
    mine = [doc for doc in documents if shard.owns(doc.index)]
    done = _resume(partial, mine)
    todo = [doc for doc in mine if doc.index not in done]
    if short_states is not None:  # the long phase of a phased run: the short phase's states
        states = {e["doc_index"]: e for e in read_journal(short_states)}
        missing = [doc.index for doc in todo if doc.index not in states]
        if missing:
            raise ConfigError(f"{short_states}: no short-phase state for document #{missing[0]}; delete it to rerun "
                              "the short phase")

        def step(batch: list[Document]) -> list[DocResult]:
            return pipeline.long_phase(batch, [states[doc.index] for doc in batch])
    else:
        step = pipeline.run
    if done:
        print(f"generate: resuming {shard.name}: {len(done)} of {len(mine)} documents already done", file=sys.stderr)
    t0 = time.perf_counter()
    model0 = pipeline.backend.model_seconds
    bar_docs, bar_toks = _progress(len(mine), len(done), progress)
    chars_todo = sum(len(x.text) for x in todo)
    chars_seen = tokens_seen = generated = 0
    try:
        with open(partial, "a", encoding="utf-8") as f:
            for b in range(0, len(todo), batch_documents):
                batch = todo[b: b + batch_documents]
                results: list[DocResult] = step(batch)
                f.write("".join(json.dumps(r.journal(), ensure_ascii=False) + "\n" for r in results))
                f.flush()
                os.fsync(f.fileno())
                for r in results:
                    chars_seen += len(r.doc.text)
                    tokens_seen += r.stats["document_tokens"]
                    generated += r.stats["generated_tokens"]
                bar_toks.total = int(chars_todo * tokens_seen / max(chars_seen, 1))  # estimate from tokens/char so far
                bar_toks.update(sum(r.stats["document_tokens"] for r in results))
                bar_docs.update(len(results))
                bar_docs.set_postfix(generated_tok=generated, refresh=False)
    finally:
        bar_docs.close()
        bar_toks.close()
    entries = read_journal(partial)
    if {e["doc_index"] for e in entries} != {doc.index for doc in mine}:
        raise RuntimeError(f"{partial}: journal does not cover the shard's documents; delete it and rerun")
    summary = summarize(entries)
    summary["shard"] = {"name": shard.name, "seconds_this_run": round(time.perf_counter() - t0, 3),
                        "model_seconds_this_run": round(pipeline.backend.model_seconds - model0, 3),
                        "documents_this_run": len(todo)}
    write_text_atomic(summ, json.dumps(summary, indent=2) + "\n")
    os.replace(partial, final)  # the shard is complete only now
    fsync_path(d)
    return summary


def merge_shards(output: Path, num_shards: Optional[int] = None) -> dict[str, Any]:
    """Combine the finished shards into ``output`` (records in document order) and OUT.summary.json."""
    d = shards_dir(output)
    if not d.is_dir():
        raise ConfigError(f"--merge: {d} does not exist; run the shards first (same --output)")
    finals = sorted(d.glob("shard-*-of-*.jsonl"))
    counts = {p.name.split("-of-")[1].split(".")[0] for p in finals} | {
        p.name.split("-of-")[1].split(".")[0] for p in d.glob("shard-*-of-*.jsonl.partial")}
    if num_shards is None:
        if len(counts) != 1:
            raise ConfigError(f"--merge: {d} holds shards of different --num-shards {sorted(counts)}; pass --num-shards")
        num_shards = int(counts.pop())
    names = [ShardSpec(num_shards, i).name for i in range(num_shards)]
    missing = [n for n in names if not (d / f"{n}.jsonl").is_file()]
    if missing:
        partial = [n for n in missing if (d / f"{n}.jsonl.partial").is_file()]
        raise ConfigError(
            f"--merge: {len(missing)} of {num_shards} shards are not finished: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} (in progress or killed: {partial[:8]}); rerun those shards "
            "(a rerun resumes), then merge"
        )
    entries: list[dict[str, Any]] = []
    for n in names:
        entries.extend(read_journal(d / f"{n}.jsonl"))
    entries.sort(key=lambda e: e["doc_index"])
    idx = [e["doc_index"] for e in entries]
    if len(set(idx)) != len(idx):
        raise ConfigError(f"--merge: {d}: a document appears in two shards; the shards come from different runs")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for e in entries:
            if e["record"] is not None:
                f.write(json.dumps(e["record"], ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    summary = summarize(entries)
    shard_summ = [json.loads((d / f"{n}.summary.json").read_text()) for n in names if (d / f"{n}.summary.json").is_file()]
    summary["shards"] = num_shards
    summary["seconds"] = round(sum(s.get("shard", {}).get("seconds_this_run", 0.0) for s in shard_summ), 3)
    summary["model_seconds"] = round(sum(s.get("shard", {}).get("model_seconds_this_run", 0.0) for s in shard_summ), 3)
    summary["output"] = str(output)
    write_text_atomic(summary_path(output), json.dumps(summary, indent=2) + "\n")
    return summary
