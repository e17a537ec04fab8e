"""Chat templates that render a conversation as a list of pieces with known character spans.

A rendered conversation is the concatenation of its pieces (template text, message contents,
special tokens). sequences.py tokenizes that whole string ONCE, exactly as the tokenizer's own
``apply_chat_template(..., tokenize=True)`` does, and derives the response mask from the
character spans of the response pieces (and the end-of-turn token closing them).

Templates:
- ``mistral``: ``<s>[INST] {system}\\n\\n{user} [/INST]{assistant}</s>[INST] {user} [/INST]...``
  (the Mistral-Instruct format).
- ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message (Qwen2 format); the
  tokenizer must have ``<|im_start|>`` and ``<|im_end|>`` as single tokens.
- ``tokenizer``: the HF tokenizer's own Jinja chat template. It is rendered once per conversation
  shape with placeholder contents; the text between placeholders is the template text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_longpo.data.schema import DataError
from megatron_longpo.data.tokenizer import Tokenizer

TEMPLATE_CHOICES = ("auto", "tokenizer", "mistral", "chatml")


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    parts: tuple[str, ...]  # content = "".join(parts); parts only mark spans (the document)
    response: bool = False  # an assistant message whose tokens are trained on (response mask)
    document_part: int = -1  # index of the part that --overlong truncate_document may shorten

    @property
    def content(self) -> str:
        return "".join(self.parts)


@dataclass(frozen=True)
class Piece:
    text: str  # rendered text of the piece
    token_id: int = -1  # >= 0: the text is this special token (BOS/EOS/end-of-turn); checked after tokenizing
    response: bool = False  # tokens belong to the response mask
    document: bool = False  # the truncatable document
    content: bool = False  # message content (False: template text)


def rendered_text(pieces: Sequence[Piece]) -> str:
    return "".join(p.text for p in pieces)


def _content(m: ChatMessage) -> list[Piece]:
    return [
        Piece(part, response=m.response, document=(i == m.document_part), content=True)
        for i, part in enumerate(m.parts)
        if part
    ]


def _check_shape(messages: Sequence[ChatMessage]) -> tuple[Optional[ChatMessage], Sequence[ChatMessage]]:
    """Optional leading system message, then user/assistant alternating from user."""
    system = messages[0] if messages and messages[0].role == "system" else None
    body = messages[1:] if system else messages
    for i, m in enumerate(body):
        if m.role != ("user" if i % 2 == 0 else "assistant"):
            raise DataError(f"conversation roles must alternate user/assistant, got {[x.role for x in messages]}")
    return system, body


class ChatTemplate:
    name: str = ""

    def render(self, messages: Sequence[ChatMessage]) -> list[Piece]:
        raise NotImplementedError

    def definition(self) -> str:
        """Text that identifies the template (hashed into the dataset sidecar)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": hashlib.sha256(self.definition().encode()).hexdigest()}


class MistralTemplate(ChatTemplate):
    name = "mistral"

    def __init__(self, tok: Tokenizer):
        if tok.eos_id is None:
            raise DataError(f"tokenizer {tok.path} has no EOS token; the mistral template needs one")
        for marker in ("[INST]", "[/INST]"):
            if tok.unk_id is not None and tok.unk_id in tok.encode(marker):
                raise DataError(
                    f"tokenizer {tok.path} turns the mistral template marker {marker!r} into its unknown token: it "
                    "cannot express this format (the model would never see the marker); use the tokenizer's own "
                    "template (--chat-template auto) or chatml")
        self.tok = tok

    def definition(self) -> str:
        return "mistral-v1: <s>[INST] {system}\\n\\n{user} [/INST]{assistant}</s>"

    def render(self, messages: Sequence[ChatMessage]) -> list[Piece]:
        system, body = _check_shape(messages)
        tok = self.tok
        out: list[Piece] = []
        if tok.bos_id is not None:
            out.append(Piece(tok.token_text(tok.bos_id), token_id=tok.bos_id))
        for i, m in enumerate(body):
            if m.role == "user":
                out.append(Piece("[INST] "))
                if i == 0 and system is not None:
                    out += _content(system)
                    out.append(Piece("\n\n"))
                out += _content(m)
                out.append(Piece(" [/INST]"))
            else:
                out += _content(m)
                out.append(Piece(tok.token_text(tok.eos_id), token_id=tok.eos_id, response=m.response))
        return out


class ChatMLTemplate(ChatTemplate):
    name = "chatml"

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        ids = {}
        for marker in ("<|im_start|>", "<|im_end|>"):
            ids[marker] = tok.single_token(marker)
            if ids[marker] is None:
                raise DataError(
                    f"tokenizer {tok.path} has no single token for {marker!r}, which the chatml template needs; "
                    "use --chat-template mistral (or the tokenizer's own template)"
                )
        self.im_end = ids["<|im_end|>"]

    def definition(self) -> str:
        return "chatml-v1: <|im_start|>{role}\\n{content}<|im_end|>\\n"

    def render(self, messages: Sequence[ChatMessage]) -> list[Piece]:
        _check_shape(messages)
        out: list[Piece] = []
        for m in messages:
            out.append(Piece(f"<|im_start|>{m.role}\n"))
            out += _content(m)
            out.append(Piece("<|im_end|>", token_id=self.im_end, response=m.response))
            out.append(Piece("\n"))
        return out


_SENTINEL = "\u27e6longpo-content-{}\u27e7"


@dataclass(frozen=True)
class _Trim:
    """How a template trims a message's content: the characters removed at each end ("": any
    whitespace; None: that end is kept). Llama-3's ``| trim`` strips both ends; Qwen3 strips the
    leading newlines of an answer after the last user message (``content.lstrip('\\n')``)."""

    left: Optional[str] = None
    right: Optional[str] = None

    def __call__(self, text: str) -> str:
        if self.left is not None:
            text = text.lstrip(self.left or None)
        if self.right is not None:
            text = text.rstrip(self.right or None)
        return text

    def message(self, m: ChatMessage) -> ChatMessage:
        """``m`` with its first / last non-empty parts trimmed, so spans stay on the parts."""
        parts = list(m.parts)
        for order, side in ((range(len(parts)), _Trim(left=self.left)),
                            (range(len(parts) - 1, -1, -1), _Trim(right=self.right))):
            if side.left is None and side.right is None:
                continue
            for i in order:
                parts[i] = side(parts[i])
                if parts[i]:
                    break
        return ChatMessage(m.role, tuple(parts), m.response, m.document_part)


_TRIMS = (_Trim(), _Trim("", ""), _Trim("\n"))


class HFChatTemplate(ChatTemplate):
    """The tokenizer's Jinja template, made piecewise with placeholder contents."""

    name = "tokenizer"

    def __init__(self, tok: Tokenizer):
        if not tok.chat_template:
            raise DataError(
                f"tokenizer {tok.path} has no chat template; use --chat-template mistral or chatml"
            )
        self.tok = tok
        self._skeletons: dict[tuple[str, ...], tuple[list[str], list[_Trim]]] = {}
        self._specials = tok.special_token_texts()

    def definition(self) -> str:
        return "hf: " + str(self.tok.chat_template)

    def _apply(self, roles: Sequence[str], contents: Sequence[str]) -> str:
        msgs = [{"role": r, "content": c} for r, c in zip(roles, contents)]
        try:
            text = self.tok._hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        except Exception as e:  # jinja raise_exception(), missing variables, ...
            raise DataError(
                f"the chat template of {self.tok.path} rejects a conversation with roles {list(roles)}: {e}; "
                "use --chat-template mistral or chatml"
            ) from e
        if not isinstance(text, str):
            raise DataError(f"the chat template of {self.tok.path} did not render text")
        return text

    def _skeleton(self, roles: tuple[str, ...]) -> tuple[list[str], list[_Trim]]:
        """Template text around each message (len(roles) + 1 chunks) and how each content is trimmed."""
        if roles in self._skeletons:
            return self._skeletons[roles]
        marks = [_SENTINEL.format(k) for k in range(len(roles))]
        text = self._apply(roles, marks)
        chunks, pos = [], 0
        for k, mark in enumerate(marks):
            at = text.find(mark, pos)
            if at < 0 or text.count(mark) != 1:
                raise DataError(
                    f"the chat template of {self.tok.path} does not render message {k} ({roles[k]}) exactly "
                    "once, so response tokens cannot be located exactly; use --chat-template mistral or chatml"
                )
            chunks.append(text[pos:at])
            pos = at + len(mark)
        chunks.append(text[pos:])
        # Each content must appear verbatim or trimmed in one of the known ways: probes with leading
        # newlines and spaces tell the ways apart (their trimmed forms start differently).
        probes = [f"\n  probe {k}\n text \n" for k in range(len(roles))]
        real = self._apply(roles, probes)
        trims: list[_Trim] = []
        pos = len(chunks[0]) if real.startswith(chunks[0]) else -1
        for k, probe in enumerate(probes):
            found = next((t for t in _TRIMS if pos >= 0 and real.startswith(t(probe) + chunks[k + 1], pos)), None)
            if found is None:
                raise DataError(
                    f"the chat template of {self.tok.path} changes the content of message {k} ({roles[k]}) beyond "
                    "stripping it, so response tokens cannot be located exactly; use --chat-template mistral or chatml"
                )
            trims.append(found)
            pos += len(found(probe)) + len(chunks[k + 1])
        self._skeletons[roles] = (chunks, trims)
        return chunks, trims

    def _template_text(self, text: str, closes_response: bool) -> list[Piece]:
        """Template text; after a response its leading special token (EOS / end-of-turn) is part of it."""
        if closes_response:
            for s in self._specials:
                if text.startswith(s):
                    tid = self.tok.single_token(s)
                    if tid is not None:
                        rest = text[len(s):]
                        return [Piece(s, token_id=tid, response=True)] + ([Piece(rest)] if rest else [])
        return [Piece(text)] if text else []

    def render(self, messages: Sequence[ChatMessage]) -> list[Piece]:
        roles = tuple(m.role for m in messages)
        chunks, trims = self._skeleton(roles)
        out: list[Piece] = []
        prev_response = False
        for m, chunk, trim in zip(messages, chunks, trims):
            out += self._template_text(chunk, prev_response)
            out += _content(trim.message(m))
            prev_response = m.response
        out += self._template_text(chunks[-1], prev_response)
        self._check(messages, out)
        return out

    def _check(self, messages: Sequence[ChatMessage], pieces: Sequence[Piece]) -> None:
        """The pieces spell exactly what the template renders for the real contents. Templates
        branch on content (Qwen3 splits an answer at ``</think>`` and treats a user message that is
        a ``<tool_response>`` as a tool turn), which placeholders cannot reveal."""
        real = self._apply([m.role for m in messages], [m.content for m in messages])
        ours = rendered_text(pieces)
        if real == ours:
            return
        at = next((i for i, (a, b) in enumerate(zip(real, ours)) if a != b), min(len(real), len(ours)))
        raise DataError(
            f"the chat template of {self.tok.path} renders this conversation differently from its messages "
            f"(first difference at character {at}: template {real[at:at + 40]!r}, messages {ours[at:at + 40]!r}); "
            "it rewrites content it finds there (e.g. Qwen3 splits an assistant message at '</think>'), so response "
            "tokens cannot be located exactly: remove that text from the record or use --chat-template chatml"
        )


_ANSWER_MARK = "\u27e6longpo-answer\u27e7"


def generation_prompt(template: ChatTemplate, messages: Sequence[ChatMessage]) -> list[Piece]:
    """The pieces a model sees before it writes the next assistant message: ``messages`` plus an
    assistant turn, rendered by ``template`` and cut where the assistant's content starts. This is
    exactly the text before a response in a rendered training conversation, so generation,
    preprocessing and evaluation share one format (and one rendering code)."""
    pieces = template.render([*messages, ChatMessage("assistant", (_ANSWER_MARK,), response=True)])
    at = [i for i, p in enumerate(pieces) if p.content and p.text == _ANSWER_MARK]
    if len(at) != 1:
        raise DataError(f"the {template.name} chat template does not render an assistant message verbatim, so the "
                        "prompt before a response cannot be cut out")
    return pieces[: at[0]]


def get_template(name: str, tok: Tokenizer) -> ChatTemplate:
    """``auto``: the tokenizer's own template when it has one, else ``mistral``."""
    if name not in TEMPLATE_CHOICES:
        raise DataError(f"--chat-template {name!r} is not one of {list(TEMPLATE_CHOICES)}")
    if name == "auto":
        name = "tokenizer" if tok.chat_template else "mistral"
    return {"tokenizer": HFChatTemplate, "mistral": MistralTemplate, "chatml": ChatMLTemplate}[name](tok)
