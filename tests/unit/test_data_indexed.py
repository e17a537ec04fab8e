"""Preprocess -> indexed dataset: round trip against in-memory building, determinism over workers,
atomic writes, counts and rejected records, start-up checks for the trainer."""

import json
import re
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_longpo.config import ConfigError
from megatron_longpo.data.indexed import (
    PreferenceDataset,
    PreferenceDatasetWriter,
    check_dataset_fits,
    check_dataset_supports_mode,
    check_dataset_vocab,
    load_metadata,
)
from megatron_longpo.data.layout import pair_batches
from megatron_longpo.data.preprocess import PreprocessOptions, preprocess
from megatron_longpo.data.sample import PreferenceSample, ReferenceTurn
from megatron_longpo.data.sampler import PreferenceSampler
from megatron_longpo.data.schema import DataError, read_records
from megatron_longpo.data.sequences import build_sample
from megatron_longpo.data.synthetic import random_text
from megatron_longpo.data.templates import get_template
from megatron_longpo.data.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
TOKENIZER = str(DATA / "tokenizer.model")
LONGPO = str(DATA / "sample_longpo.jsonl")
PAIRS = str(DATA / "sample_pairs.jsonl")


def run(tmp_path, inputs, name="ds", **kw):
    kw.setdefault("max_seq_length", 4096)
    opts = PreprocessOptions(inputs=[str(i) for i in inputs], tokenizer=TOKENIZER,
                             output_prefix=str(tmp_path / name), progress=False, **kw)
    logs = []
    res = preprocess(opts, log=logs.append)
    return res, "\n".join(logs)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def longpo(i, doc_words=30, **kw):
    rec = {"id": f"r{i}", "document": random_text(doc_words, seed=i),
           "turns": [{"short_context": "ctx", "instruction": f"Q{i}?", "chosen": f"Answer {i}.", "rejected": "No."}]}
    rec.update(kw)
    return rec


def arrays_equal(a: PreferenceSample, b: PreferenceSample):
    for f in ("prefix", "chosen_branch", "rejected_branch", "chosen_branch_mask", "rejected_branch_mask"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert len(a.references) == len(b.references)
    for x, y in zip(a.references, b.references):
        for f in ("chosen", "chosen_mask", "rejected", "rejected_mask"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


def test_round_trip_equals_in_memory_building(tmp_path):
    res, log = run(tmp_path, [LONGPO, PAIRS])
    ds = PreferenceDataset(str(tmp_path / "ds"))
    tok = Tokenizer(TOKENIZER)
    tpl = get_template("auto", tok)
    records = [r for r, _ in read_records([LONGPO, PAIRS])]
    assert len(ds) == len(records) == res.meta["counts"]["records_written"]
    for i, rec in enumerate(records):
        want = build_sample(rec, tok, tpl).sample
        got = ds[i]
        assert got.id == rec.id == ds.ids[i] and got.index == i
        arrays_equal(got, want)
        assert ds.num_turns[i] == len(want.references)
    assert list(ds.lengths("two_sequences")) == [ds[i].two_sequences_length for i in range(len(ds))]
    assert list(ds.lengths("shared_prefix")) == [ds[i].shared_prefix_length for i in range(len(ds))]
    meta = ds.meta
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint and meta["template"]["name"] == "mistral"
    assert meta["lengths"]["two_sequences"]["max"] == int(ds.lengths("two_sequences").max())
    assert meta["counts"]["longpo_records"] == 36 and meta["counts"]["pair_records"] == 12
    assert meta["token_dtype"] == "uint16"
    assert "48 records read, 48 written" in log


def test_workers_give_identical_output(tmp_path):
    r1, _ = run(tmp_path, [LONGPO], name="w1", workers=1)
    r2, _ = run(tmp_path, [LONGPO], name="w2", workers=2)
    for ext in (".bin", ".idx", ".ids.json"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    drop = ("workers", "tokens_per_second", "created")
    assert {k: v for k, v in r1.meta.items() if k not in drop} == {k: v for k, v in r2.meta.items() if k not in drop}


def test_int32_tokens_for_large_vocabularies(tmp_path):
    rng = np.random.default_rng(0)
    cb = np.array([70001, 5, 9]), np.array([0, 1, 1], np.uint8)
    s = PreferenceSample("a", rng.integers(0, 70010, 7), cb[0], np.array([70001, 4]), cb[1], np.array([0, 1], np.uint8),
                         [ReferenceTurn(np.array([1, 69999]), np.array([0, 1]), np.array([2, 3]), np.array([0, 1]))])
    w = PreferenceDatasetWriter(str(tmp_path / "big"), vocab_size=70010)
    w.add(s)
    w.commit({"counts": {}, "lengths": {}, "tokenizer": {"pad_id": 0}})
    ds = PreferenceDataset(str(tmp_path / "big"))
    assert ds.meta["token_dtype"] == "int32"
    arrays_equal(ds[0], s)


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_leaves_no_dataset(tmp_path, workers):
    recs = [longpo(i) for i in range(5)] + [longpo(9, doc_words=2000)] + [longpo(i) for i in range(10, 14)]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    with pytest.raises(DataError, match=r"1 of 10 records need more .*in.jsonl:6 'r9' \(\d+ tokens\)"):
        run(tmp_path, [inp], max_seq_length=512, workers=workers)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # no final files, no temp files


def test_incomplete_or_missing_dataset_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist .*create it with tools/preprocess_data.py"):
        load_metadata(str(tmp_path / "nothing"))
    run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", [longpo(0)])])
    prefix = str(tmp_path / "ds")
    os.remove(prefix + ".json")  # as if the process died before the sidecar rename
    with pytest.raises(DataError, match=r"incomplete \(.*ds.json is missing; preprocessing did not finish\); re-run"):
        PreferenceDataset(prefix)


def test_existing_output_needs_overwrite_and_stale_rejects_go(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [longpo(0), "{bad json", longpo(1)])
    run(tmp_path, [inp], skip_invalid=True)
    assert (tmp_path / "ds.rejected.jsonl").exists()
    write_jsonl(inp, [longpo(0)])
    with pytest.raises(DataError, match=r"ds.bin already exists; pass --overwrite"):
        run(tmp_path, [inp])
    run(tmp_path, [inp], overwrite=True)
    assert len(PreferenceDataset(str(tmp_path / "ds"))) == 1
    assert not (tmp_path / "ds.rejected.jsonl").exists()


def test_invalid_records_fail_before_writing_or_are_skipped(tmp_path):
    recs = [longpo(0), "{not json", longpo(1, turns=[]), longpo(0), {"id": "p", "prompt": "x", "chosen": "y"},
            longpo(2)]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    with pytest.raises(DataError) as e:
        run(tmp_path, [inp])
    msg = str(e.value)
    assert msg.startswith("4 invalid record(s) in the input; nothing was written")
    for text in (f"{inp}:2: malformed JSON", f"{inp}:3: field 'turns' is empty",
                 f"{inp}:4: field 'id': duplicate id 'r0'", f"{inp}:5: field 'rejected' is missing", "--skip-invalid"):
        assert text in msg, text
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
    res, log = run(tmp_path, [inp], skip_invalid=True)
    assert res.meta["counts"]["records_read"] == 6 and res.meta["counts"]["records_written"] == 2
    assert res.meta["counts"]["rejected"] == {"duplicate_id": 1, "empty_turns": 1, "malformed_json": 1,
                                              "missing_field": 1}
    rejected = [json.loads(x) for x in (tmp_path / "ds.rejected.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejected] == ["malformed_json", "empty_turns", "duplicate_id", "missing_field"]
    assert [r["source"] for r in rejected] == [f"{inp}:{n}" for n in (2, 3, 4, 5)]
    assert rejected[0]["record"] == "{not json" and rejected[2]["record"]["id"] == "r0"
    assert "dropped: 4 (duplicate_id: 1, empty_turns: 1, malformed_json: 1, missing_field: 1)" in log
    assert PreferenceDataset(str(tmp_path / "ds")).ids == ["r0", "r2"]


def test_identical_pairs_are_counted(tmp_path):
    same = longpo(1)
    same["turns"][0]["rejected"] = same["turns"][0]["chosen"]
    inp = write_jsonl(tmp_path / "in.jsonl", [longpo(0), same])
    res, log = run(tmp_path, [inp])
    assert res.meta["counts"]["chosen_equals_rejected_records"] == 1 and res.meta["counts"]["records_written"] == 2
    assert "chosen == rejected: 1 records, 1 turns (kept" in log
    res, log = run(tmp_path, [inp], name="d2", drop_identical=True)
    assert res.meta["counts"]["rejected"] == {"chosen_equals_rejected": 1}


def test_overlong_counts(tmp_path):
    recs = [longpo(0), longpo(1, doc_words=600), longpo(2)]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    res, log = run(tmp_path, [inp], max_seq_length=300, overlong="drop")
    assert res.meta["counts"]["rejected"] == {"overlong": 1} and res.meta["counts"]["records_written"] == 2
    assert json.loads((tmp_path / "ds.rejected.jsonl").read_text())["id"] == "r1"
    # truncation keeps the turn's short context: r1's is a passage of its document; r3's ("ctx") is
    # nowhere in it, so r3 cannot be truncated without losing it and is dropped, counted
    long_doc = recs[1]["document"]
    recs[1]["turns"][0]["short_context"] = " ".join(long_doc.split()[300:320])
    inp = write_jsonl(tmp_path / "in2.jsonl", recs + [longpo(3, doc_words=600)])
    res, log = run(tmp_path, [inp], name="t", max_seq_length=300, overlong="truncate_document")
    c = res.meta["counts"]
    assert c["truncated_records"] == 1 and c["truncated_document_tokens"] > 0 and c["records_written"] == 3
    assert c["rejected"] == {"overlong_short_context": 1}
    assert res.meta["lengths"]["two_sequences"]["max"] == 300
    assert "truncated documents: 1 records" in log
    with pytest.raises(DataError, match="--overlong drop needs --max-seq-length"):
        run(tmp_path, [inp], name="x", max_seq_length=None, overlong="drop")


def test_overlong_error_reports_every_record_at_once_and_writes_nothing(tmp_path):
    recs = [longpo(0), longpo(1, doc_words=600), longpo(2), longpo(3, doc_words=900)]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    with pytest.raises(DataError) as e:
        run(tmp_path, [inp], max_seq_length=300, overlong="error")
    msg = str(e.value)
    # Both offenders, longest first, with the bound that would fit them; not just the first one met.
    lengths = [int(x) for x in re.findall(r"\((\d+) tokens\)", msg)]
    assert "2 of 4 records need more than --max-seq-length 300" in msg and "'r3'" in msg and "'r1'" in msg
    assert msg.index("'r3'") < msg.index("'r1'") and f"to >= {max(lengths)}" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing written
    res, _ = run(tmp_path, [inp], max_seq_length=max(lengths), overlong="error")  # the suggested bound fits all
    assert res.meta["counts"]["records_written"] == 4


def test_mode_checks_for_the_trainer(tmp_path):
    pairs = [{"id": "a", "prompt": "Doc. Q?", "chosen": "Y.", "rejected": "N.", "short_prompt": "Q?"},
             {"id": "b", "prompt": "Doc. Q2?", "chosen": "Y.", "rejected": "N."}]
    res, log = run(tmp_path, [write_jsonl(tmp_path / "p.jsonl", pairs)])
    assert "1 pair records have no short_prompt: train with loss.mode=dpo or sft" in log
    with pytest.raises(ConfigError, match=r"data.train_data: 1 of 2 samples are plain pair records without "
                                          r"'short_prompt'.*use loss.mode=dpo .* or loss.mode=sft"):
        check_dataset_supports_mode(res.meta, "longpo")
    check_dataset_supports_mode(res.meta, "dpo")
    check_dataset_supports_mode(res.meta, None)  # sft, sft_rejected: no reference
    ok, _ = run(tmp_path, [LONGPO], name="lp")
    check_dataset_supports_mode(ok.meta, "longpo")
    two, shared = ok.meta["lengths"]["two_sequences"]["max"], ok.meta["lengths"]["shared_prefix"]["max"]
    check_dataset_fits(ok.meta, "two_sequences", two)
    with pytest.raises(ConfigError, match=rf"needs {shared} tokens in the shared_prefix layout, more than "
                                          rf"data.max_seq_length={two}; raise data.max_seq_length, use "
                                          "data.pair_layout=two_sequences"):
        check_dataset_fits(ok.meta, "shared_prefix", two)
    with pytest.raises(ConfigError, match="dataset tokenizer has 768 tokens but model.vocab_size is 512"):
        check_dataset_vocab(ok.meta, 512)


def test_pair_batches_follow_the_sampler(tmp_path):
    run(tmp_path, [LONGPO])
    ds = PreferenceDataset(str(tmp_path / "ds"))
    sampler = PreferenceSampler(len(ds), 2, 1, 2, seed=0)
    expect = PreferenceSampler(len(ds), 2, 1, 2, seed=0)
    for batch, idx in zip(pair_batches(ds, sampler, "shared_prefix", 8), expect):
        assert batch.sample_index.tolist() == idx
        assert batch.tokens.shape[0] == 2 and batch.seq_len % 8 == 0
        np.testing.assert_array_equal(batch.tokens[0, : ds[idx[0]].prefix_length].numpy(), ds[idx[0]].prefix)
        if sampler.consumed_samples >= 12:
            break


def test_hf_tokenizer_directory_with_workers(tmp_path):
    from megatron_longpo.data.synthetic import corpus, make_hf_tokenizer

    jinja = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
             "{% endfor %}")
    hf_dir = make_hf_tokenizer(tmp_path / "hf", corpus(), jinja)
    recs = [longpo(i, system="Sys." if i % 2 else None) for i in range(6)]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    opts = PreprocessOptions(inputs=[str(inp)], tokenizer=str(hf_dir), output_prefix=str(tmp_path / "hf_ds"),
                             max_seq_length=4096, workers=2, progress=False)
    res = preprocess(opts, log=lambda s: None)
    assert res.meta["template"]["name"] == "tokenizer" and res.meta["tokenizer"]["kind"] == "hf"
    ds = PreferenceDataset(str(tmp_path / "hf_ds"))
    tok = Tokenizer(hf_dir)
    tpl = get_template("auto", tok)
    for i, (rec, _) in enumerate(read_records([inp])):
        arrays_equal(ds[i], build_sample(rec, tok, tpl).sample)
        assert tok.decode(ds[i].chosen).startswith("<|im_start|>" + ("system\nSys." if i % 2 else "user\n"))


def test_check_dataset_files_names_the_option(tmp_path):
    from megatron_longpo.data.checks import check_dataset_files

    with pytest.raises(ConfigError, match=r"data.valid_data=.*nothing: dataset .* does not exist"):
        check_dataset_files(str(tmp_path / "nothing"), "data.valid_data")
    run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", [longpo(0)])])
    assert check_dataset_files(str(tmp_path / "ds"))["num_samples"] == 1
    os.remove(tmp_path / "ds.idx")
    with pytest.raises(ConfigError, match=r"data.train_data=.*ds: dataset .*ds.idx is missing; re-run"):
        check_dataset_files(str(tmp_path / "ds"))


def test_max_seq_length_bounds_the_shared_prefix_row_when_asked(tmp_path):
    recs = [longpo(i) for i in range(3)] + [longpo(3, doc_words=240)]
    recs[3]["turns"][0]["short_context"] = " ".join(recs[3]["document"].split()[100:120])  # grounded: truncatable
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    two, _ = run(tmp_path, [inp], name="two", max_seq_length=None)
    lens = two.meta["lengths"]
    bound = int(lens["two_sequences"]["max"])  # fits every two_sequences row, not the longest shared_prefix row
    assert lens["shared_prefix"]["max"] > bound
    res, _ = run(tmp_path, [inp], name="a", max_seq_length=bound)
    assert res.meta["counts"]["records_written"] == 4  # two_sequences bound: all fit
    res, _ = run(tmp_path, [inp], name="b", max_seq_length=bound, pair_layout="shared_prefix", overlong="truncate_document")
    # The same bound on the shared_prefix row: records over it are truncated to fit the layout the trainer uses.
    assert res.meta["lengths"]["shared_prefix"]["max"] <= bound and res.meta["counts"]["truncated_records"] >= 1
    assert res.meta["options"]["pair_layout"] == "shared_prefix"
    with pytest.raises(DataError, match=r"need more than --max-seq-length"):
        run(tmp_path, [inp], name="c", max_seq_length=bound, pair_layout="shared_prefix")


def _ascii_only_sentencepiece(path, with_brackets: bool):
    """A tokenizer WITHOUT byte fallback that has seen only ASCII letters (and brackets if asked)."""
    import sentencepiece as spm

    lines = [random_text(40, seed=i) + (" [INST] [/INST]" if with_brackets else "") for i in range(60)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path), vocab_size=300,
                                   model_type="bpe", byte_fallback=False, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=3, minloglevel=2, num_threads=1)
    return str(path) + ".model"


def test_unknown_tokens_are_counted_and_unexpressible_markers_refused(tmp_path):
    tok = _ascii_only_sentencepiece(tmp_path / "ascii", with_brackets=True)
    recs = [longpo(0), longpo(1), dict(longpo(2), document="Tokyo is 東京 and München.")]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    logs = []
    res = preprocess(PreprocessOptions(inputs=[str(inp)], tokenizer=tok, output_prefix=str(tmp_path / "u"),
                                       chat_template="mistral", progress=False), log=logs.append)
    c = res.meta["counts"]
    base = preprocess(PreprocessOptions(inputs=[str(write_jsonl(tmp_path / "in0.jsonl", recs[:2]))], tokenizer=tok,
                                        output_prefix=str(tmp_path / "u0"), chat_template="mistral", progress=False),
                      log=lambda *_: None).meta["counts"]
    assert c["unk_tokens"] >= base["unk_tokens"] + 3  # 東, 京 and ü have no piece and no byte fallback
    assert c["unk_records"] == base["unk_records"] + 1
    assert f"WARNING: {c['unk_tokens']} tokens in {c['unk_records']} records" in logs[0] and "unknown token" in logs[0]
    no_brackets = _ascii_only_sentencepiece(tmp_path / "nob", with_brackets=False)
    with pytest.raises(DataError, match=r"turns the mistral template marker '\[INST\]' into its unknown token"):
        preprocess(PreprocessOptions(inputs=[str(inp)], tokenizer=no_brackets, output_prefix=str(tmp_path / "v"),
                                     chat_template="mistral", progress=False), log=logs.append)


def test_parquet_and_save_to_disk_inputs_with_auto_ids_equal_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [longpo(i) for i in range(4)]
    pairs = [{"prompt": "Doc. Q?", "chosen": "Yes.", "rejected": "No.", "short_prompt": "Q?"},
             {"prompt": "Doc two. Q?", "chosen": "Sure.", "rejected": "Nope.", "short_prompt": "Q?"}]
    ref, _ = run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", recs)], name="ref")
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(recs[:2]), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(recs[2:]), tmp_path / "pq" / "b.parquet")
    got, _ = run(tmp_path, [tmp_path / "pq"], name="got")
    assert got.meta["bin_sha256"] == ref.meta["bin_sha256"]  # the same samples, token for token
    # A TRL-style file without ids: refused, or ids from the source with --auto-id.
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "trl.parquet")
    with pytest.raises(DataError, match=r"trl.parquet:row 0.*'id'") as e:
        run(tmp_path, [tmp_path / "trl.parquet"], name="x")
    # the fix is --auto-id, not --skip-invalid (which would drop every record)
    assert "pass --auto-id" in str(e.value) and "--skip-invalid" not in str(e.value)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [pairs[0], {"id": "b", "prompt": "P", "chosen": 3, "rejected": "r"}])
    with pytest.raises(DataError, match=r"--skip-invalid to drop them.*1 of them only lack an 'id': --auto-id"):
        run(tmp_path, [mixed], name="m")
    res, _ = run(tmp_path, [tmp_path / "trl.parquet"], name="trl", auto_id=True)
    ids = json.loads((tmp_path / "trl.ids.json").read_text())
    assert res.meta["counts"]["records_written"] == 2 and ids == [f"{tmp_path / 'trl.parquet'}:row {i}" for i in (0, 1)]
    # A datasets.save_to_disk directory (arrow stream + state.json), as HF `datasets` writes it.
    d = tmp_path / "disk"
    d.mkdir()
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as f, \
            pa.ipc.new_stream(f, pa.Table.from_pylist(recs).schema) as w:
        w.write_table(pa.Table.from_pylist(recs))
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    disk, _ = run(tmp_path, [d], name="disk")
    assert disk.meta["bin_sha256"] == ref.meta["bin_sha256"]


@pytest.mark.parametrize("suffix", [".bin", ".idx", ".json"])
def test_a_dataset_file_named_instead_of_its_prefix_is_explained(tmp_path, suffix):
    """data.train_data=NAME.bin once said only 'does not exist'; now it names the prefix to pass."""
    run(tmp_path, [write_jsonl(tmp_path / "in.jsonl", [longpo(0)])])
    prefix = str(tmp_path / "ds")
    for opener in (load_metadata, PreferenceDataset):
        with pytest.raises(DataError, match=rf"{suffix} is a file of the dataset {prefix}: pass the prefix {prefix} "):
            opener(prefix + suffix)
    with pytest.raises(DataError, match="create it with tools/preprocess_data.py"):
        load_metadata(str(tmp_path / "other.bin"))  # no such dataset: no prefix advice
