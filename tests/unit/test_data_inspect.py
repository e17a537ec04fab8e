"""tools/inspect_data.py: the --json masks are the targets the trainer's batch builder uses
(build_pair_batch), the terminal view shows the decoded text with the response targets marked."""

import json

import numpy as np
import pytest

from megatron_longpo.data.indexed import PreferenceDataset
from megatron_longpo.data.inspect import main, sample_record
from megatron_longpo.data.layout import build_pair_batch
from megatron_longpo.testing.reference import make_dataset, synthetic_records


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return PreferenceDataset(make_dataset(tmp_path_factory.mktemp("inspect") / "train", synthetic_records(4, seed=1)))


def _targets(batch, row, length, column):
    """Per-token target mask of one row from the per-position segments (position t targets token t+1)."""
    seg = getattr(batch, column)[row].numpy()
    m = np.zeros(length, dtype=int)
    m[1:] = seg[: length - 1] >= 0
    return m.tolist()


@pytest.mark.parametrize("nll_target", ["sequence", "responses"])
def test_json_masks_are_the_trainers_targets(ds, nll_target):
    s = ds[0]
    rec = sample_record(s, nll_target)
    assert set(rec) == {"id", "index", "policy_chosen", "policy_rejected", "reference"}
    b = build_pair_batch([s], "two_sequences", 1, ds.pad_id, nll_target=nll_target)
    for row, key in ((0, "policy_chosen"), (1, "policy_rejected")):
        seq = rec[key]
        assert seq["input_ids"] == b.tokens[row, : len(seq["input_ids"])].tolist()
        assert seq["response_mask"] == _targets(b, row, len(seq["input_ids"]), "response_segment")
        assert seq["nll_mask"] == _targets(b, row, len(seq["input_ids"]), "nll_segment")
    assert len(rec["reference"]) == s.num_turns == 2  # record 0 has two turns
    for t, ref in zip(s.references, rec["reference"]):
        assert ref["chosen"] == {"input_ids": t.chosen.tolist(), "response_mask": t.chosen_mask.tolist()}
        assert ref["rejected"] == {"input_ids": t.rejected.tolist(), "response_mask": t.rejected_mask.tolist()}


def test_cli_json_text_and_errors(ds, capsys):
    assert main([ds.prefix, "--id", ds.ids[2], "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["id"] == ds.ids[2] and rec["index"] == 2
    assert main([ds.prefix, "--index", "0", "--color", "never"]) == 0
    out = capsys.readouterr().out
    s = ds[0]
    assert f"policy chosen S_w: {len(s.chosen)} tokens, {int(s.chosen_mask.sum())} response targets" in out
    with open(ds.prefix + ".records.jsonl") as f:
        first = json.loads(f.readline())
    for t in first["turns"]:
        assert f"⟦{t['chosen']}</s>⟧" in out and f"⟦{t['rejected']}</s>⟧" in out
    assert first["turns"][0]["short_context"] in out and "[INST]" in out
    assert main([ds.prefix, "--index", "9"]) == 2
    assert "--index 9 is out of range: dataset" in capsys.readouterr().err
    assert main([ds.prefix, "--id", "nope"]) == 2
    assert "has no sample with id 'nope'" in capsys.readouterr().err
