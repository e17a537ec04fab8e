"""Offline tokenizers and synthetic text for the sample data, the tests and the benchmarks."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Iterable, Optional

CHAT_MARKERS = ["[INST]", "[/INST]", "<|im_start|>", "<|im_end|>"]

_WORDS = (
    "the report section water supply engineer inspected reservoir city council budget staff year "
    "repairs cost pounds station library harbour records committee meeting volunteers winter summer "
    "north south east west bridge road tower archive museum grain power signal depot garden school"
).split()


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int = 768, dummy_prefix: bool = False, path: Optional[str | Path] = None,
    chat_markers: bool = True,
) -> bytes:
    """A BPE sentencepiece model (bytes; also written to ``path``). Byte fallback and identity
    normalisation; ``dummy_prefix=False`` makes piecewise tokenization lossless, True mimics the
    Llama-2 / Mistral tokenizers. "\\n" and (``chat_markers``) [INST] ... <|im_end|> are single
    tokens; bos=1 eos=2 pad=3."""
    import sentencepiece as spm

    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=(CHAT_MARKERS if chat_markers else []) + ["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2,
    )
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def make_hf_tokenizer(directory: str | Path, texts: Iterable[str], chat_template: Optional[str],
                      vocab_size: int = 400) -> Path:
    """A byte-level BPE HF tokenizer directory (tokenizers + transformers, offline)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
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
