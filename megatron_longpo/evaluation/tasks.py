"""RULER-style synthetic long-context tasks, generated offline and deterministically from a seed.

A task instance is a user message (intro, haystack context with needles, question) and an
assistant message (an unscored answer prefix, then the scored answer). Two random streams:

- the *facts* stream, seeded by (task, seed): keys, values, needle texts, needle depths, question
  and answer. The same seed gives the same facts at every length, so an instance at a short
  length and one at a long length ask the same question with the same answer (the short-context
  retention score and, later, short/long training pairs of the self-evolution loop);
- the *haystack* stream, seeded by (task, seed, length): which filler sentences (or document
  sentences, or distractor key-value pairs) fill the context up to the token budget.

Every needle text and every answer value occurs exactly once in the context (the haystack skips
sentences that contain one; tests check it over many seeds).

Tasks (``TASKS``):
- ``niah_single``: one "special magic number" needle keyed by a two-word key; answer: the number.
- ``niah_multikey``: four needles with different keys, one is asked (three distractors).
- ``niah_multivalue``: four needles with the same key; answer: all four numbers in text order.
- ``niah_multiquery``: four needles with different keys, all asked; answer: the numbers in
  question order.
- ``variable_tracking``: a chain ``VAR A = 12345. VAR B = VAR A. ...`` of 5 variables spread over
  the haystack; answer: the variable names in chain order.
- ``kv_retrieval``: a JSON object of UUID key-value pairs (the distractor pairs are the haystack,
  as in RULER; documents are not used); answer: the value of one key.
- ``kv_recall``: short key-value records ``key bako plum.``, one per paragraph (the
  distractor records are the haystack); answer: the one-word value of one key. Short keys and
  values keep the answer to a token or two even with tiny tokenizers, and the paragraph-per-record
  context chunks at blank lines like any document, which is what the CPU self-evolution loop needs
  (examples/self_evolution/). Its prompt is exactly a LongPO answer prompt: no intro, the context,
  then ``"\n\n"`` and the question.
- ``kv_assign``: the same lookup in another format: records ``let bako plum;``, one per paragraph,
  the question ``What does bako hold?`` and the answer ``Let bako plum``. The self-evolution loop
  trains it into its base as a second short-context skill that its LongPO data never contains
  (held-out retention).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from megatron_longpo.evaluation.haystack import Haystack

_ADJ = ("amber", "brisk", "cobalt", "dusky", "elated", "frosty", "gilded", "hollow", "ivory", "jagged", "keen",
        "lucid", "mellow", "nimble", "opal", "placid", "quaint", "rustic", "somber", "tawny", "umber", "vivid",
        "wistful", "zesty")
_NOUN = ("falcon", "lantern", "meadow", "quartz", "harbor", "violin", "cactus", "glacier", "pebble", "walrus",
         "sparrow", "thimble", "canyon", "marble", "otter", "saddle", "tundra", "beacon", "compass", "orchid")

NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n")
VT_INTRO = "Memorize and track the chain of variable assignments hidden in the following text.\n"
# kv_recall values: one word each, none of them a key word (so a value never matches a key).
KV_VALUES = ("plum", "lime", "pear", "fig", "kiwi", "mango", "grape", "peach", "apple", "melon", "olive", "lemon",
           "cherry", "date", "guava", "papaya", "red", "blue", "green", "gray", "pink", "teal", "navy", "gold",
           "silver", "bronze", "copper", "iron", "tin", "zinc", "jade", "ruby", "salt", "rice", "corn", "bean",
           "wool", "silk", "clay", "sand", "oak", "pine", "elm", "ash", "fern", "moss", "reed", "kelp")
KV_INTRO = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"


@dataclass(frozen=True)
class TaskInstance:
    """One prompt/answer of a task (text only; see prompts.py for tokens)."""

    task: str
    seed: int
    intro: str  # instruction before the context
    context: tuple[str, ...]  # haystack sentences and needles, in order (one message part each)
    question: str  # after the context
    answer_prefix: str  # start of the assistant message, not scored
    answer: str  # scored assistant text
    needles: tuple[str, ...]  # texts that occur exactly once in the context
    answer_values: tuple[str, ...]  # the strings the answer consists of; each occurs once in the context

    @property
    def document(self) -> str:
        """The context as one text (what a LongPO record's document / short_context would hold)."""
        return "".join(self.context)


@dataclass(frozen=True)
class _Facts:
    intro: str
    needles: list[str]
    depths: list[float]  # per needle, in [0, 1]: where in the haystack it goes
    question: str
    answer_prefix: str
    answer: str
    answer_values: list[str]
    forbidden: list[str]  # strings no haystack sentence may contain


def _distinct(rng: random.Random, n: int, draw: Callable[[random.Random], str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = draw(rng)
        if v not in out and not any(v in o or o in v for o in out):
            out.append(v)
    return out


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _var(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def uuid_from(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _needle(key: str, value: str) -> str:
    return f" One of the special magic numbers for {key} is: {value}."


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _niah(num_keys: int, num_values: int, num_queries: int) -> Callable[[random.Random], _Facts]:
    def facts(rng: random.Random) -> _Facts:
        keys = _distinct(rng, num_keys, _key)
        values = _distinct(rng, num_keys * num_values, _number)
        pairs = [(keys[i // num_values], values[i]) for i in range(len(values))]
        depths = [rng.random() for _ in pairs]
        asked = keys[:num_queries]
        if num_values > 1:  # answer: the key's values in text order
            order = sorted(range(len(pairs)), key=lambda i: (depths[i], i))
            ans = [pairs[i][1] for i in order]
            q = f"\n\nWhat are all the special magic numbers for {asked[0]} mentioned in the provided text?"
            prefix = f"The special magic numbers for {asked[0]} mentioned in the provided text are"
        elif num_queries > 1:  # answer: one value per asked key, in question order
            ans = [dict(pairs)[k] for k in asked]
            q = f"\n\nWhat are the special magic numbers for {_join(asked)} mentioned in the provided text?"
            prefix = f"The special magic numbers for {_join(asked)} mentioned in the provided text are"
        else:
            ans = [dict(pairs)[asked[0]]]
            q = f"\n\nWhat is the special magic number for {asked[0]} mentioned in the provided text?"
            prefix = f"The special magic number for {asked[0]} mentioned in the provided text is"
        return _Facts(NIAH_INTRO, [_needle(k, v) for k, v in pairs], depths, q, prefix, " " + ", ".join(ans), ans,
                      keys + values + ["special magic number"])

    return facts


def _variable_tracking(hops: int) -> Callable[[random.Random], _Facts]:
    def facts(rng: random.Random) -> _Facts:
        names = _distinct(rng, hops + 1, _var)
        value = str(rng.randint(10_000, 99_999))
        needles = [f" VAR {names[0]} = {value}."] + [f" VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
        depths = sorted(rng.random() for _ in needles)  # chain order = text order
        q = f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above."
        prefix = (f"Answer: According to the chain of variable assignments in the text above, {hops + 1} variables "
                  f"are assigned the value {value}, they are:")
        return _Facts(VT_INTRO, needles, depths, q, prefix, " " + " ".join(names), [value],
                      names + [value, "VAR "])

    return facts


def _kv_retrieval(rng: random.Random) -> _Facts:
    key, value = uuid_from(rng), uuid_from(rng)
    q = f'\n}}\n\nWhat is the value associated with the key "{key}" in the JSON object above?'
    prefix = f'The value associated with the key "{key}" is'
    return _Facts(KV_INTRO, [f'\n "{key}": "{value}",'], [rng.random()], q, prefix, f' "{value}"', [key, value],
                  [key, value])


class _KVPairs(Haystack):
    """Distractor UUID key-value lines (the haystack of kv_retrieval)."""

    description = "distractor key-value pairs"

    def sentences(self, rng: random.Random):
        while True:
            yield f'\n "{uuid_from(rng)}": "{uuid_from(rng)}",'


# kv_recall keys: 320 pronounceable four-letter words (consonant-vowel-consonant-vowel), fixed
# order; a small tokenizer can hold each as one token, and none is a substring of a value.
KV_KEYS = tuple(
    w for w in (c1 + v1 + c2 + v2 for c1 in "bdfgklmnprstvz" for v1 in "aeiou" for c2 in "bdgklmnprstvz"
                for v2 in "aiou")
    if not any(w in v or v in w for v in KV_VALUES)
)[::11][:320]


def _kv_key(rng: random.Random) -> str:
    return rng.choice(KV_KEYS)


def kv_record(key: str, value: str) -> str:
    """One kv_recall record: its own paragraph (leading blank line)."""
    return f"\n\nkey {key} {value}."


def kv_recall_question(key: str) -> str:
    """The kv_recall question as a LongPO instruction (the task prompt puts a blank line before it)."""
    return f"What is the value of key {key}?"


def kv_recall_values(text: str, key: str) -> list[str]:
    """The values of every ``key`` record in ``text`` (kv_recall format), in text order."""
    return re.findall(rf"(?:^|\n)key {re.escape(key)} (\w+)\.", text)


def _kv_recall(rng: random.Random) -> _Facts:
    key, value = _kv_key(rng), rng.choice(KV_VALUES)
    return _Facts("", [kv_record(key, value)], [rng.random()], "\n\n" + kv_recall_question(key),
                  f"Key {key}", f" {value}", [value], [key, value])


def kv_assign_record(key: str, value: str) -> str:
    """One kv_assign record: its own paragraph (leading blank line)."""
    return f"\n\nlet {key} {value};"


def kv_assign_question(key: str) -> str:
    """The kv_assign question (the task prompt puts a blank line before it)."""
    return f"What does {key} hold?"


def _kv_assign(rng: random.Random) -> _Facts:
    key, value = _kv_key(rng), rng.choice(KV_VALUES)
    return _Facts("", [kv_assign_record(key, value)], [rng.random()], "\n\n" + kv_assign_question(key),
                  f"Let {key}", f" {value}", [value], [key, value])


class _KVAssignRecords(Haystack):
    """Distractor kv_assign records (the haystack of kv_assign)."""

    description = "distractor assignment records"

    def sentences(self, rng: random.Random):
        while True:
            yield kv_assign_record(_kv_key(rng), rng.choice(KV_VALUES))


class _KVRecords(Haystack):
    """Distractor kv_recall records (the haystack of kv_recall)."""

    description = "distractor key-value records"

    def sentences(self, rng: random.Random):
        while True:
            yield kv_record(_kv_key(rng), rng.choice(KV_VALUES))


@dataclass(frozen=True)
class TaskSpec:
    name: str
    facts: Callable[[random.Random], _Facts]
    own_haystack: Optional[Haystack] = None  # replaces the user / filler haystack


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("niah_single", _niah(1, 1, 1)),
        TaskSpec("niah_multikey", _niah(4, 1, 1)),
        TaskSpec("niah_multivalue", _niah(1, 4, 1)),
        TaskSpec("niah_multiquery", _niah(4, 1, 4)),
        TaskSpec("variable_tracking", _variable_tracking(4)),
        TaskSpec("kv_retrieval", _kv_retrieval, own_haystack=_KVPairs()),
        TaskSpec("kv_recall", _kv_recall, own_haystack=_KVRecords()),
        TaskSpec("kv_assign", _kv_assign, own_haystack=_KVAssignRecords()),
    )
}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown evaluation task {name!r}; choose from {list(TASK_NAMES)}")
    return TASKS[name]


def make_instance(task: str, seed: int, haystack: Optional[Haystack], budget: Optional[int],
                  num_tokens: Callable[[str], int]) -> TaskInstance:
    """The instance ``(task, seed)`` whose context (needles + haystack) holds at most ``budget``
    tokens as counted by ``num_tokens`` (each context part is tokenized on its own).
    ``budget=None``: the needles alone, no haystack."""
    spec = get_task(task)
    f = spec.facts(random.Random(f"facts|{task}|{seed}"))
    hay: list[str] = []
    if budget is not None:
        needle_tokens = sum(num_tokens(n) for n in f.needles)
        if budget < needle_tokens:
            raise ValueError(f"task {task}: a context budget of {budget} tokens cannot hold its needles "
                             f"({needle_tokens} tokens); use a longer length")
        source = spec.own_haystack or haystack
        if source is None:
            raise ValueError(f"task {task} needs a haystack")
        hay = source.fill(random.Random(f"haystack|{task}|{seed}|{budget}"), budget - needle_tokens, num_tokens,
                          f.forbidden)
    context = list(hay)
    # Insert from the deepest needle up: at a shared slot the shallower needle goes in last, in
    # front, so the text order of the needles is their (depth, index) order.
    slots = sorted(((round(d * len(hay)), d, i) for i, d in enumerate(f.depths)), reverse=True)
    for pos, _, i in slots:
        context.insert(pos, f.needles[i])
    return TaskInstance(task=task, seed=seed, intro=f.intro, context=tuple(context), question=f.question,
                        answer_prefix=f.answer_prefix, answer=f.answer, needles=tuple(f.needles),
                        answer_values=tuple(f.answer_values))
