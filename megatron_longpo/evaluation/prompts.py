"""Task instances -> token sequences through the project's chat template and tokenizer path.

The conversation is ``user: [intro, *context, question]`` then ``assistant: [answer_prefix,
answer]``, rendered by a :class:`~megatron_longpo.data.templates.ChatTemplate` into pieces and
tokenized AS A WHOLE by :func:`~megatron_longpo.data.sequences.encode_pieces`, exactly as training
tokenizes a preprocessed conversation (token for token; tests/unit/test_eval_tasks.py compares the
ids for every task and template). The sequence ends with the answer's last token (the end-of-turn
token and anything after it are not needed for scoring); the scored tokens are those holding a
character of the answer. :func:`make_sample` budgets the context with per-part token counts, then
trims the budget until the whole-string tokenization fits the requested length.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from megatron_longpo.data.sequences import encode_pieces
from megatron_longpo.data.templates import ChatMessage, ChatTemplate, Piece
from megatron_longpo.data.tokenizer import Tokenizer
from megatron_longpo.evaluation.haystack import Haystack
from megatron_longpo.evaluation.tasks import TaskInstance, make_instance


@dataclass(frozen=True)
class EvalSample:
    """One scored sequence: the instance, its tokens and which of them are the answer."""

    instance: TaskInstance
    length: int  # the requested length (tokens); len(tokens) <= length
    tokens: np.ndarray  # [L] int64
    answer_mask: np.ndarray  # [L] uint8: 1 where the token belongs to the scored answer

    @property
    def answer_tokens(self) -> np.ndarray:
        return self.tokens[self.answer_mask.astype(bool)]


class TokenCounter:
    """Cached ``text -> token ids`` of one tokenizer (context parts repeat across instances)."""

    def __init__(self, tok: Tokenizer, max_entries: int = 200_000):
        self.tok = tok
        self._cache: dict[str, np.ndarray] = {}
        self._max = max_entries

    def ids(self, text: str) -> np.ndarray:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok.encode(text)
            if len(self._cache) < self._max:
                self._cache[text] = ids
        return ids

    def __call__(self, text: str) -> int:
        return len(self.ids(text))


def messages(inst: TaskInstance, context: Optional[tuple[str, ...]] = None) -> list[ChatMessage]:
    ctx = inst.context if context is None else context
    return [
        ChatMessage("user", (inst.intro, *ctx, inst.question)),
        ChatMessage("assistant", (inst.answer_prefix, inst.answer), response=True),
    ]


def encode_instance(inst: TaskInstance, template: ChatTemplate, counter: TokenCounter,
                    context: Optional[tuple[str, ...]] = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [L], answer mask [L]) of ``inst`` (with ``context`` in place of its own, if given):
    the training tokenization of the rendered conversation, cut after the answer."""
    pieces: list[Piece] = template.render(messages(inst, context))
    answer_at = max((i for i, p in enumerate(pieces) if p.content and p.response), default=-1)
    if answer_at < 0 or pieces[answer_at].text.strip() != inst.answer.strip():
        raise ValueError(f"chat template {template.name!r} did not render the answer of task {inst.task} as the "
                         "last content piece of the assistant message")
    scored = [replace(p, response=(i == answer_at)) for i, p in enumerate(pieces[: answer_at + 1])]
    enc = encode_pieces(scored, counter.tok)
    if not enc.response.any():
        raise ValueError(f"task {inst.task}: the answer {inst.answer!r} encodes to no tokens")
    return enc.ids, enc.response


def make_sample(task: str, length: int, seed: int, template: ChatTemplate, counter: TokenCounter,
                haystack: Haystack) -> EvalSample:
    """The instance ``(task, seed)`` filled to at most ``length`` tokens (within one haystack sentence)."""
    probe = make_instance(task, seed, None, budget=None, num_tokens=counter)  # facts only, no haystack
    overhead = len(encode_instance(probe, template, counter, context=())[0])
    budget = length - overhead
    for _ in range(8):  # parts counted alone vs the whole string: a few tokens apart at most
        try:
            inst = make_instance(task, seed, haystack, budget, counter)
        except ValueError as e:
            raise ValueError(f"{e} (length {length} leaves {budget} context tokens after the {overhead}-token "
                             "prompt template, question and answer)") from e
        tokens, mask = encode_instance(inst, template, counter)
        if len(tokens) <= length:
            return EvalSample(inst, length, tokens, mask)
        budget -= len(tokens) - length
    raise AssertionError(f"task {task} seed {seed}: {len(tokens)} tokens still exceed the length {length}")
