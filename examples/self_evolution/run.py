"""LongPO's self-evolution loop end to end on CPU, at toy scale (docs/self_evolution.md).

    python examples/self_evolution/run.py                 # full run (make self-evolve)
    python examples/self_evolution/run.py --quick         # plumbing check (CI)

1. build a tokenizer and train a tiny Llama from scratch (copy runs, then ``kv_recall`` at SHORT lengths only);
2. the model writes its own LongPO pairs through tools/generate_longpo_data.py: for a record in a
   chunk of a long document, chosen = its answer given the chunk, rejected = its answer given the
   whole document (questions come from the task template via --questions);
3. tools/preprocess_data.py, tools/precompute_reference.py (short-context reference for longpo,
   long-context reference for the dpo baseline), then pretrain_longpo.py three times with the
   same data and budget: loss.mode = longpo, sft, dpo (policy rope_theta raised in all three);
4. tools/evaluate.py on base and the three policies at the short and the long length; the table,
   ``summary.json``, accuracy-vs-length and accuracy-vs-step PNGs.

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
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import toy  # noqa: E402  (sibling module of this script)
from megatron_longpo.evaluation.haystack import get_haystack  # noqa: E402
from megatron_longpo.evaluation.prompts import TokenCounter  # noqa: E402
from megatron_longpo.evaluation.tasks import kv_recall_question, kv_recall_values, make_instance  # noqa: E402
from megatron_longpo.fsutil import write_text_atomic  # noqa: E402
from megatron_longpo.generation.backends import ChatFormatter  # noqa: E402
from megatron_longpo.generation.chunking import chunk_document  # noqa: E402

METHODS = ("longpo", "sft", "dpo")


@dataclass(frozen=True)
class LoopConfig:
    short_len: int = 128  # the base model's training window (and the short evaluation length)
    long_len: int = 1024  # the target length
    base_rope_theta: float = 10000.0
    policy_rope_theta: float = 100000.0
    base_copy_steps: int = 2000  # stage 0: copy runs (toy.CopyRuns)
    base_steps: int = 1500  # stage 1: kv_recall conversations
    base_batch: int = 32
    base_lr: float = 1e-3
    num_documents: int = 128
    max_turns: int = 2
    chunk_min_tokens: int = 48
    chunk_max_tokens: int = 96
    train_iters: int = 32
    global_batch: int = 8
    lr: float = 1e-3
    beta: float = 0.1
    lam: float = 0.01
    nll_target: str = "responses"
    eval_samples: int = 64  # final table
    eval_interval: int = 4  # in-training curve
    eval_samples_during: int = 24
    seed: int = 0


QUICK = LoopConfig(base_copy_steps=10, base_steps=20, base_batch=8, num_documents=6, train_iters=2, global_batch=4, eval_samples=4,
                   eval_interval=1, eval_samples_during=2)


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
    shape = toy.ModelShape(rope_theta=cfg.base_rope_theta)
    model = toy.build_model(tok_dir, shape, cfg.seed)
    log(f"base model: {sum(p.numel() for p in model.parameters()):,} parameters; training {cfg.base_copy_steps} steps "
        f"of copy runs, then {cfg.base_steps} steps of {cfg.base_batch} kv_recall conversations of "
        f"{cfg.short_len // 3}-{cfg.short_len} tokens")
    torch.manual_seed(cfg.seed)
    history = toy.train_base(model, toy.CopyRuns(samples), steps=cfg.base_copy_steps, batch_size=cfg.base_batch,
                             lr=cfg.base_lr, seed=cfg.seed + 1, log_every=max(1, min(250, cfg.base_copy_steps // 8)))
    history += toy.train_base(model, samples, steps=cfg.base_steps, batch_size=cfg.base_batch, lr=cfg.base_lr,
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


def train_config(out: Path, cfg: LoopConfig, method: str) -> dict:
    return {
        "model": {**model_yaml(out), "rope_theta": cfg.policy_rope_theta},
        "parallel": {"tensor_model_parallel_size": 1, "context_parallel_size": 1},
        "data": {"train_data": str(out / "data" / "train"), "max_seq_length": cfg.long_len + 64 * cfg.max_turns},
        "loss": {"mode": method, "beta": cfg.beta, "lam": cfg.lam, "nll_target": cfg.nll_target,
                 "logprob_chunk_size": 1024},
        "reference": ({"source": "cache", "cache_path": str(out / f"ref_{method}"), "load": str(out / "base")}
                      if method != "sft" else {}),
        "optim": {"optimizer": "adam", "lr": cfg.lr, "lr_decay_style": "cosine", "lr_warmup_fraction": 0.1,
                  "weight_decay": 0.0, "clip_grad": 1.0},
        "training": {"micro_batch_size": 1, "global_batch_size": cfg.global_batch, "train_iters": cfg.train_iters,
                     "seed": cfg.seed, "eval_interval": cfg.eval_interval},
        "checkpoint": {"save": str(out / method / "ckpt"), "load": str(out / "base"), "finetune": True,
                       "save_interval": cfg.train_iters, "keep_last": 1},
        "logging": {"log_interval": 1, "metrics_jsonl": str(out / method / "metrics.jsonl")},
        "evaluation": {"tasks": [toy.TASK], "lengths": [cfg.short_len, cfg.long_len],
                       "samples": cfg.eval_samples_during, "seed": cfg.seed + 1},
    }


def stage_train(out: Path, cfg: LoopConfig, method: str, env: dict[str, str], nproc: int) -> None:
    run_dir = out / method
    if (run_dir / "ckpt" / "latest_checkpointed_iteration.txt").exists():
        it = int((run_dir / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() or 0)
        if it >= cfg.train_iters:
            return
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.json"  # YAML is a superset of JSON
    write_text_atomic(cfg_path, json.dumps(train_config(out, cfg, method), indent=1))
    run([sys.executable, "-m", "megatron_longpo.launch", "--nproc-per-node", str(nproc), "pretrain_longpo.py",
         "--config", str(cfg_path)], env)


def stage_evaluate(out: Path, cfg: LoopConfig, env: dict[str, str], nproc: int) -> dict:
    res = out / "eval.json"
    if not res.exists():
        loads = [str(out / "base")] + [str(out / m / "ckpt") for m in METHODS]
        plot = ["--plot", str(out / "accuracy_vs_length.png")] if _has_matplotlib() else []
        run(torchrun(nproc) + ["tools/evaluate.py", "--load", *loads, "--labels", ",".join(("base",) + METHODS),
                               "--tasks", toy.TASK, "--lengths", f"{cfg.short_len},{cfg.long_len}", "--samples",
                               str(cfg.eval_samples), "--seed", str(cfg.seed + 1), "--output", str(res),
                               "--no-progress", *plot], env)
    return json.loads(res.read_text())


def _has_matplotlib() -> bool:
    try:  # optional: the PNGs need matplotlib
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# -- report ---------------------------------------------------------------------------------------


def summarize(out: Path, cfg: LoopConfig, doc: dict) -> dict:
    acc = {c["label"]: c["results"][toy.TASK] for c in doc["checkpoints"]}
    s, l = str(cfg.short_len), str(cfg.long_len)
    summary = {"short_length": cfg.short_len, "long_length": cfg.long_len}
    for label, cells in acc.items():
        summary[label] = {"short": cells[s]["accuracy"], "long": cells[l]["accuracy"],
                          "short_loglik": cells[s]["mean_loglik"], "long_loglik": cells[l]["mean_loglik"]}
    gen = json.loads((out / "pairs.summary.json").read_text()) if (out / "pairs.summary.json").exists() else {}
    summary["data"] = _pair_stats(out / "pairs.jsonl") | ({"generation": gen} if gen else {})
    summary["samples_per_cell"] = cfg.eval_samples
    summary["config"] = dataclasses.asdict(cfg)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


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


def table(summary: dict) -> str:
    s, l = summary["short_length"], summary["long_length"]
    rows = [f"| model | short ({s} tokens) | long ({l} tokens) |", "|---|---|---|"]
    for label in ("base",) + METHODS:
        if label in summary:
            r = summary[label]
            rows.append(f"| {label} | {100 * r['short']:.1f}% | {100 * r['long']:.1f}% |")
    return "\n".join(rows)


def plot_curves(out: Path, cfg: LoopConfig, summary: dict) -> None:
    """Accuracy against training step per method at both lengths (the paper's Figure 4 shape)."""
    if not _has_matplotlib():
        return
    import matplotlib  # optional dependency, checked above

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, (name, length) in zip(axes, (("short", cfg.short_len), ("long", cfg.long_len))):
        key = f"{toy.TASK}/len{length}/accuracy"
        for m in METHODS:
            pts = [(0, summary["base"][name])] if "base" in summary else []
            path = out / m / "metrics.jsonl"
            for line in path.read_text().splitlines() if path.exists() else []:
                rec = json.loads(line)
                if rec.get("split") == "eval" and key in rec:
                    pts.append((rec["step"], rec[key]))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_title(f"{name} context ({length} tokens)")
        ax.set_xlabel("training step")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{toy.TASK} exact match")
    axes[0].legend()
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
    ap.add_argument("--methods", default=",".join(METHODS), help="subset of longpo,sft,dpo to train")
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
    for m in [m for m in a.methods.split(",") if m]:
        if m not in METHODS:
            sys.exit(f"--methods: unknown method {m!r}; choose from {','.join(METHODS)}")
        stage_train(out, cfg, m, env, a.nproc)
    doc = stage_evaluate(out, cfg, env, a.nproc)
    summary = summarize(out, cfg, doc)
    plot_curves(out, cfg, summary)
    print()
    print(table(summary))
    d = summary["data"]
    print(f"\npairs: {d['pairs']}; the base's own answers were right {100 * d['chosen_correct']:.0f}% of the time "
          f"from the chunk (chosen) and {100 * d['rejected_correct']:.0f}% from the whole document (rejected)")
    log(f"finished in {time.time() - t0:.0f}s; {out / 'summary.json'}")


if __name__ == "__main__":
    main()
