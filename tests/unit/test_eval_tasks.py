"""Synthetic evaluation tasks: every needle / answer value occurs exactly once in the context, the
scored tokens are exactly the answer, lengths are met, and everything is a function of the seed.

Checked with the bundled sentencepiece tokenizer (mistral template), with a byte-level BPE HF
tokenizer through its own Jinja chat template (decoded tokens == the tokenizer's
``apply_chat_template`` text up to the answer), and with a user-document haystack that itself
contains digits and needle-like sentences.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_longpo.config import ConfigError, LongPOConfig, ParallelConfig, validate
from megatron_longpo.data.synthetic import corpus, make_hf_tokenizer
from megatron_longpo.data.templates import get_template
from megatron_longpo.data.tokenizer import Tokenizer
from megatron_longpo.evaluation.haystack import FillerHaystack, from_files
from megatron_longpo.evaluation.prompts import TokenCounter, make_sample
from megatron_longpo.evaluation.setup import SuiteOptions, build_evaluator
from megatron_longpo.evaluation.tasks import TASK_NAMES, get_task
from megatron_longpo.testing.evaluation import task_samples_digest

ROOT = Path(__file__).resolve().parents[2]
SP_TOKENIZER = ROOT / "examples" / "data" / "tokenizer.model"
LENGTHS = (600, 1500, 4000)


@pytest.fixture(scope="module")
def sp():
    tok = Tokenizer(SP_TOKENIZER)
    return tok, get_template("auto", tok), TokenCounter(tok)


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """User documents with digits, a needle-like sentence, a real needle's wording and a long
    unpunctuated run."""
    d = tmp_path_factory.mktemp("hay")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(300):
        lines.append(f"Report {i} counted {int(rng.integers(0, 10**8))} items in the harbour.")
        if i % 50 == 0:
            lines.append("One of the special magic numbers for amber-falcon is: 1234567. VAR ABCDE = 12345.")
    (d / "a.txt").write_text(" ".join(lines[:150]))
    (d / "b.jsonl").write_text("\n".join('{"text": "%s"}' % s for s in lines[150:]))
    (d / "c.md").write_text(" ".join(["plain words without any stop"] * 200))  # no sentence ends: cut into pieces
    return from_files([d])


def _check(sample, tok, length, slack=None):
    inst = sample.instance
    doc = inst.document
    for needle in inst.needles:
        assert doc.count(needle) == 1, (inst.task, inst.seed, needle)
    for value in inst.answer_values:
        assert doc.count(value) == 1, (inst.task, inst.seed, value)
    assert tok.decode(sample.answer_tokens).strip() == inst.answer.strip()
    assert np.array_equal(sample.answer_tokens, tok.encode(inst.answer))  # the answer piece, nothing else
    assert sample.answer_mask[-1] == 1 and sample.answer_mask.sum() == len(tok.encode(inst.answer))
    # Within one haystack sentence of the target.
    slack = slack or max(len(tok.encode(p)) for p in inst.context)
    assert length - slack < len(sample.tokens) <= length
    if inst.task == "niah_multivalue":  # values answered in text order
        values = inst.answer.strip().split(", ")
        assert sorted(values, key=doc.index) == values


def test_answers_present_exactly_once_filler(sp):
    tok, tpl, counter = sp
    hay = FillerHaystack()
    for task in TASK_NAMES:
        for seed in range(12):
            for length in LENGTHS:
                _check(make_sample(task, length, seed, tpl, counter, hay), tok, length)


def test_answers_present_exactly_once_documents(sp, documents):
    tok, tpl, counter = sp
    longest = max(len(tok.encode(x)) for x in documents._sentences)
    for task in TASK_NAMES:
        for seed in range(8):
            for length in LENGTHS[:2]:
                s = make_sample(task, length, seed, tpl, counter, documents)
                own = get_task(task).own_haystack is not None  # kv_*: their haystack is their own distractors
                _check(s, tok, length, slack=None if own else longest)
                if not own:
                    assert " counted " in s.instance.document or "plain words" in s.instance.document


def test_hf_tokenizer_and_its_chat_template(tmp_path):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    tok = Tokenizer(make_hf_tokenizer(tmp_path / "tok", corpus(1), template, vocab_size=600))
    tpl = get_template("auto", tok)
    assert tpl.name == "tokenizer"
    for task in ("niah_multiquery", "variable_tracking"):
        s = make_sample(task, 3000, 5, tpl, TokenCounter(tok), FillerHaystack())
        inst = s.instance
        want = tok._hf.apply_chat_template(
            [{"role": "user", "content": inst.intro + inst.document + inst.question},
             {"role": "assistant", "content": inst.answer_prefix + inst.answer}], tokenize=False)
        want = want[: want.rindex(inst.answer) + len(inst.answer)]
        assert tok.decode(s.tokens) == want
        _check(s, tok, 3000)


def _digest(seed: int) -> str:
    return task_samples_digest(SP_TOKENIZER, seed)


def test_deterministic_from_seed(sp):
    tok, tpl, counter = sp
    assert _digest(3) == _digest(3) != _digest(4)
    # Another interpreter with another hash seed produces the same bytes.
    code = ("from megatron_longpo.testing.evaluation import task_samples_digest; "
            f"print(task_samples_digest({str(SP_TOKENIZER)!r}, 3))")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(3)
    # The same seed asks the same question with the same answer at every length.
    for task in TASK_NAMES:
        short, long = (make_sample(task, n, 7, tpl, counter, FillerHaystack()).instance for n in (700, 4000))
        assert (short.question, short.answer, short.needles) == (long.question, long.answer, long.needles)
        assert len(long.context) > len(short.context)


def test_bad_options_fail_early(sp):
    tok, tpl, _ = sp
    cfg = LongPOConfig()
    cfg.evaluation.tasks, cfg.evaluation.lengths = ["niah_single"], [512]
    with pytest.raises(ConfigError, match="training.eval_interval"):
        validate(cfg)
    cfg.training.eval_interval = 5
    cfg.evaluation.lengths = [0]
    with pytest.raises(ConfigError, match="evaluation.lengths"):
        validate(cfg)

    def build(**kw):
        o = dict(tasks=["niah_single"], lengths=[512], samples=1, seed=0, tokenizer=str(SP_TOKENIZER))
        o.update(kw)
        return build_evaluator(SuiteOptions(**o), tok, tpl, vocab_size=768, parallel=ParallelConfig())

    with pytest.raises(ConfigError, match="unknown task.*niah_singel.*choose from"):
        build(tasks=["niah_singel"])
    with pytest.raises(ConfigError, match="cannot hold its needles.*length 300"):
        build(tasks=["niah_multikey"], lengths=[300])
    with pytest.raises(ConfigError, match="does not belong to this model"):
        build_evaluator(SuiteOptions(["niah_single"], [512], 1, 0, str(SP_TOKENIZER)), tok, tpl, vocab_size=100,
                        parallel=ParallelConfig())
    with pytest.raises(ConfigError, match="does not exist"):
        build(haystack=["/nonexistent/haystack"])
    assert len(build(samples=2).samples) == 2


@pytest.fixture(scope="module")
def hf_chatml(tmp_path_factory):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    return Tokenizer(make_hf_tokenizer(tmp_path_factory.mktemp("tok") / "tok", corpus(1), template, vocab_size=600))


@pytest.mark.parametrize("tok_name, template", [("sentencepiece", "mistral"), ("sentencepiece", "chatml"),
                                                ("hf", "tokenizer"), ("hf", "chatml"), ("hf", "mistral")])
def test_eval_tokens_are_the_training_tokenization(sp, hf_chatml, tok_name, template):
    """Evaluation tokenized piece by piece and got 1-2 ids different from training's whole-string
    tokenization (bundled sentencepiece tokenizer). Now every task's sequence is, id for id, the
    prefix of what preprocessing builds for the same conversation (a pair record through
    build_sample), ending with the answer, and the scored tokens are exactly its answer tokens."""
    from megatron_longpo.data.schema import Message, PairRecord
    from megatron_longpo.data.sequences import build_sample

    tok = sp[0] if tok_name == "sentencepiece" else hf_chatml
    tpl, counter = get_template(template, tok), TokenCounter(tok)
    for task in TASK_NAMES:
        for seed in range(3):
            s = make_sample(task, 1500, seed, tpl, counter, FillerHaystack())
            inst = s.instance
            rec = PairRecord(id=f"{task}-{seed}", prompt=(Message("user", inst.intro + inst.document + inst.question),),
                             chosen=inst.answer_prefix + inst.answer, rejected="x", source="eval")
            train = build_sample(rec, tok, tpl).sample
            assert s.tokens.tolist() == train.chosen[:len(s.tokens)].tolist(), (task, seed)
            assert train.chosen_mask[len(s.tokens) - 1] == 1  # the last token is a trained response token
            ans = s.tokens[s.answer_mask.astype(bool)]
            assert inst.answer.strip() in tok.decode(ans) and len(ans) <= len(tok.encode(inst.answer)) + 1
            assert len(s.tokens) <= 1500
