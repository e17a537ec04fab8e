"""Prompts, question prefixes and refusal phrases, loaded from one editable YAML file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import yaml

from megatron_longpo.config import ConfigError

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.yaml")


@dataclass(frozen=True)
class Prompts:
    question_prompt: str  # placeholders {context}, {num_questions}
    num_questions: int
    question_prefixes: tuple[str, ...]
    refusal_phrases: tuple[str, ...]
    system: Optional[str] = None
    source: str = ""

    def question_request(self, chunk: str) -> str:
        return self.question_prompt.format(context=chunk, num_questions=self.num_questions)


def load_prompts(path: Union[str, Path, None] = None) -> Prompts:
    """Read and check a prompts file (default: the bundled prompts.yaml); errors name the file and key."""
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: file does not exist (copy {DEFAULT_PROMPTS} and edit it)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"--prompts {path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--prompts {path}: expected a mapping of keys, got {type(data).__name__}")
    known = {"system", "question_prompt", "num_questions", "question_prefixes", "refusal_phrases"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--prompts {path}: unknown key(s) {unknown}; allowed: {sorted(known)}")

    def need(key: str, kind: type):
        if key not in data:
            raise ConfigError(f"--prompts {path}: key '{key}' is missing (see {DEFAULT_PROMPTS})")
        v = data[key]
        if not isinstance(v, kind) or isinstance(v, bool):
            raise ConfigError(f"--prompts {path}: '{key}' must be a {kind.__name__}, got {type(v).__name__}")
        return v

    def strings(key: str, allow_empty: bool) -> tuple[str, ...]:
        v = need(key, list)
        if not allow_empty and not v:
            raise ConfigError(f"--prompts {path}: '{key}' is empty")
        bad = [i for i, s in enumerate(v) if not isinstance(s, str) or not s.strip()]
        if bad:
            raise ConfigError(f"--prompts {path}: '{key}' entries {bad} are not non-empty strings")
        return tuple(v)

    qp = need("question_prompt", str)
    if "{context}" not in qp:
        raise ConfigError(f"--prompts {path}: 'question_prompt' must contain the placeholder {{context}}")
    try:
        qp.format(context="", num_questions=1)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"--prompts {path}: 'question_prompt' has a bad placeholder ({e!r}); only {{context}} and "
            "{num_questions} are allowed (write literal braces as {{ }})"
        ) from e
    n = need("num_questions", int)
    if n < 1:
        raise ConfigError(f"--prompts {path}: 'num_questions' must be >= 1, got {n}")
    system = data.get("system")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise ConfigError(f"--prompts {path}: 'system' must be a non-empty string or null")
    return Prompts(
        question_prompt=qp, num_questions=n,
        question_prefixes=strings("question_prefixes", allow_empty=True),
        refusal_phrases=strings("refusal_phrases", allow_empty=True),
        system=system, source=str(path),
    )
