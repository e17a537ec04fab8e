"""The toy world of the CPU self-evolution loop: a tokenizer, documents, a question pool and the
from-scratch base model, all built offline from seeds.

The skill is the ``kv_recall`` evaluation task (megatron_longpo/evaluation/tasks.py): a context of
``key bako plum.`` records, one per paragraph, and the question ``What is the value of key
bako?``. The base model is trained on it at SHORT lengths only; the loop then makes
it good at LONG lengths with its own answers (LongPO), see README.md next to this file.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_longpo.data.templates import get_template
from megatron_longpo.data.tokenizer import Tokenizer as ProjectTokenizer
from megatron_longpo.evaluation.haystack import get_haystack
from megatron_longpo.evaluation.prompts import TokenCounter, make_sample
from megatron_longpo.evaluation.tasks import (
    KV_KEYS,
    KV_VALUES,
    kv_assign_question,
    kv_assign_record,
    kv_record,
    kv_recall_question,
)
from megatron_longpo.generation.backends import CHATML_TEMPLATE

TASK = "kv_recall"
# The held-out short skill: the same lookup in another format (records ``let bako plum;``), trained
# into the base next to TASK and never part of the LongPO data (docs/self_evolution.md).
HELDOUT_TASK = "kv_assign"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Seeds of training material start here; the evaluation suites use suite_seed * 100003 + i (small).
TRAIN_SEED_BASE = 1_000_000_000
DOC_SEED_BASE = 2_000_000_000


def _corpus(n: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    words = list(KV_KEYS) + list(KV_VALUES)
    for _ in range(n):
        k = rng.choice(KV_KEYS)
        yield (f"<|im_start|>user{kv_record(k, rng.choice(KV_VALUES))}\n\n{kv_recall_question(k)}"
               f"<|im_end|>\n<|im_start|>assistant\nKey {k} {rng.choice(KV_VALUES)}.<|im_end|>\n "
               + " ".join(rng.choice(words) for _ in range(8)))
        yield (f"<|im_start|>user{kv_assign_record(k, rng.choice(KV_VALUES))}\n\n{kv_assign_question(k)}"
               f"<|im_end|>\n<|im_start|>assistant\nLet {k} {rng.choice(KV_VALUES)}.<|im_end|>\n")


def build_tokenizer(out: Path, vocab_size: int = 1024) -> Path:
    """A byte-level BPE in which every key word and value is one token (with its leading space).

    Newlines are split off before BPE, so text tokenized in pieces split at newlines gives the
    same ids as the joined text: the evaluation's piecewise tokenization, preprocessing's
    whole-conversation tokenization and the generation prompts all agree.
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(20000, 0), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    multi = [w for w in (*KV_KEYS, *KV_VALUES) if len(fast.encode(" " + w, add_special_tokens=False)) != 1]
    if multi:
        raise RuntimeError(f"toy tokenizer splits {multi}; raise vocab_size")
    return out


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    ffn_hidden_size: int = 384
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096


def build_model(tokenizer_dir: Path, shape: ModelShape, seed: int) -> transformers.LlamaForCausalLM:
    vocab = len(transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    vocab = int(math.ceil(vocab / 64) * 64)  # a TP-friendly padded vocabulary
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=shape.hidden_size, intermediate_size=shape.ffn_hidden_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=False,
        eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg)


class TrainingSamples:
    """kv_recall conversations for from-scratch training, rendered with the tokenizer's ChatML
    template: the evaluation's context (at a random length up to ``max_len``) and question, then
    ``turns - 1`` follow-up questions about other keys of the same context (multi-turn, as
    LongPO records are), each answered ``Key K V.``; the loss is on the assistant tokens.
    The blank line before the first record is dropped at random, because LongPO's short contexts
    (paragraph-trimmed chunks) start without one."""

    def __init__(self, tokenizer_dir: Path, min_len: int, max_len: int, turns: int = 4, task: str = TASK):
        self.task = task
        self.tok = ProjectTokenizer(tokenizer_dir)
        self.template = get_template("tokenizer", self.tok)
        self.counter = TokenCounter(self.tok)
        self.haystack = get_haystack([])
        self.min_len, self.max_len, self.turns = min_len, max_len, turns

    def sample(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = random.Random(seed)
        length = rng.randint(self.min_len, self.max_len)
        s = make_sample(self.task, length, TRAIN_SEED_BASE + seed, self.template, self.counter, self.haystack)
        inst = s.instance
        context = "".join(inst.context)
        if rng.random() < 0.5:
            context = context[2:] if context.startswith("\n\n") else context
        parse = _FORMATS[self.task][0]
        records = dict(parse(r) for r in inst.context)
        keys = [parse(r)[0] for r in inst.context]
        first = parse(inst.needles[0])[0]
        others = [k for k in dict.fromkeys(keys) if keys.count(k) == 1 and k != first]
        asked = [first] + rng.sample(others, min(len(others), self.turns - 1))
        segments: list[tuple[str, int]] = []
        question, answer = _FORMATS[self.task][1:]
        for i, k in enumerate(asked):
            user = (context + "\n\n" + question(k)) if i == 0 else question(k)
            segments.append((("" if i == 0 else "\n") + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", 0))
            segments.append((answer(k, records[k]) + "<|im_end|>", 1))
        ids = [self.counter.ids(t) for t, _ in segments]
        tokens = np.concatenate(ids)
        mask = np.concatenate([np.full(len(x), m, np.int64) for x, (_, m) in zip(ids, segments)])
        return tokens, mask


class CopyRuns:
    """Stage 0 of the base: a run of distinct key/value tokens after a random prefix, then the run
    again, with the loss on the repeat. Only content matching solves it (the repeat starts at a
    random offset), so it grows the find-the-earlier-occurrence-and-copy-the-next-token circuit
    that kv_recall needs, on 10-20x denser targets than conversations give. Measured on this
    model: the loss leaves its plateau after ~900 steps at lr 1e-3 (docs/self_evolution.md)."""

    def __init__(self, samples: "TrainingSamples", max_run: int = 24):
        self.tok = samples.tok
        self.words = sorted({int(samples.counter.ids(" " + w)[0]) for w in (*KV_KEYS, *KV_VALUES)})
        self.max_run = max_run

    def sample(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = random.Random(seed)
        n = rng.randint(4, self.max_run)
        pre = rng.randint(0, self.max_run - n)
        x = rng.sample(self.words, n + pre)
        tokens = np.array(x + x[pre:], np.int64)
        mask = np.zeros(len(tokens), np.int64)
        mask[n + pre + 1:] = 1
        return tokens, mask


def _record(text: str) -> tuple[str, str]:
    """(key, value) of a kv_recall record."""
    _, key, value = text.strip().rstrip(".").split(" ")
    return key, value


def _assign_record(text: str) -> tuple[str, str]:
    """(key, value) of a kv_assign record."""
    _, key, value = text.strip().rstrip(";").split(" ")
    return key, value


# task -> (record parser, question, assistant answer): the conversation format of each trained skill.
_FORMATS = {
    TASK: (_record, kv_recall_question, lambda k, v: f"Key {k} {v}."),
    HELDOUT_TASK: (_assign_record, kv_assign_question, lambda k, v: f"Let {k} {v}."),
}


class Mixture:
    """Samples of several sources, the source picked by the seed (a fixed interleaving)."""

    def __init__(self, *sources):
        self.sources = sources
        self.tok = sources[0].tok

    def sample(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sources[seed % len(self.sources)].sample(seed)


def batches(samples: TrainingSamples, batch_size: int, seed: int, pad_id: int) -> Iterator[tuple[torch.Tensor, ...]]:
    step = 0
    while True:
        rows = [samples.sample(seed * 10_000_019 + step * batch_size + i) for i in range(batch_size)]
        n = max(len(t) for t, _ in rows)
        ids = torch.full((batch_size, n), pad_id, dtype=torch.long)
        lab = torch.full((batch_size, n), -100, dtype=torch.long)
        for b, (t, m) in enumerate(rows):
            ids[b, : len(t)] = torch.from_numpy(t)
            target = torch.from_numpy(np.where(m[1:] > 0, t[1:], -100))
            lab[b, : len(t) - 1] = target  # label of position p is the token at p + 1
        yield ids, lab
        step += 1


def train_base(model: transformers.LlamaForCausalLM, samples: TrainingSamples, *, steps: int, batch_size: int,
               lr: float, seed: int, log_every: int = 100) -> list[dict]:
    """Plain AdamW with warmup + cosine, loss on the assistant tokens only."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    log, t0, acc_sum, n_sum, loss_sum = [], time.time(), 0.0, 0, 0.0
    for step, (ids, lab) in zip(range(steps), batches(samples, batch_size, seed, samples.tok.pad_id)):
        logits = model(input_ids=ids).logits[:, :-1]
        tgt = lab[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            valid = tgt != -100
            acc_sum += float(((logits.argmax(-1) == tgt) & valid).sum()) / max(1, int(valid.sum()))
            loss_sum += float(loss)
            n_sum += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            el = time.time() - t0
            rec = {"step": step + 1, "loss": loss_sum / n_sum, "token_acc": acc_sum / n_sum}
            log.append(rec)
            eta = el / (step + 1) * (steps - step - 1)
            print(f"[base] step {step + 1}/{steps} loss {rec['loss']:.4f} assistant-token acc {rec['token_acc']:.3f} "
                  f"({el:.0f}s, ETA {eta:.0f}s)", flush=True)
            acc_sum, n_sum, loss_sum = 0.0, 0, 0.0
    model.eval()
    return log
