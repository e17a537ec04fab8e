#!/usr/bin/env python
"""Generate the bundled sample data (deterministic; no network, no model).

Writes to --out-dir (default examples/data):
  sample_longpo.jsonl   LongPO records: a synthetic "annual report" (numbered sections of facts)
                        as the long document, 1-2 turns each asking about one section; the short
                        context is that section, the chosen answer is right and cites it, the
                        rejected answer is vague or wrong (as a long-context model's answer may be).
  sample_pairs.jsonl    plain (TRL-like) pair records with a short_prompt, string and chat forms.
  tokenizer.model       a tiny sentencepiece BPE tokenizer trained on the documents (byte fallback,
                        identity normalisation, no dummy prefix;
                        [INST], [/INST], <|im_start|>, <|im_end|> are single tokens).

    python examples/make_sample_data.py [--out-dir DIR] [--check]

``--check`` regenerates into a temp dir and fails if the bundled files differ.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import random
import sys
import tempfile
from pathlib import Path

SEED = 20250217
NUM_LONGPO = 36
NUM_PAIRS = 12
VOCAB_SIZE = 768

TOWNS = ["Ashford", "Brackenridge", "Coldwater", "Dunmore", "Eastvale", "Fairhaven", "Glenrock", "Highmoor",
         "Ironbridge", "Kingsbury", "Lakemont", "Millbrook", "Northwick", "Oakhurst", "Pinecrest", "Redcliff"]
INSTITUTIONS = ["Water Board", "Public Library", "Harbour Authority", "Rail Company", "Observatory",
                "Hospital Trust", "Forestry Office", "Museum of Industry", "Grain Cooperative", "Power Station"]
FIRST = ["Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko", "Lars",
         "Maya", "Nikolai", "Olga", "Pavel", "Rosa", "Stefan", "Tara", "Viktor"]
LAST = ["Abbott", "Brennan", "Castillo", "Duarte", "Eriksen", "Fischer", "Gallo", "Horvat", "Ivanova", "Jensen",
        "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quinn", "Rossi", "Santos", "Tanaka"]
TOPICS = ["Finances", "Staffing", "Maintenance", "Safety", "Visitors", "Equipment", "Weather", "Supplies",
          "Construction", "Training", "Transport", "Archives", "Energy", "Community", "Research", "Inspections"]
FACILITIES = ["north reservoir", "main reading room", "east pier", "signal depot", "west dome", "surgical wing",
              "seed nursery", "engine hall", "drying barn", "turbine house", "old warehouse", "pumping station"]
ROLES = ["director", "chief engineer", "treasurer", "head of safety", "archivist", "site manager"]
ITEMS = ["tonnes of coal", "new lamps", "cubic metres of gravel", "spare valves", "oak beams", "rolls of cable",
         "boxes of records", "crates of glass", "sacks of grain", "copper pipes"]
PROBLEMS = ["a cracked foundation", "a leaking roof", "a shortage of staff", "rising fuel costs", "flood damage",
            "a broken crane", "outdated wiring", "a delayed shipment"]
FILLER = [
    "The committee met {n} times during the year and kept minutes of every meeting.",
    "Several residents wrote letters asking for longer opening hours.",
    "Routine checks found no serious faults in the {facility}.",
    "The budget for this area stayed close to the figure planned in the spring.",
    "Volunteers helped with cleaning work on {n} weekends.",
    "A short report on this subject was sent to the regional council in {month}.",
    "Most of the work was done by the permanent staff without outside help.",
    "The records for this section were checked twice before publication.",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _person(r: random.Random) -> str:
    return f"{r.choice(FIRST)} {r.choice(LAST)}"


def _fact(r: random.Random, k: int) -> tuple[str, str, str, str]:
    """(sentence, question, chosen answer, rejected answer) about section k."""
    kind = r.randrange(4)
    if kind == 0:
        p, role, fac, year = _person(r), r.choice(ROLES), r.choice(FACILITIES), r.randint(1950, 2020)
        wrong = year + r.choice([-7, -3, 4, 9])
        return (f"{p} was appointed {role} of the {fac} in {year}.",
                f"As described in the preceding text, in which year was {p} appointed {role} of the {fac}?",
                f"According to Section {k}, {p} became {role} of the {fac} in {year}.",
                f"The report suggests that {p} took the post around {wrong}, but the year is not stated clearly.")
    if kind == 1:
        n, item, month = r.randint(12, 980), r.choice(ITEMS), r.choice(MONTHS)
        wrong = n * 2 + r.randint(1, 9)
        return (f"In {month} the stores received {n} {item}.",
                f"As described in the preceding text, how many {item} did the stores receive in {month}?",
                f"Section {k} states that the stores received {n} {item} in {month}.",
                f"The stores received about {wrong} {item}, spread over several months.")
    if kind == 2:
        p, prob, fac = _person(r), r.choice(PROBLEMS), r.choice(FACILITIES)
        other = r.choice([x for x in PROBLEMS if x != prob])
        return (f"{p} reported that the main difficulty at the {fac} was {prob}.",
                f"As described in the preceding text, what did {p} name as the main difficulty at the {fac}?",
                f"In Section {k}, {p} names {prob} as the main difficulty at the {fac}.",
                f"{p} mentions several difficulties, most likely {other}.")
    fac, cost, year = r.choice(FACILITIES), r.randint(3, 95) * 1000, r.randint(1960, 2022)
    return (f"Repairs to the {fac} cost {cost} pounds and were finished in {year}.",
            f"As described in the preceding text, how much did the repairs to the {fac} cost?",
            f"Section {k} gives the cost of the repairs to the {fac} as {cost} pounds.",
            "The text does not give a cost for these repairs.")


def _section(r: random.Random, k: int, topic: str) -> tuple[str, list[tuple[str, str, str]]]:
    facts = [_fact(r, k) for _ in range(r.randint(2, 3))]
    sentences = [f[0] for f in facts]
    for _ in range(r.randint(3, 6)):
        sentences.append(r.choice(FILLER).format(n=r.randint(2, 14), facility=r.choice(FACILITIES),
                                                 month=r.choice(MONTHS)))
    r.shuffle(sentences)
    text = f"Section {k}: {topic}\n" + " ".join(sentences)
    return text, [f[1:] for f in facts]


def make_report(r: random.Random) -> tuple[str, list[tuple[str, list[tuple[str, str, str]]]]]:
    town, inst, year = r.choice(TOWNS), r.choice(INSTITUTIONS), r.randint(1990, 2023)
    topics = r.sample(TOPICS, r.randint(4, 10))
    intro = (f"Annual Report of the {town} {inst}, {year}\n"
             f"This report describes the work of the {town} {inst} during {year}. "
             f"It was prepared by {_person(r)} and approved by the board in {r.choice(MONTHS)}.")
    sections = [_section(r, k + 1, t) for k, t in enumerate(topics)]
    return "\n\n".join([intro] + [s for s, _ in sections]), sections


def longpo_records(seed: int = SEED, n: int = NUM_LONGPO) -> list[dict]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        document, sections = make_report(r)
        turns = []
        for k in r.sample(range(len(sections)), r.choice([1, 2])):
            text, facts = sections[k]
            q, good, bad = r.choice(facts)
            turns.append({"short_context": text, "instruction": q, "chosen": good, "rejected": bad})
        rec = {"id": f"report-{i:03d}", "document": document, "turns": turns}
        if i % 3 == 0:
            rec["system"] = "You answer questions about long reports. Quote the section you rely on."
        out.append(rec)
    return out


def pair_records(seed: int = SEED + 1, n: int = NUM_PAIRS) -> list[dict]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        document, sections = make_report(r)
        text, facts = r.choice(sections)
        q, good, bad = r.choice(facts)
        if i % 2 == 0:
            prompt, short = f"{document}\n\n{q}", f"{text}\n\n{q}"
            chosen, rejected = good, bad
        else:
            prompt = [{"role": "system", "content": "Answer from the report."}, {"role": "user", "content": f"{document}\n\n{q}"}]
            short = [{"role": "system", "content": "Answer from the report."}, {"role": "user", "content": f"{text}\n\n{q}"}]
            chosen = [{"role": "assistant", "content": good}]
            rejected = [{"role": "assistant", "content": bad}]
        out.append({"id": f"pair-{i:03d}", "prompt": prompt, "chosen": chosen, "rejected": rejected, "short_prompt": short})
    return out


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> bytes:
    from megatron_longpo.data.synthetic import train_sentencepiece

    return train_sentencepiece(texts, vocab_size=vocab_size, dummy_prefix=False)


def write_all(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    lp, pr = longpo_records(), pair_records()
    files = {
        "sample_longpo.jsonl": "".join(json.dumps(x) + "\n" for x in lp).encode(),
        "sample_pairs.jsonl": "".join(json.dumps(x) + "\n" for x in pr).encode(),
    }
    texts = [x["document"] for x in lp] + [t[k] for x in lp for t in x["turns"] for k in ("instruction", "chosen", "rejected")]
    files["tokenizer.model"] = train_tokenizer(texts)
    paths = []
    for name, data in files.items():
        tmp = out_dir / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(out_dir / name)
        paths.append(out_dir / name)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--check", action="store_true", help="verify the files in --out-dir are up to date")
    args = ap.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = write_all(Path(tmp))
            stale = [p.name for p in fresh
                     if not (Path(args.out_dir) / p.name).is_file()
                     or not filecmp.cmp(p, Path(args.out_dir) / p.name, shallow=False)]
        if stale:
            print(f"out of date in {args.out_dir}: {stale}; run examples/make_sample_data.py", file=sys.stderr)
            return 1
        print("sample data is up to date")
        return 0
    for p in write_all(Path(args.out_dir)):
        print(f"wrote {p} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
