"""Tokenizer wrapper: a sentencepiece ``.model`` file or a local HF tokenizer directory.

A conversation is rendered to one string and tokenized once (see sequences.py), as the model's own
``apply_chat_template(..., tokenize=True)`` does; ``encode_with_offsets`` gives the character span
of every token so masks can be derived from the rendered text. ``encode`` never adds BOS/EOS:
special tokens come from the chat template. ``decode`` keeps special tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from megatron_longpo.data.schema import DataError

# Files of an HF tokenizer directory that define its behaviour (hashed into the fingerprint).
_HF_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)


def has_tokenizer_files(directory: str | os.PathLike) -> bool:
    """The directory holds an HF tokenizer (one of the files that define one)."""
    d = Path(directory)
    return d.is_dir() and any((d / name).is_file() for name in _HF_FILES)


# Plain text whose ids show how a tokenizer splits text: spaces, newlines, tabs, digits, case,
# punctuation, code and non-Latin scripts. No special-token markers: a sentencepiece file and the
# HF tokenizer wrapping it read those differently by design, and must still compare equal.
BEHAVIOUR_PROBE = (
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159 1,000,000\n\n"
    "  Indented line\twith a tab; UPPER lower MiXeD, punctuation?! (brackets) [x] {y} <z> a--b\n"
    "Unicode: naïve café, Straße, 東京, Москва, مرحبا, 😀.\ndef f(x):\n    return x ** 2  # comment\n"
)


def _sha256_files(files: Sequence[Path], root: Optional[Path] = None) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update((str(f.relative_to(root)) if root else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


class Tokenizer:
    """Uniform view of a sentencepiece or HF tokenizer.

    Attributes: ``kind`` ("sentencepiece" | "hf"), ``vocab_size`` (ids are < vocab_size),
    ``bos_id`` / ``eos_id`` (None when the tokenizer has none), ``pad_id`` (always a valid id; it
    only fills padding, which is never a target), ``fingerprint`` (sha256 of the files that define
    the tokenizer), ``chat_template`` (HF Jinja template or None).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_file():
            self._init_sentencepiece()
        elif self.path.is_dir():
            self._init_hf()
        else:
            raise DataError(
                f"tokenizer {self.path} does not exist; pass a sentencepiece .model file or an HF tokenizer "
                "directory (with tokenizer.json / tokenizer_config.json)"
            )
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0

    # -- construction ---------------------------------------------------------------------------

    def _init_sentencepiece(self) -> None:
        try:
            sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad file
            raise DataError(f"tokenizer {self.path}: not a sentencepiece model ({e})") from e
        self.kind = "sentencepiece"
        self._sp = sp
        self._hf = None
        self.vocab_size = int(sp.vocab_size())
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else None
        self.unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
        self.chat_template = None
        self._special = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            self._special[i] = sp.is_control(i)
        self.fingerprint = _sha256_files([self.path])
        self._surface_bytes = self._sentencepiece_surface_table()

    def _sentencepiece_surface_table(self) -> Optional[np.ndarray]:
        """UTF-8 length of the text each piece stands for, when that is fixed (identity
        normalisation, no whitespace folding): offsets then follow from the ids alone, which is
        ~2.5x cheaper than sentencepiece's offset protos. None: use the protos."""
        m = sentencepiece_model_pb2.ModelProto()
        m.ParseFromString(self.path.read_bytes())
        n = m.normalizer_spec
        if n.name != "identity" or n.precompiled_charsmap or n.remove_extra_whitespaces or \
                not n.escape_whitespaces or m.trainer_spec.treat_whitespace_as_suffix:
            return None
        sp = self._sp
        table = np.full(self.vocab_size, -1, dtype=np.int64)  # -1: unknown surface (unk)
        for i in range(self.vocab_size):
            if sp.is_byte(i):
                table[i] = 1
            elif sp.is_control(i):
                table[i] = 0
            elif not sp.is_unknown(i):
                table[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        self._dummy_prefix = bool(n.add_dummy_prefix)
        return table

    def _init_hf(self) -> None:
        # deferred: transformers imports torch; sentencepiece tokenizers never need it
        from transformers import AutoTokenizer

        files = sorted(p for p in self.path.iterdir() if p.name in _HF_FILES)
        if not files:
            raise DataError(
                f"tokenizer directory {self.path} has none of {list(_HF_FILES)}; is it an HF tokenizer directory?"
            )
        try:
            tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise DataError(f"tokenizer {self.path}: transformers cannot load it ({type(e).__name__}: {e})") from e
        # Long documents are the point: silence the "longer than model_max_length" warning.
        tok.model_max_length = 1 << 62
        self.kind = "hf"
        self._sp = None
        self._hf = tok
        self.vocab_size = int(len(tok))
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id
        self.unk_id = tok.unk_token_id
        self.chat_template = getattr(tok, "chat_template", None) or None
        special_ids = set(tok.all_special_ids)
        for i, t in tok.added_tokens_decoder.items():
            if t.special:
                special_ids.add(int(i))
        self._special = np.zeros(self.vocab_size, dtype=bool)
        self._special[[i for i in special_ids if 0 <= i < self.vocab_size]] = True
        self.fingerprint = _sha256_files(files)

    # -- pickling (multiprocessing workers rebuild from the path) --------------------------------

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    # -- API ------------------------------------------------------------------------------------

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (int64), without BOS/EOS. Special-token strings in the text are
        parsed as special tokens by HF tokenizers; sentencepiece matches its user-defined symbols."""
        if not text:
            return np.zeros(0, dtype=np.int64)
        if self._sp is not None:
            ids = self._sp.encode(text, out_type=int)
        else:
            ids = self._hf.encode(text, add_special_tokens=False)
        return np.asarray(ids, dtype=np.int64)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, starts, ends) of ``text``: token ids (int64) and each token's character span in
        ``text`` (int64; empty spans for tokens without source text, e.g. a dummy-prefix "▁" or the
        leading bytes of a byte-fallback character). HF tokenizers parse special-token strings;
        sentencepiece matches its user-defined symbols but not control tokens (<s>, </s>)."""
        if not text:
            z = np.zeros(0, dtype=np.int64)
            return z, z.copy(), z.copy()
        if self._sp is None:
            enc = self._hf(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = np.asarray(enc["input_ids"], dtype=np.int64)
            off = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
            return ids, off[:, 0].copy(), off[:, 1].copy()
        data = text.encode("utf-8")
        raw = np.frombuffer(data, dtype=np.uint8)
        ids = begin = end = None
        if self._surface_bytes is not None:
            ids = np.asarray(self._sp.encode(text, out_type=int), dtype=np.int64)
            lens = self._surface_bytes[ids]
            # the dummy prefix "▁" of the first piece stands for no text
            if self._dummy_prefix and len(lens) and self._sp.id_to_piece(int(ids[0])).startswith("\u2581"):
                lens = lens.copy()
                lens[0] -= 1
            if len(lens) and lens.min() >= 0 and int(lens.sum()) == len(data):
                end = np.cumsum(lens)
                begin = end - lens
            else:
                ids = None
        if ids is None:
            proto = self._sp.encode(text, return_type="proto")
            table = np.array([(p.id, p.begin, p.end) for p in proto.pieces], dtype=np.int64).reshape(-1, 3)
            ids, begin, end = table[:, 0].copy(), table[:, 1], table[:, 2]
        # sentencepiece reports UTF-8 byte offsets: map them to character offsets.
        starts_char = (raw & 0xC0) != 0x80
        byte_to_char = np.concatenate([np.cumsum(starts_char) - 1, [len(text)]]).astype(np.int64)
        return ids, byte_to_char[begin], byte_to_char[end]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = False) -> str:
        """Text of ``ids`` with special tokens written out (e.g. ``<s>``, ``</s>``), or left out with
        ``skip_special`` (a generated answer)."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if not (i < len(self._special) and self._special[i])]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)
        # sentencepiece decodes control tokens to "": decode the runs between them.
        out, run = [], []
        for i in ids:
            if self._special[i]:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def token_text(self, token_id: int) -> str:
        """How a single (special) token is written in rendered text."""
        if self._hf is not None:
            return self._hf.convert_ids_to_tokens(int(token_id))
        return self._sp.id_to_piece(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return bool(self._special[int(token_id)])

    def special_token_texts(self) -> list[str]:
        """Texts of the special tokens, longest first (to split them off rendered template text)."""
        texts = {self.token_text(i) for i in np.nonzero(self._special)[0]}
        return sorted((t for t in texts if t), key=len, reverse=True)

    def single_token(self, text: str) -> Optional[int]:
        """The id if ``text`` is exactly one token (a vocabulary piece, e.g. a user-defined symbol),
        else None."""
        if self._sp is not None:
            i = int(self._sp.piece_to_id(text))
            if i != self._sp.unk_id() and self._sp.id_to_piece(i) == text:
                return i
        ids = self.encode(text)
        return int(ids[0]) if len(ids) == 1 else None

    def behaviour_fingerprint(self) -> str:
        """sha256 of the ids of :data:`BEHAVIOUR_PROBE`: equal for tokenizers that split text the
        same way, whatever their file format (sentencepiece ``.model`` or HF directory)."""
        ids = [int(i) for i in self.encode(BEHAVIOUR_PROBE)]
        return hashlib.sha256(json.dumps(ids).encode()).hexdigest()

    def describe(self) -> dict:
        return {
            "behaviour": self.behaviour_fingerprint(),
            "path": str(self.path.resolve()),
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }
