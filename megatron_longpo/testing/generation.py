"""Tiny generation fixtures for tests, benchmarks and demos: a random HF Llama with a chat template,
and synthetic multi-paragraph documents. Nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

from megatron_longpo.testing.convert import build_tiny_hf
from megatron_longpo.generation.backends import CHATML_TEMPLATE

_WORDS = ("archive ledger harbor council river granite lantern orchard meadow beacon quarry vessel "
          "summit canal tower market bridge garden library station museum forest valley island").split()


def build_tiny_chat_model(out: str | Path, seed: int = 0) -> Path:
    """A tiny random Llama (megatron_longpo.testing.convert) whose tokenizer has a ChatML template."""
    out = build_tiny_hf(out, "llama", seed=seed)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHATML_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def synthetic_document(rng: random.Random, paragraphs: int, words: tuple[int, int] = (12, 30)) -> str:
    paras = []
    for p in range(paragraphs):
        n = rng.randint(*words)
        body = " ".join(rng.choice(_WORDS) for _ in range(n))
        paras.append(f"Section {p + 1}. The {rng.choice(_WORDS)} code is {rng.randint(1000, 9999)}. {body}.")
    return "\n\n".join(paras)


def write_documents_jsonl(path: str | Path, n: int, paragraphs: tuple[int, int] = (6, 12),
                          words: tuple[int, int] = (12, 30), seed: int = 0) -> Path:
    rng = random.Random(seed)
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"doc-{i}", "text": synthetic_document(rng, rng.randint(*paragraphs), words)}) + "\n")
    return path
