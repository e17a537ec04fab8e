"""The three generation requests of a turn as chat messages, and their sampling settings.

The answer prompts are exactly the user messages training rebuilds from a record (docs/data.md):
chosen: user(short_context + SEP + instruction), rejected: user(document + SEP + instruction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_longpo.generation.prompts import Prompts

SEPARATOR = "\n\n"  # tools/preprocess_data.py --separator default


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int


# The authors' settings: questions T=0.7 / top_p 0.9, answers T=1.0 / top_p 1.0, 1,024 new tokens.
QUESTION_SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=1024)
ANSWER_SAMPLING = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=1024)


Messages = list[dict[str, str]]


def _conversation(system: Optional[str], user: str) -> Messages:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}]


def question_messages(prompts: Prompts, chunk: str) -> Messages:
    return _conversation(prompts.system, prompts.question_request(chunk))


def chosen_messages(prompts: Prompts, chunk: str, instruction: str, separator: str = SEPARATOR) -> Messages:
    return _conversation(prompts.system, chunk + separator + instruction)


def rejected_messages(prompts: Prompts, document: str, instruction: str, separator: str = SEPARATOR) -> Messages:
    return _conversation(prompts.system, document + separator + instruction)
