"""Evaluation scoring on a Megatron checkpoint equals HF transformers in float64, and TP=2 / CP=2 /
DP=2 equal serial.

Fixture: a tiny random HF Mistral (vocab 768, the bundled sentencepiece tokenizer) converted with
the project's converter. Sequences: real task prompts (niah_single, variable_tracking,
kv_retrieval at 256-512 tokens) whose answers a random model gets wrong, plus prompts whose
"answer" is the HF float64 model's own greedy continuation (teacher-forced exact match must be
True) and the same with its last answer token replaced (exactly one position must miss). The HF
reference: float64 log_softmax / argmax of the full logits of each sequence alone; it shares no
code with loss/ or the Megatron model.

Layouts: TP=2, TP=2 with sequence parallelism, CP=2 and DP=2 (2 gloo ranks each). The serial
comparison with HF also runs on tiny Qwen3, Qwen3-MoE and Mixtral checkpoints (same tokenizer).

Tolerances: log-likelihood |diff| <= 1e-4 + 1e-6 |value| (fp32 Megatron vs fp64 HF); argmax
match counts and exact-match flags identical. TP / CP / DP vs serial: log-likelihood <= 1e-4,
matches identical.
"""

import numpy as np
import pytest
import torch

from megatron_longpo.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed

GREEDY = 5  # tokens of the model's own greedy continuation used as an answer


def _convert(root: str, family: str):
    from megatron_longpo.testing.reference import make_reference_checkpoint

    # room for the 512-token prompts plus the greedy answer
    kw = {} if family == "mistral" else dict(max_position_embeddings=1024)
    hf, ckpt = make_reference_checkpoint(root, seed=3, family=family, **kw)
    return str(hf), str(ckpt)


def _task_sequences():
    from megatron_longpo.data.templates import get_template
    from megatron_longpo.data.tokenizer import Tokenizer
    from megatron_longpo.evaluation.haystack import FillerHaystack
    from megatron_longpo.evaluation.prompts import TokenCounter, make_sample
    from megatron_longpo.testing.reference import SAMPLE_TOKENIZER

    tok = Tokenizer(SAMPLE_TOKENIZER)
    tpl, counter = get_template("auto", tok), TokenCounter(tok)
    out = []
    for task, length, seed in (("niah_single", 300, 1), ("variable_tracking", 512, 2), ("kv_retrieval", 400, 3),
                               ("niah_single", 256, 4)):
        s = make_sample(task, length, seed, tpl, counter, FillerHaystack())
        out.append((s.tokens, s.answer_mask))
    return out, tok.pad_id


def _hf_float64(hf_dir: str):
    from transformers import AutoModelForCausalLM

    # eager experts: transformers' default grouped-GEMM MoE path has no float64 kernel
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, attn_implementation="eager",
                                                experts_implementation="eager").eval()


@torch.no_grad()
def _hf_reference(hf_dir: str, sequences):
    """(loglik [n], matches [n], answer tokens [n]) in float64, one sequence at a time."""
    model = _hf_float64(hf_dir)
    ll, hits, n = [], [], []
    for tokens, mask in sequences:
        t = torch.as_tensor(tokens, dtype=torch.int64)[None]
        logits = model(input_ids=t, use_cache=False).logits[0].double()  # [L, V]
        logp = torch.log_softmax(logits, -1)[:-1]
        tgt = t[0, 1:]
        sel = torch.as_tensor(mask[1:].astype(bool))
        ll.append(float(logp.gather(1, tgt[:, None]).squeeze(1)[sel].sum()))
        hits.append(int((logits[:-1].argmax(-1) == tgt)[sel].sum()))
        n.append(int(sel.sum()))
    return np.array(ll), np.array(hits), np.array(n)


@torch.no_grad()
def _greedy_sequences(hf_dir: str, prompts):
    """Prompts followed by GREEDY tokens of the float64 HF model's argmax (answer = those tokens),
    and the same with the last answer token changed."""
    model = _hf_float64(hf_dir)
    out = []
    for tokens, mask in prompts:
        prompt = torch.as_tensor(tokens[: int(np.argmax(mask))], dtype=torch.int64)  # up to the answer
        ids = prompt.clone()
        for _ in range(GREEDY):
            nxt = model(input_ids=ids[None], use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt[None]])
        m = np.zeros(len(ids), np.uint8)
        m[len(prompt):] = 1
        out.append((ids.numpy(), m))
        wrong = ids.clone()
        wrong[-1] = (wrong[-1] + 1) % 768
        out.append((wrong.numpy(), m.copy()))
    return out


def _score(ckpt: str, tp: int, cp: int, sequences, pad_id: int, tokens_per_batch: int, sp: bool = False):
    from megatron_longpo.evaluation.scoring import score_sequences
    from megatron_longpo.reference.model import load_reference_model, read_reference_checkpoint
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.testing.models import parallel_config

    parallel = parallel_config(tp=tp, cp=cp, attention_backend="sdpa", sequence_parallel=sp)
    groups = init_model_parallel(parallel)
    set_seed(0)  # Megatron's RNG tracker (model init draws from it)
    ck = read_reference_checkpoint(ckpt)
    model = load_reference_model(ck, ck.model, parallel)
    scores = score_sequences(model, sequences, groups, vocab_size=ck.model.vocab_size, pad_id=pad_id,
                             pad_multiple=64, tokens_per_batch=tokens_per_batch, chunk_size=100, sequence_parallel=sp)
    return [(s.loglik, s.num_tokens, s.matches, s.exact) for s in scores]


def _make_env(root: str, family: str) -> dict:
    hf, ckpt = run_distributed(_convert, 1, args=(root, family))[0]
    tasks, pad_id = _task_sequences()
    seqs = tasks + _greedy_sequences(hf, tasks[:2])
    serial = run_distributed(_score, 1, args=(ckpt, 1, 1, seqs, pad_id, 1024))[0]
    return dict(hf=hf, ckpt=ckpt, seqs=seqs, pad_id=pad_id, serial=serial)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return _make_env(str(tmp_path_factory.mktemp("eval_scoring")), "mistral")


def test_scores_equal_hf_float64(env):
    _check_against_hf(env)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "mixtral"])
def test_families_score_equal_hf_float64(family, tmp_path):
    """The same comparison on a Qwen3 (q/k norm), Qwen3-MoE and Mixtral (routed experts) checkpoint."""
    _check_against_hf(_make_env(str(tmp_path), family))


def _check_against_hf(env: dict) -> None:
    ll, hits, n = _hf_reference(env["hf"], env["seqs"])
    got = env["serial"]
    got_ll = np.array([g[0] for g in got])
    np.testing.assert_allclose(got_ll, ll, rtol=1e-6, atol=1e-4)
    assert [g[1] for g in got] == n.tolist()
    assert [g[2] for g in got] == hits.tolist()
    assert [g[3] for g in got] == (hits == n).tolist()
    # The greedy continuations are exact matches, the altered ones miss exactly one position;
    # the random model misses the real answers.
    greedy = got[4:]
    assert [g[3] for g in greedy] == [True, False, True, False]
    assert [g[2] for g in greedy] == [GREEDY, GREEDY - 1, GREEDY, GREEDY - 1]
    assert not any(g[3] for g in got[:4])


@pytest.mark.parametrize("tp,cp,sp", [(2, 1, False), (2, 1, True), (1, 2, False), (1, 1, False)])  # (1, 1): DP=2
def test_parallel_equals_serial(env, tp, cp, sp):
    ranks = run_distributed(_score, 2, args=(env["ckpt"], tp, cp, env["seqs"], env["pad_id"], 1024, sp))
    assert ranks[0] == ranks[1]  # every rank returns every score
    got, want = ranks[0], env["serial"]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=0, atol=1e-4)
    assert [g[1:] for g in got] == [w[1:] for w in want]
