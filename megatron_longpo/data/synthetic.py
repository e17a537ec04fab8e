"""Offline tokenizers and synthetic text for the sample data, the tests and the benchmarks."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Iterable, Optional

import sentencepiece as spm
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RawTokenizer

CHAT_MARKERS = ["[INST]", "[/INST]", "<|im_start|>", "<|im_end|>"]

_WORDS = (
    "the report section water supply engineer inspected reservoir city council budget staff year "
    "repairs cost pounds station library harbour records committee meeting volunteers winter summer "
    "north south east west bridge road tower archive museum grain power signal depot garden school"
).split()


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int = 768, dummy_prefix: bool = False, path: Optional[str | Path] = None,
    chat_markers: bool = True, newline_symbol: bool = True,
) -> bytes:
    """A BPE sentencepiece model (bytes; also written to ``path``). Byte fallback and identity
    normalisation; ``dummy_prefix=False`` makes piecewise tokenization lossless, True mimics the
    Llama-2 / Mistral tokenizers. "\\n" and (``chat_markers``) [INST] ... <|im_end|> are single
    tokens; bos=1 eos=2 pad=3. ``newline_symbol=False``: "\\n" is a byte-fallback token, as in
    Llama-2 / Mistral."""
    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=(CHAT_MARKERS if chat_markers else []) + (["\n"] if newline_symbol else []), unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2,
    )
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def make_hf_tokenizer(directory: str | Path, texts: Iterable[str], chat_template: Optional[str],
                      vocab_size: int = 400) -> Path:
    """A byte-level BPE HF tokenizer directory (tokenizers + transformers, offline)."""
    # deferred: transformers imports torch; data/ text code stays torch-free
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(list(texts), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        tok.chat_template = chat_template
    directory = Path(directory)
    tok.save_pretrained(str(directory))
    return directory


def random_text(num_words: int, seed: int = 0, line_every: int = 40) -> str:
    """Word salad with sentences and paragraph breaks (for length / throughput tests)."""
    r = random.Random(seed)
    words = r.choices(_WORDS, k=num_words)
    out = []
    for i, w in enumerate(words):
        out.append(w)
        if i % 12 == 11:
            out[-1] += "."
        if i % line_every == line_every - 1:
            out[-1] += "\n"
    return " ".join(out).replace("\n ", "\n")


def corpus(seed: int = 0) -> list[str]:
    """Small training corpus for test tokenizers."""
    return [random_text(300, seed + i) for i in range(20)] + [
        "As described in the preceding text, what did the engineer report? The answer is 42.",
        "Section 3: Water supply\nThe reservoir holds 4,200 cubic metres.",
    ]


# Chat templates of the public model families (Jinja, as in their tokenizer_config.json), with
# {% generation %} markers so HF's return_assistant_tokens_mask can serve as an independent mask.
MISTRAL_JINJA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\\n\\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}{{ '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{% else %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
)
LLAMA3_JINJA = (
    "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
)
QWEN2_JINJA = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The Qwen2 / Qwen3 split regex: Llama-3's with single digits.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def make_mistral_like_tokenizer(directory: str | Path, texts: Iterable[str], vocab_size: int = 600,
                                 legacy: bool = True) -> Path:
    """Mistral-7B-Instruct-v0.2 style: a sentencepiece BPE model with a dummy prefix ([INST] is plain
    text, BOS/EOS control tokens) wrapped by transformers' LlamaTokenizerFast, Mistral template."""
    # deferred: transformers imports torch; data/ text code stays torch-free
    from transformers import LlamaTokenizerFast

    directory = Path(directory)
    raw = directory / "sp"
    raw.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(texts, vocab_size=vocab_size, dummy_prefix=True, path=raw / "tokenizer.model",
                        chat_markers=False, newline_symbol=False)
    tok = LlamaTokenizerFast.from_pretrained(str(raw), legacy=legacy)
    tok.chat_template = MISTRAL_JINJA
    tok.save_pretrained(str(directory))
    # legacy=True (a "▁" after every special token, as Mistral-7B-Instruct-v0.2's <s>[INST] -> "▁[")
    # is an init argument that save_pretrained does not keep.
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["legacy"] = legacy
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return directory


def _byte_level_bpe(texts: Iterable[str], specials: list[str], vocab_size: int, split: Optional[str]):
    raw = RawTokenizer(models.BPE())
    if split is None:
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raw.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(list(texts), trainer)
    return raw


def make_llama3_like_tokenizer(directory: str | Path, texts: Iterable[str], vocab_size: int = 600) -> Path:
    """Llama-3 style: byte-level BPE with the Llama-3 split regex, header tokens, trimming template."""
    # deferred: transformers imports torch; data/ text code stays torch-free
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    raw = _byte_level_bpe(texts, specials, vocab_size, LLAMA3_SPLIT)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|end_of_text|>", additional_special_tokens=specials[2:4])
    tok.chat_template = LLAMA3_JINJA
    tok.save_pretrained(str(directory))
    return Path(directory)


def make_qwen2_like_tokenizer(directory: str | Path, texts: Iterable[str], vocab_size: int = 600) -> Path:
    """Qwen2 style: byte-level BPE, ChatML markers, no BOS, default system prompt in the template."""
    # deferred: transformers imports torch; data/ text code stays torch-free
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = _byte_level_bpe(texts, specials, vocab_size, None)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:])
    tok.chat_template = QWEN2_JINJA
    tok.save_pretrained(str(directory))
    return Path(directory)


def make_qwen3_like_tokenizer(directory: str | Path, texts: Iterable[str], chat_template: str,
                              vocab_size: int = 600) -> Path:
    """Qwen3 style: byte-level BPE with Qwen's split regex, ChatML markers as special tokens,
    ``<think>`` / ``</think>`` as added (non-special) tokens, EOS ``<|im_end|>``, no BOS; the chat
    template is the caller's (tests pass the real Qwen3 template text)."""
    # deferred: transformers imports torch; data/ text code stays torch-free
    from transformers import AddedToken, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = _byte_level_bpe(texts, specials, vocab_size, QWEN_SPLIT)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok.chat_template = chat_template
    tok.save_pretrained(str(directory))
    return Path(directory)
