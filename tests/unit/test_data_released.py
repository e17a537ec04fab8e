"""Import of the released tokenized LongPO data: parquet and save_to_disk inputs built locally to
the authors' schema give back exactly the samples preprocessing built (ids, masks, shared prefix,
reference turns); what cannot be mapped is refused naming FILE:row and the column."""

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_longpo.data.indexed import PreferenceDataset
from megatron_longpo.data.released import BAD_ROW, ImportOptions, import_released, main
from megatron_longpo.testing.released import authors_rows, released_rows, write_parquet, write_save_to_disk
from megatron_longpo.data.schema import DataError
from megatron_longpo.testing.reference import SAMPLE_TOKENIZER, make_dataset, synthetic_records


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A dataset made by preprocessing (one- and two-turn LongPO records)."""
    d = tmp_path_factory.mktemp("released")
    prefix = make_dataset(d / "pre" / "train", synthetic_records(7, seed=5))
    ds = PreferenceDataset(prefix)
    return d, ds, [ds[i] for i in range(len(ds))]


def _import(d, inputs, name, **kw):
    out = str(d / name / "train")
    meta = import_released(ImportOptions([str(x) for x in inputs], str(SAMPLE_TOKENIZER), out, progress=False, **kw),
                           log=lambda *_: None)
    return out, meta


def assert_same(a, b):
    assert a.id == b.id
    for f in ("prefix", "chosen_branch", "rejected_branch", "chosen_branch_mask", "rejected_branch_mask"):
        assert getattr(a, f).tolist() == getattr(b, f).tolist(), (a.id, f)
    assert len(a.references) == len(b.references)
    for x, y in zip(a.references, b.references):
        for f in ("chosen", "chosen_mask", "rejected", "rejected_mask"):
            assert getattr(x, f).tolist() == getattr(y, f).tolist(), (a.id, f)


def test_parquet_and_save_to_disk_round_trip(source):
    d, ds, samples = source
    rows = released_rows(samples, pad_id=0, left_pad_references=True)
    (d / "pq").mkdir()
    write_parquet(rows[:4], d / "pq" / "train-00000.parquet")
    write_parquet(rows[4:], d / "pq" / "train-00001.parquet")
    out, meta = _import(d, [d / "pq"], "from_parquet")
    got = PreferenceDataset(out)
    assert len(got) == len(samples) and meta["counts"]["records_written"] == len(samples)
    for i, s in enumerate(samples):
        assert_same(got[i], s)
    # the shared prefix was found from the ids: both layouts' lengths as preprocessing computed them
    for layout in ("two_sequences", "shared_prefix"):
        assert got.lengths(layout).tolist() == ds.lengths(layout).tolist()
        assert meta["lengths"][layout]["max"] == ds.meta["lengths"][layout]["max"]
    assert meta["counts"]["records_without_short_context"] == 0
    assert meta["tokenizer"]["fingerprint"] == ds.meta["tokenizer"]["fingerprint"]
    assert meta["bin_sha256"] == ds.meta["bin_sha256"]  # the very same token data
    # a datasets.save_to_disk directory gives the same dataset
    out2, meta2 = _import(d, [write_save_to_disk(rows, d / "disk")], "from_disk")
    assert meta2["bin_sha256"] == meta["bin_sha256"] and json.loads(Path(out2 + ".ids.json").read_text()) == got.ids
    # rows without reference turns: plain pairs, counted as without short context
    bare = released_rows(samples[:2], with_ids=False)
    for r in bare:
        for k in [k for k in r if k.startswith("ref_")]:
            r[k] = []
    out3, meta3 = _import(d, [write_parquet(bare, d / "bare.parquet")], "bare")
    assert meta3["counts"]["records_without_short_context"] == 2 and PreferenceDataset(out3).ids == ["bare-0", "bare-1"]


def test_unmappable_data_is_refused_clearly(source, capsys):
    d, _, samples = source
    rows = released_rows(samples[:3])
    f = write_parquet([{k: v for k, v in r.items() if k != "rejected_labels"} for r in rows], d / "nolab.parquet")
    with pytest.raises(DataError, match=r"nolab.parquet: missing column\(s\) \['rejected_labels'\]"):
        _import(d, [f], "x1")
    shifted = [dict(r) for r in rows]
    lab = shifted[1]["chosen_labels"]
    shifted[1]["chosen_labels"] = lab[1:] + [-100]  # labels shifted by one (next-token style)
    f = write_parquet(shifted, d / "shifted.parquet")
    with pytest.raises(DataError, match=r"shifted.parquet:row 1: chosen_labels differ from chosen_input_ids at token "
                                        r"\d+ .*unshifted\)\nNothing was written.*--skip-invalid"):
        _import(d, [f], "x2")
    assert not (d / "x2").exists() or not list((d / "x2").glob("train*"))
    other = [dict(r, prompt_id="other-" + r["prompt_id"]) for r in rows]
    other[2]["rejected_input_ids"] = [other[2]["rejected_input_ids"][0] + 1] + other[2]["rejected_input_ids"][1:]
    other[2]["rejected_labels"] = list(other[2]["rejected_labels"])
    f = write_parquet(other, d / "other.parquet")
    with pytest.raises(DataError, match=r"other.parquet:row 2: chosen and rejected prompts differ at token 0"):
        _import(d, [f], "x3")
    big = [dict(r) for r in rows]
    big[0]["ref_chosen_input_ids"] = [[x + 10_000 for x in t] for t in big[0]["ref_chosen_input_ids"]]
    big[0]["ref_chosen_labels"] = [[x + 10_000 if x != -100 else x for x in t] for t in big[0]["ref_chosen_labels"]]
    f = write_parquet(big, d / "big.parquet")
    with pytest.raises(DataError, match=r"big.parquet:row 0: turn 0: ref_chosen_input_ids holds id \d+ outside the "
                                        r"tokenizer's 768 tokens"):
        _import(d, [f], "x4")
    # --skip-invalid: dropped, counted, listed
    out, meta = _import(d, [d / "shifted.parquet", d / "other.parquet"], "skip", skip_invalid=True)
    assert meta["counts"]["rejected"] == {BAD_ROW: 2} and meta["num_samples"] == 4
    listed = [json.loads(x) for x in Path(out + ".rejected.jsonl").read_text().splitlines()]
    assert [x["source"].rsplit("/", 1)[1] for x in listed] == ["shifted.parquet:row 1", "other.parquet:row 2"]
    # the CLI: exit 2 with the message, before writing anything
    assert main(["--input", str(d / "nothere"), "--tokenizer", str(SAMPLE_TOKENIZER), "--output-prefix",
                 str(d / "cli" / "t"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err and not (d / "cli").exists()


def test_flat_reference_columns_are_one_turn(source):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d, _, samples = source
    one_turn = [s for s in samples if s.num_turns == 1][:2]
    rows = released_rows(one_turn)
    cols = {k: [r[k][0] if k.startswith("ref_") else r[k] for r in rows] for k in rows[0]}
    pq.write_table(pa.table({k: pa.array(v) for k, v in cols.items()}), str(d / "flat.parquet"))
    out, _ = _import(d, [d / "flat.parquet"], "flat")
    got = PreferenceDataset(out)
    for i, s in enumerate(one_turn):
        assert_same(got[i], s)


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    """Rows made with the logic of the authors' data_prepare/format_tokenize.py on a Qwen2-style
    tokenizer (default system prompt, add_generation_prompt=True after the final answer)."""
    from megatron_longpo.data.synthetic import corpus, make_qwen2_like_tokenizer

    d = tmp_path_factory.mktemp("authors")
    tok = make_qwen2_like_tokenizer(d / "qwen2", corpus(0))
    records = synthetic_records(5, seed=11)
    return d, tok, records


def _labelled(row, key, k=None):
    ids, att, lab = (np.asarray(row[f"{key}_{f}"]) for f in ("input_ids", "attention_mask", "labels"))
    ids, att, lab = (x.reshape(-1, x.shape[-1])[0 if k is None else k] for x in (ids, att, lab))
    keep = att == 1
    return ids[keep], (lab[keep] != -100).astype(np.uint8)


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flat"])
def test_authors_format_tokenize_rows_import_exactly(authors, flat):
    """Rows built like the authors' format_tokenize.py (nested [[...]] chosen/rejected, labels from
    searching <|im_start|>assistant / <|im_start|>user) were refused ("attention_mask has gaps")."""
    from transformers import AutoTokenizer

    from megatron_longpo.data.tokenizer import Tokenizer

    d, tok_dir, records = authors
    rows = authors_rows(records, tok_dir, flat=flat)
    assert np.asarray(rows[0]["chosen_input_ids"]).ndim == (1 if flat else 2)
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    gen = hf.encode("<|im_start|>assistant\n", add_special_tokens=False)
    resp = hf.encode("<|im_start|>assistant", add_special_tokens=False)
    first = hf.decode(rows[0]["chosen_input_ids"][0] if not flat else rows[0]["chosen_input_ids"])
    assert first.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    name = "nested" if flat is False else "flat"
    write_parquet(rows, d / f"{name}.parquet")
    for mode in ("keep", "drop"):
        out = str(d / f"{name}-{mode}" / "train")
        meta = import_released(ImportOptions([str(d / f"{name}.parquet")], str(tok_dir), out, progress=False,
                                             trailing_generation_prompt=mode), log=lambda *_: None)
        got = PreferenceDataset(out)
        turns = sum(len(r["turns"]) for r in records)
        # every policy and reference sequence ends with the labelled "<|im_start|>assistant\n"
        assert meta["counts"]["trailing_generation_prompt_sequences"] == 2 * len(records) + 2 * turns
        cut = len(gen) if mode == "drop" else 0
        for i, row in enumerate(rows):
            s = got[i]
            for key, ids, mask in (("chosen", s.chosen, s.chosen_mask), ("rejected", s.rejected, s.rejected_mask)):
                want_ids, want_mask = _labelled(row, key)
                assert want_ids[-len(gen):].tolist() == gen and want_mask[-len(gen):].all()
                # the "\n" after "assistant" opens each labelled span, as the authors' labels have it
                first_resp = int(np.argmax(want_mask))
                assert want_ids[first_resp - len(resp):first_resp].tolist() == resp
                assert hf.decode(want_ids[first_resp:first_resp + 1]).startswith("\n")
                assert ids.tolist() == want_ids[:len(want_ids) - cut].tolist()
                assert mask.tolist() == want_mask[:len(want_mask) - cut].tolist()
            assert s.num_turns == len(records[i]["turns"])
            for k, t in enumerate(s.references):
                for key, ids, mask in (("ref_chosen", t.chosen, t.chosen_mask), ("ref_rejected", t.rejected, t.rejected_mask)):
                    want_ids, want_mask = _labelled(row, key, k)
                    assert ids.tolist() == want_ids[:len(want_ids) - cut].tolist()
                    assert mask.tolist() == want_mask[:len(want_mask) - cut].tolist()
    assert Tokenizer(tok_dir).vocab_size > max(max(r["chosen_input_ids"] if flat else r["chosen_input_ids"][0]) for r in rows)


def test_several_rows_in_one_sequence_cell_are_refused(authors):
    d, tok_dir, records = authors
    rows = authors_rows(records[:1], tok_dir)
    for f in ("input_ids", "attention_mask", "labels"):
        rows[0][f"chosen_{f}"] = rows[0][f"chosen_{f}"] * 2  # a [2, L] batch in one cell
    write_parquet(rows, d / "two.parquet")
    with pytest.raises(DataError, match=r"two.parquet:row 0: chosen_input_ids has shape \[2, \d+\]; expected one"):
        import_released(ImportOptions([str(d / "two.parquet")], str(tok_dir), str(d / "two" / "t"), progress=False),
                        log=lambda *_: None)
