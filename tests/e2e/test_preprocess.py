"""tools/preprocess_data.py as users run it (subprocess), and the bundled sample data."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_on_sample_data_with_bad_records(tmp_path):
    extra = tmp_path / "extra.jsonl"
    fact = "The key fact is 42."
    big_doc = " ".join(["word"] * 1500 + [fact] + ["word"] * 1500)
    extra.write_text("\n".join([
        '{"id": "bad", "document": "x", "turns": [{"instruction": "q"}]}',
        json.dumps({"id": "long", "document": big_doc, "turns": [
            {"short_context": fact, "instruction": "q?", "chosen": "a.", "rejected": "b."}]}),
        # its short context is not in the document: truncation could not keep it, so it is dropped
        json.dumps({"id": "ungrounded", "document": big_doc, "turns": [
            {"short_context": "A chunk about the harbour.", "instruction": "q?", "chosen": "a.", "rejected": "b."}]}),
    ]) + "\n")
    out = tmp_path / "out" / "train"
    r = cli("--input", DATA / "sample_longpo.jsonl", DATA / "sample_pairs.jsonl", extra,
            "--tokenizer", DATA / "tokenizer.model", "--output-prefix", out, "--max-seq-length", 2048,
            "--overlong", "truncate_document", "--skip-invalid", "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "51 records read, 49 written (37 LongPO, 12 plain pairs" in r.stdout
    assert "dropped: 2 (missing_field: 1, overlong_short_context: 1)" in r.stdout
    assert "truncated documents: 1 records" in r.stdout
    for ext in (".bin", ".idx", ".ids.json", ".json", ".rejected.jsonl"):
        assert (tmp_path / "out" / f"train{ext}").is_file(), ext
    meta = json.loads((tmp_path / "out" / "train.json").read_text())
    assert meta["num_samples"] == 49 and meta["lengths"]["two_sequences"]["max"] == 2048
    rejected = [json.loads(x) for x in (tmp_path / "out" / "train.rejected.jsonl").read_text().splitlines()]
    assert rejected[0]["source"] == f"{extra}:1" and "turns[0].short_context' is missing" in rejected[0]["message"]
    assert rejected[1]["id"] == "ungrounded" and rejected[1]["reason"] == "overlong_short_context"


def test_cli_bad_input_exits_with_message_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "p", "chosen": "c", "rejected": "r"}\n{"id": "b", "prompt": 5}\n')
    r = cli("--input", bad, "--tokenizer", DATA / "tokenizer.model", "--output-prefix", tmp_path / "o",
            "--max-seq-length", 128)
    assert r.returncode == 2
    assert "preprocess_data.py: error: 1 invalid record(s) in the input; nothing was written" in r.stderr
    assert f"{bad}:2: field 'prompt' must be a string or a list of chat messages, got int" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
    r = cli("--input", bad, "--tokenizer", tmp_path / "missing.model", "--output-prefix", tmp_path / "o",
            "--max-seq-length", 128)
    assert r.returncode == 2 and "tokenizer" in r.stderr and "does not exist" in r.stderr


def test_bundled_sample_data_is_reproducible_and_small():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "make_sample_data.py"), "--check"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sum(p.stat().st_size for p in DATA.iterdir() if p.is_file()) < 1_000_000
