"""LongPO's self-evolution loop end to end on CPU, at toy scale, with the paper's Figure 4 arms
(docs/self_evolution.md).

    python examples/self_evolution/run.py                 # full run (make self-evolve)
    python examples/self_evolution/run.py --quick         # plumbing check (CI)

1. build a tokenizer and train a tiny Llama from scratch (copy runs, then two short-context
   skills: ``kv_recall``, the skill LongPO extends, and ``kv_assign``, a held-out one that the
   LongPO data never contains);
2. the model writes its own LongPO pairs through tools/generate_longpo_data.py: for a record in a
   chunk of a long document, chosen = its answer given the chunk, rejected = its answer given the
   whole document;
3. tools/preprocess_data.py, tools/precompute_reference.py (short-context reference for longpo,
   long-context reference for dpo); at step 1, the gradient norm of each loss term alone (the
   training's own grad_norm with the other term switched off), and their ratio;
4. pretrain_longpo.py once per arm with identical data, steps, batch and learning rate:
   loss.mode = longpo, dpo, sft (SFT-Chosen), sft_rejected (SFT-Rejected), several epochs, with
   in-training evaluation (the curves);
5. tools/evaluate.py on the base (its own RoPE base, and the policy's via --rope-theta) and the
   arms: long = kv_recall at the long length, short = kv_recall at the short length,
   heldout_short = kv_assign at the short length; exact match with 95% Wilson intervals, and the
   change vs the base with a paired bootstrap 95% interval; ``summary.json``, the table and PNGs.

Each stage is skipped when its output exists, so a rerun resumes; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import toy  # noqa: E402  (sibling module of this script)
from megatron_longpo.evaluation.haystack import get_haystack  # noqa: E402
from megatron_longpo.evaluation.prompts import TokenCounter  # noqa: E402
from megatron_longpo.evaluation.stats import paired_bootstrap_diff, wilson_interval  # noqa: E402
from megatron_longpo.evaluation.suite import sample_seed  # noqa: E402
from megatron_longpo.evaluation.tasks import kv_recall_question, kv_recall_values, make_instance  # noqa: E402
from megatron_longpo.fsutil import write_text_atomic  # noqa: E402
from megatron_longpo.generation.backends import ChatFormatter  # noqa: E402
from megatron_longpo.generation.chunking import chunk_document  # noqa: E402

ARMS = ("longpo", "dpo", "sft", "sft_rejected")  # the paper's Figure 4 arms (loss.mode values)
PREFERENCE_ARMS = ("longpo", "dpo")  # the arms with an NLL and a preference term
ROWS = ("base", "base_policy_rope") + ARMS  # summary.json rows
WEAK_RATIO = 0.1  # preference/NLL gradient-norm ratio below which the arms cannot be told apart


@dataclass(frozen=True)
class LoopConfig:
    short_len: int = 128  # the base model's training window (and the short evaluation length)
    long_len: int = 1024  # the target length
    base_rope_theta: float = 10000.0
    policy_rope_theta: float = 100000.0
    base_copy_steps: int = 2000  # stage 0: copy runs (toy.CopyRuns)
    base_steps: int = 300  # stage 1: kv_recall + kv_assign conversations (both learned by ~200 steps)
    base_batch: int = 32
    base_lr: float = 1e-3
    num_documents: int = 64
    max_turns: int = 2
    chunk_min_tokens: int = 48
    chunk_max_tokens: int = 96
    epochs: int = 3  # passes over the pairs, identical for every arm
    global_batch: int = 8
    lr: float = 1e-3
    beta: float = 0.1
    lam: float = 0.01
    nll_target: str = "sequence"  # the paper's: NLL over the whole chosen sequence
    eval_samples: int = 256  # final table, per cell
    eval_interval: int = 4  # in-training curve
    eval_samples_during: int = 32
    bootstrap_resamples: int = 10000
    seed: int = 0


QUICK = LoopConfig(base_copy_steps=10, base_steps=20, base_batch=8, num_documents=8, epochs=1, global_batch=4,
                   eval_samples=4, eval_interval=1, eval_samples_during=2, bootstrap_resamples=200)


def log(msg: str) -> None:
    print(f"[self-evolve {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], env: dict[str, str]) -> None:
    log("$ " + " ".join(cmd))
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    if r.returncode != 0:
        sys.exit(f"[self-evolve] stage failed (exit {r.returncode}): {' '.join(cmd)}")
    log(f"  done in {time.time() - t:.0f}s")


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]


# -- stages ---------------------------------------------------------------------------------------


def stage_base(out: Path, cfg: LoopConfig) -> None:
    """Tokenizer and the base model, trained from scratch at the short length (HF format)."""
    import torch

    hf = out / "hf_base"
    if (hf / "config.json").exists():
        return
    tok_dir = toy.build_tokenizer(out / "tokenizer")
    samples = toy.TrainingSamples(tok_dir, min_len=cfg.short_len // 3, max_len=cfg.short_len)
    # the conversations alternate the trained skill and the held-out one (never in the LongPO data)
    convs = toy.Mixture(samples, toy.TrainingSamples(tok_dir, min_len=cfg.short_len // 3, max_len=cfg.short_len,
                                                     task=toy.HELDOUT_TASK))
    shape = toy.ModelShape(rope_theta=cfg.base_rope_theta)
    model = toy.build_model(tok_dir, shape, cfg.seed)
    log(f"base model: {sum(p.numel() for p in model.parameters()):,} parameters; training {cfg.base_copy_steps} steps "
        f"of copy runs, then {cfg.base_steps} steps of {cfg.base_batch} {toy.TASK} / {toy.HELDOUT_TASK} conversations of "
        f"{cfg.short_len // 3}-{cfg.short_len} tokens")
    torch.manual_seed(cfg.seed)
    history = toy.train_base(model, toy.CopyRuns(samples), steps=cfg.base_copy_steps, batch_size=cfg.base_batch,
                             lr=cfg.base_lr, seed=cfg.seed + 1, log_every=max(1, min(250, cfg.base_copy_steps // 8)))
    history += toy.train_base(model, convs, steps=cfg.base_steps, batch_size=cfg.base_batch, lr=cfg.base_lr,
                             seed=cfg.seed, log_every=max(1, min(100, cfg.base_steps // 10)))
    tmp = out / "hf_base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for f in tok_dir.iterdir():
        shutil.copy(f, tmp / f.name)
    write_text_atomic(tmp / "base_training.json", json.dumps(history, indent=1))
    tmp.rename(hf)


def model_yaml(out: Path) -> dict:
    """The model section of the training configs, read from the base checkpoint's HF config."""
    c = json.loads((out / "hf_base" / "config.json").read_text())
    return dict(arch="llama", num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
                ffn_hidden_size=c["intermediate_size"], num_attention_heads=c["num_attention_heads"],
                num_query_groups=c["num_key_value_heads"], vocab_size=c["vocab_size"],
                max_position_embeddings=c["max_position_embeddings"], norm_epsilon=c["rms_norm_eps"],
                tie_word_embeddings=False, params_dtype="fp32", transformer_impl="local")


def stage_documents(out: Path, cfg: LoopConfig) -> None:
    """Long kv_recall documents and a question pool binding one question to each chunk.

    A question asks for a key that occurs once in the whole document, from a record inside the
    chunk, so the chunk alone answers it and the long answer is unambiguous."""
    docs, pool = out / "documents.jsonl", out / "questions.jsonl"
    if docs.exists() and pool.exists():
        return
    tok_dir = out / "tokenizer"
    counter = TokenCounter(toy.ProjectTokenizer(tok_dir))
    fmt = ChatFormatter(tok_dir)
    rng = random.Random(cfg.seed)
    budget = cfg.long_len - 64  # room for the template, the question and the answer
    doc_lines, pool_lines = [], []
    for i in range(cfg.num_documents):
        inst = make_instance(toy.TASK, toy.DOC_SEED_BASE + i, get_haystack([]), budget, counter)
        text = "".join(inst.context)
        keys = [s.split(" ")[1] for s in inst.context]
        once = {k for k in keys if keys.count(k) == 1}
        doc_id = f"kv-{i:05d}"
        doc_lines.append(json.dumps({"id": doc_id, "text": text}))
        for ch in chunk_document(text, fmt.count_tokens, cfg.chunk_min_tokens, cfg.chunk_max_tokens):
            span = text[ch.start:ch.end]
            cands = [k for k in once if kv_recall_values(span, k)]
            if cands:
                pool_lines.append(json.dumps({"document_id": doc_id, "chunk_index": ch.index,
                                              "question": kv_recall_question(rng.choice(sorted(cands)))}))
    write_text_atomic(pool, "\n".join(pool_lines) + "\n")
    write_text_atomic(docs, "\n".join(doc_lines) + "\n")
    log(f"{len(doc_lines)} documents of ~{budget} tokens, {len(pool_lines)} chunk questions")


def stage_generate(out: Path, cfg: LoopConfig, env: dict[str, str]) -> None:
    if (out / "pairs.jsonl").exists():
        return
    run([sys.executable, "tools/generate_longpo_data.py", "--input", str(out / "documents.jsonl"),
         "--output", str(out / "pairs.jsonl"), "--model", str(out / "hf_base"), "--questions",
         str(out / "questions.jsonl"), "--no-question-prefix", "--chunk-min-tokens", str(cfg.chunk_min_tokens),
         "--chunk-max-tokens", str(cfg.chunk_max_tokens), "--max-turns", str(cfg.max_turns), "--max-new-tokens", "12",
         "--min-content-words", "0", "--max-repeat-ratio-chosen", "1", "--max-repeat-ratio-rejected", "1",
         "--long-rope-theta", str(cfg.policy_rope_theta), "--seed", str(cfg.seed), "--no-progress"], env)


def stage_data(out: Path, cfg: LoopConfig, env: dict[str, str], nproc: int) -> None:
    if not (out / "data" / "train.json").exists():
        run([sys.executable, "tools/preprocess_data.py", "--input", str(out / "pairs.jsonl"), "--tokenizer",
             str(out / "tokenizer"), "--output-prefix", str(out / "data" / "train"), "--max-seq-length",
             str(cfg.long_len + 64 * cfg.max_turns), "--no-progress"], env)
    if not (out / "base" / "latest_checkpointed_iteration.txt").exists():
        run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(out / "hf_base"), "--out",
             str(out / "base"), "--dtype", "fp32"], env)
    for mode, extra in (("longpo", []), ("dpo", ["--rope-theta", str(cfg.policy_rope_theta)])):
        # longpo: the base on the SHORT contexts with its own RoPE base (the paper's reference);
        # dpo: the initial policy (raised RoPE base) on the long sequences, as standard DPO does.
        if not (out / f"ref_{mode}" / "meta.json").exists():
            run(torchrun(nproc) + ["tools/precompute_reference.py", "--load", str(out / "base"), "--data",
                                   str(out / "data" / "train"), "--output", str(out / f"ref_{mode}"), "--mode", mode,
                                   "--no-progress", *extra], env)


def train_iters(out: Path, cfg: LoopConfig) -> int:
    """Optimizer steps of every arm: ``epochs`` passes over the preprocessed pairs."""
    n = json.loads((out / "data" / "train.json").read_text())["num_samples"]
    return max(1, cfg.epochs * n // cfg.global_batch)


def train_config(out: Path, cfg: LoopConfig, arm: str, run_dir: Path, *, iters: int, lam: Optional[float] = None,
                 nll_weight: float = 1.0, evaluate: bool = True, save: bool = True) -> dict:
    """One arm's training config. Every arm gets the same data, seed, steps, batch and learning
    rate; only ``loss.mode`` (and with it the reference cache) differs. ``lam`` / ``nll_weight``
    switch a term off for the step-1 gradient-norm runs."""
    reference = {"longpo": "short", "dpo": "long"}.get(arm)
    c = {
        "model": {**model_yaml(out), "rope_theta": cfg.policy_rope_theta},
        "parallel": {"tensor_model_parallel_size": 1, "context_parallel_size": 1},
        "data": {"train_data": str(out / "data" / "train"), "max_seq_length": cfg.long_len + 64 * cfg.max_turns},
        "loss": {"mode": arm, "beta": cfg.beta, "lam": cfg.lam if lam is None else lam, "nll_weight": nll_weight,
                 "nll_target": cfg.nll_target, "logprob_chunk_size": 1024},
        "reference": ({"source": "cache", "cache_path": str(out / f"ref_{arm}"), "load": str(out / "base")}
                      if reference else {}),
        "optim": {"optimizer": "adam", "lr": cfg.lr, "lr_decay_style": "cosine", "lr_warmup_fraction": 0.1,
                  "weight_decay": 0.0, "clip_grad": 1.0},
        "training": {"micro_batch_size": 1, "global_batch_size": cfg.global_batch, "train_iters": iters,
                     "seed": cfg.seed, "eval_interval": cfg.eval_interval if evaluate else 0},
        "checkpoint": {"load": str(out / "base"), "finetune": True},
        "logging": {"log_interval": 1, "metrics_jsonl": str(run_dir / "metrics.jsonl")},
    }
    if save:
        c["checkpoint"].update({"save": str(run_dir / "ckpt"), "save_interval": iters, "keep_last": 1})
    if evaluate:
        c["evaluation"] = {"tasks": [toy.TASK, toy.HELDOUT_TASK], "lengths": [cfg.short_len, cfg.long_len],
                           "samples": cfg.eval_samples_during, "seed": cfg.seed + 1}
    return c


def _pretrain(out: Path, run_dir: Path, config: dict, env: dict[str, str], nproc: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    cfg_path = run_dir / "config.json"  # YAML is a superset of JSON
    write_text_atomic(cfg_path, json.dumps(config, indent=1))
    run([sys.executable, "-m", "megatron_longpo.launch", "--nproc-per-node", str(nproc), "pretrain_longpo.py",
         "--config", str(cfg_path)], env)


def _metrics(path: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("split") == split]


def stage_grad_norms(out: Path, cfg: LoopConfig, env: dict[str, str], nproc: int) -> dict:
    """Per arm with both terms: the step-1 gradient norm of each term alone, measured by the
    training itself (its grad_norm before clipping, one step from the base on the first global
    batch) with the other term's weight set to 0, and the ratio preference / NLL."""
    res_path = out / "grad_norms.json"
    if res_path.exists():
        return json.loads(res_path.read_text())
    res = {}
    for arm in PREFERENCE_ARMS:
        norms = {}
        for term, kw in (("nll", dict(lam=0.0, nll_weight=1.0)), ("preference", dict(lam=cfg.lam, nll_weight=0.0))):
            run_dir = out / "grad_norms" / f"{arm}_{term}"
            _pretrain(out, run_dir, train_config(out, cfg, arm, run_dir, iters=1, evaluate=False, save=False, **kw),
                      env, nproc)
            (step1,) = _metrics(run_dir / "metrics.jsonl", "train")
            norms[term] = step1["grad_norm"]
        res[arm] = {"nll_grad_norm": norms["nll"], "preference_grad_norm": norms["preference"],
                    "grad_ratio": norms["preference"] / norms["nll"]}
    write_text_atomic(res_path, json.dumps(res, indent=1) + "\n")
    return res


def stage_train(out: Path, cfg: LoopConfig, arm: str, env: dict[str, str], nproc: int) -> None:
    run_dir, iters = out / arm, train_iters(out, cfg)
    done = run_dir / "ckpt" / "latest_checkpointed_iteration.txt"
    if done.exists() and int(done.read_text().strip() or 0) >= iters:
        return
    _pretrain(out, run_dir, train_config(out, cfg, arm, run_dir, iters=iters), env, nproc)


def stage_evaluate(out: Path, cfg: LoopConfig, env: dict[str, str], nproc: int) -> dict[str, dict]:
    """{row: evaluation entry}: the base at its own RoPE base, at the policy's (--rope-theta), and
    every arm's final checkpoint, on one suite (the same samples in every row)."""
    suite = ["--tasks", f"{toy.TASK},{toy.HELDOUT_TASK}", "--lengths", f"{cfg.short_len},{cfg.long_len}",
             "--samples", str(cfg.eval_samples), "--seed", str(cfg.seed + 1), "--no-progress"]
    res, res_rope = out / "eval.json", out / "eval_base_policy_rope.json"
    if not res.exists():
        plot = ["--plot", str(out / "accuracy_vs_length.png")] if _has_matplotlib() else []
        run(torchrun(nproc) + ["tools/evaluate.py", "--load", str(out / "base"), *[str(out / a / "ckpt") for a in ARMS],
                               "--labels", ",".join(("base",) + ARMS), *suite, "--output", str(res), *plot], env)
    if not res_rope.exists():
        run(torchrun(nproc) + ["tools/evaluate.py", "--load", str(out / "base"), "--labels", "base_policy_rope",
                               "--rope-theta", str(cfg.policy_rope_theta), *suite, "--output", str(res_rope)], env)
    entries = json.loads(res.read_text())["checkpoints"] + json.loads(res_rope.read_text())["checkpoints"]
    return {e["label"]: e for e in entries}


def _has_matplotlib() -> bool:
    try:  # optional: the PNGs need matplotlib
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# -- report ---------------------------------------------------------------------------------------

# summary metric -> (task, length attribute of LoopConfig)
CELLS = {"long": (toy.TASK, "long_len"), "short": (toy.TASK, "short_len"), "heldout_short": (toy.HELDOUT_TASK, "short_len")}


def _per_sample(entry: dict, task: str, length: int, key: str) -> list[float]:
    """One score per sample of a cell, in seed order (so rows pair up sample by sample)."""
    rows = sorted((s for s in entry["samples"] if s["task"] == task and s["length"] == length), key=lambda s: s["seed"])
    return [float(s[key]) for s in rows]


def summarize(out: Path, cfg: LoopConfig, entries: dict[str, dict], grads: dict) -> dict:
    """summary.json, computed from the evaluation outputs' per-sample scores only."""
    summary: dict = {"short_length": cfg.short_len, "long_length": cfg.long_len, "samples_per_cell": cfg.eval_samples,
                     "tasks": {"long": toy.TASK, "short": toy.TASK, "heldout_short": toy.HELDOUT_TASK},
                     "train_iters": train_iters(out, cfg)}
    base = entries["base"]
    for row in ROWS:
        e, r = entries[row], {"rope_theta": entries[row]["rope_theta"]}
        for name, (task, attr) in CELLS.items():
            length = getattr(cfg, attr)
            exact = _per_sample(e, task, length, "exact")
            r[name] = sum(exact) / len(exact)
            r[f"{name}_ci"] = list(wilson_interval(int(sum(exact)), len(exact)))
            if row != "base":  # change vs the base (own RoPE), paired over the same samples
                d, lo, hi = paired_bootstrap_diff(_per_sample(base, task, length, "exact"), exact,
                                                  resamples=cfg.bootstrap_resamples, seed=cfg.seed)
                r[f"{name}_change"], r[f"{name}_change_ci"] = d, [lo, hi]
        ll = _per_sample(e, toy.TASK, cfg.long_len, "loglik")
        r["long_loglik"] = sum(ll) / len(ll)
        if row != "base":
            d, lo, hi = paired_bootstrap_diff(_per_sample(base, toy.TASK, cfg.long_len, "loglik"), ll,
                                              resamples=cfg.bootstrap_resamples, seed=cfg.seed)
            r["long_loglik_change"], r["long_loglik_change_ci"] = d, [lo, hi]
        if row in ARMS:
            r["grad_ratio"] = grads[row]["grad_ratio"] if row in grads else None
        summary[row] = r
    summary["grad_norms_step1"] = grads
    summary["grad_note"] = grad_note(grads)
    summary["heldout_base_ok"] = summary["base"]["heldout_short"] >= 0.8
    gen = json.loads((out / "pairs.summary.json").read_text()) if (out / "pairs.summary.json").exists() else {}
    summary["data"] = _pair_stats(out / "pairs.jsonl") | ({"generation": gen} if gen else {})
    summary["config"] = dataclasses.asdict(cfg)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def grad_note(grads: dict) -> str:
    parts = []
    for arm, g in grads.items():
        verdict = (f"too weak for the arms to differ (below {WEAK_RATIO})" if g["grad_ratio"] < WEAK_RATIO
                   else "strong enough to matter")
        parts.append(f"{arm}: at step 1 the preference term's gradient norm is {g['grad_ratio']:.3g} x the NLL's "
                     f"({g['preference_grad_norm']:.3g} vs {g['nll_grad_norm']:.3g}): {verdict}")
    return "; ".join(parts)


def _pair_stats(path: Path) -> dict:
    """How often the model's own short (chosen) and long (rejected) answers are right."""
    right_c = right_r = same = n = 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for t in rec["turns"]:
            key = re.fullmatch(r"What is the value of key (\S+)\?", t["instruction"]).group(1)
            (value,) = kv_recall_values(rec["document"], key)
            right_c += t["chosen"].strip() == f"Key {key} {value}."
            right_r += t["rejected"].strip() == f"Key {key} {value}."
            same += t["chosen"] == t["rejected"]
            n += 1
    return {"pairs": n, "chosen_correct": right_c / max(1, n), "rejected_correct": right_r / max(1, n),
            "chosen_equals_rejected": same / max(1, n)}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(summary: dict) -> str:
    s, l = summary["short_length"], summary["long_length"]
    rows = [f"| model | long ({l} tokens) | short ({s} tokens) | held-out short ({s} tokens) | "
            "long change vs base | short change vs base | held-out change vs base | grad_ratio |",
            "|---|---|---|---|---|---|---|---|"]
    for label in ROWS:
        r = summary[label]
        cells = [f"{_pct(r[k])}% [{_pct(r[k + '_ci'][0])}, {_pct(r[k + '_ci'][1])}]" for k in CELLS]
        changes = ([f"{100 * r[k + '_change']:+.1f} [{100 * r[k + '_change_ci'][0]:+.1f}, {100 * r[k + '_change_ci'][1]:+.1f}]"
                    for k in CELLS] if label != "base" else ["", "", ""])
        ratio = r.get("grad_ratio")
        rows.append(f"| {label} | " + " | ".join(cells + changes) + f" | {'' if ratio is None else f'{ratio:.3g}'} |")
    return "\n".join(rows)


def plot_curves(out: Path, cfg: LoopConfig, entries: dict[str, dict]) -> None:
    """Long and short metrics against training step per arm (the paper's Figure 4 shape). Step 0
    is the base at the policy's RoPE base (what every arm starts from) on the same first
    ``eval_samples_during`` samples the in-training evaluation scores."""
    if not _has_matplotlib():
        return
    import matplotlib  # optional dependency, checked above

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("long exact match", toy.TASK, cfg.long_len, "accuracy", "exact"),
              ("long answer log-likelihood", toy.TASK, cfg.long_len, "loglik", "loglik"),
              ("short exact match", toy.TASK, cfg.short_len, "accuracy", "exact"),
              ("held-out short exact match", toy.HELDOUT_TASK, cfg.short_len, "accuracy", "exact")]
    first = {sample_seed(cfg.seed + 1, i) for i in range(cfg.eval_samples_during)}
    start = entries["base_policy_rope"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (title, task, length, metric, field) in zip(axes, panels):
        s0 = [x[field] for x in start["samples"] if x["task"] == task and x["length"] == length and x["seed"] in first]
        for arm in ARMS:
            pts = [(0, sum(s0) / len(s0))]
            path = out / arm / "metrics.jsonl"
            for rec in _metrics(path, "eval") if path.exists() else []:
                key = f"{task}/len{length}/{metric}"
                if key in rec:
                    pts.append((rec["step"], rec[key]))
            ax.plot(*zip(*pts), marker="o", ms=3, label=arm)
        ax.set_title(f"{title}\n({task}, {length} tokens)", fontsize=9)
        ax.set_xlabel("training step")
        if metric == "accuracy":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = out / ".accuracy_vs_step.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out / "accuracy_vs_step.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/self_evolution")
    ap.add_argument("--quick", action="store_true", help="a few steps of everything (the CI plumbing check)")
    ap.add_argument("--fresh", action="store_true", help="delete --out first")
    ap.add_argument("--nproc", type=int, default=2, help="processes for precompute, training and evaluation")
    a = ap.parse_args()
    cfg = QUICK if a.quick else LoopConfig()
    out = (ROOT / a.out).resolve() if not os.path.isabs(a.out) else Path(a.out)
    if a.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    stage_base(out, cfg)
    stage_documents(out, cfg)
    stage_generate(out, cfg, env)
    stage_data(out, cfg, env, a.nproc)
    grads = stage_grad_norms(out, cfg, env, a.nproc)
    for arm in ARMS:
        stage_train(out, cfg, arm, env, a.nproc)
    entries = stage_evaluate(out, cfg, env, a.nproc)
    summary = summarize(out, cfg, entries, grads)
    plot_curves(out, cfg, entries)
    print()
    print(table(summary))
    d = summary["data"]
    print(f"\npairs: {d['pairs']}; the base's own answers were right {100 * d['chosen_correct']:.0f}% of the time "
          f"from the chunk (chosen) and {100 * d['rejected_correct']:.0f}% from the whole document (rejected)")
    print(summary["grad_note"])
    if not summary["heldout_base_ok"]:
        print(f"warning: the base scores only {100 * summary['base']['heldout_short']:.1f}% on the held-out skill "
              f"({toy.HELDOUT_TASK}); its retention numbers say little")
    log(f"finished in {time.time() - t0:.0f}s; {out / 'summary.json'}")


if __name__ == "__main__":
    main()
