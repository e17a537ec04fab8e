"""Every start-up check of pretrain_longpo.py fails fast with a message naming option and fix."""

import json
from pathlib import Path

import pytest

from megatron_longpo.config import ConfigError, LongPOConfig, ModelConfig, apply_overrides
from megatron_longpo.training.preflight import check_before_init

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from megatron_longpo.data.preprocess import main

    d = tmp_path_factory.mktemp("pf")
    assert main(["--input", str(ROOT / "examples/data/sample_longpo.jsonl"), "--tokenizer",
                 str(ROOT / "examples/data/tokenizer.model"), "--output-prefix", str(d / "train"),
                 "--max-seq-length", "2048", "--no-progress"]) == 0
    return str(d / "train")


def _cfg(**over):
    base = LongPOConfig(model=ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4,
                                          num_query_groups=2, vocab_size=768))
    return apply_overrides(base, [f"--{k}={v}" for k, v in over.items()])


def _fake_checkpoint(path: Path, model: ModelConfig) -> None:
    from megatron_longpo.checkpoint.format import new_meta

    it = path / "iter_0000000"
    it.mkdir(parents=True)
    (it / "longpo_meta.json").write_text(json.dumps(new_meta(model, 0).to_json()))
    (path / "latest_checkpointed_iteration.txt").write_text("0")


def _fails(cfg, *needles):
    with pytest.raises(ConfigError) as e:
        check_before_init(cfg)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_train_data_unset():
    _fails(_cfg(), "data.train_data is not set", "tools/preprocess_data.py")


def test_train_data_missing(tmp_path):
    _fails(_cfg(**{"data.train_data": tmp_path / "nope", "loss.mode": "sft"}), f"data.train_data={tmp_path / 'nope'}")


def test_sft_needs_no_reference(dataset):
    check_before_init(_cfg(**{"data.train_data": dataset, "loss.mode": "sft"}))


def test_cache_unset(dataset):
    _fails(_cfg(**{"data.train_data": dataset}), "reference.cache_path", "tools/precompute_reference.py")


def test_cache_missing(dataset, tmp_path):
    _fails(_cfg(**{"data.train_data": dataset, "reference.cache_path": tmp_path / "cache"}),
           str(tmp_path / "cache"), "tools/precompute_reference.py")


def test_online_without_reference_checkpoint(dataset):
    _fails(_cfg(**{"data.train_data": dataset, "reference.source": "online"}), "reference.source=online needs reference.load")


def test_checkpoint_load_missing(dataset, tmp_path):
    _fails(_cfg(**{"data.train_data": dataset, "loss.mode": "sft", "checkpoint.load": tmp_path / "ck"}),
           "checkpoint.load=", "does not exist", "convert_hf_to_megatron.py")


def test_checkpoint_shape_mismatch(dataset, tmp_path):
    _fake_checkpoint(tmp_path / "ck", ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=192,
                                                  num_attention_heads=4, num_query_groups=2, vocab_size=768))
    _fails(_cfg(**{"data.train_data": dataset, "loss.mode": "sft", "checkpoint.load": tmp_path / "ck"}),
           "model.num_layers is 2 but the checkpoint has 3")


def test_checkpoint_rope_theta_may_differ(dataset, tmp_path):
    _fake_checkpoint(tmp_path / "ck", ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=192,
                                                  num_attention_heads=4, num_query_groups=2, vocab_size=768,
                                                  rope_theta=1e4))
    check_before_init(_cfg(**{"data.train_data": dataset, "loss.mode": "sft", "checkpoint.load": tmp_path / "ck",
                              "model.rope_theta": 1e7}))


def test_save_dir_not_writable(dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(_cfg(**{"data.train_data": dataset, "loss.mode": "sft", "checkpoint.save": blocker / "run"}),
           "checkpoint.save=", "is not writable")


def test_tensorboard_dir_not_writable(dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(_cfg(**{"data.train_data": dataset, "loss.mode": "sft", "logging.tensorboard_dir": blocker / "tb"}),
           "logging.tensorboard_dir=", "is not writable")


def test_eval_without_valid_data(dataset):
    _fails(_cfg(**{"data.train_data": dataset, "loss.mode": "sft", "training.eval_interval": 5}),
           "training.eval_interval is set but data.valid_data is not")


def test_bad_save_interval(dataset):
    _fails(_cfg(**{"data.train_data": dataset, "loss.mode": "sft", "checkpoint.save_interval": 0}),
           "checkpoint.save_interval must be > 0")


def test_missing_wandb_is_refused_before_any_work(dataset, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    _fails(_cfg(**{"data.train_data": dataset, "loss.mode": "sft", "logging.wandb_project": "p"}),
           "logging.wandb_project=p but wandb is not installed", "megatron_longpo[wandb]")
    check_before_init(_cfg(**{"data.train_data": dataset, "loss.mode": "sft", "logging.wandb_project": "p",
                              "logging.wandb_mode": "disabled"}))


def test_data_tokenizer_must_split_text_like_the_models(dataset, tmp_path):
    import shutil

    from megatron_longpo.data.synthetic import corpus, make_qwen2_like_tokenizer

    base = _cfg(**{"data.train_data": dataset, "loss.mode": "sft"}).model
    same, other = tmp_path / "same", tmp_path / "other"
    for ck in (same, other):
        _fake_checkpoint(ck, base)
    # The same sentencepiece model as an HF tokenizer directory (what the converter ships): accepted.
    (same / "tokenizer").mkdir()
    shutil.copy(ROOT / "examples/data/tokenizer.model", same / "tokenizer" / "tokenizer.model")
    check_before_init(_cfg(**{"data.train_data": dataset, "loss.mode": "sft", "checkpoint.load": same}))
    # Another model's tokenizer: refused before any work, naming both and the fix.
    make_qwen2_like_tokenizer(other / "tokenizer", corpus(0))
    _fails(_cfg(**{"data.train_data": dataset, "loss.mode": "sft", "checkpoint.load": other}),
           "splits text differently", str(other / "tokenizer"), "--tokenizer", "data.check_tokenizer=false")
    check_before_init(_cfg(**{"data.train_data": dataset, "loss.mode": "sft", "checkpoint.load": other,
                              "data.check_tokenizer": "false"}))


def test_precompute_checks_the_data_tokenizer_like_the_trainer(dataset, tmp_path):
    """tools/precompute_reference.py once built a cache for data that training then refused."""
    from megatron_longpo.data.synthetic import corpus, make_qwen2_like_tokenizer
    from megatron_longpo.reference.precompute import PrecomputeError, PrecomputeOptions, _inputs

    other = tmp_path / "other"
    _fake_checkpoint(other, _cfg().model)
    make_qwen2_like_tokenizer(other / "tokenizer", corpus(0))
    opts = PrecomputeOptions(load=str(other), data=dataset, output=str(tmp_path / "cache"))
    with pytest.raises(PrecomputeError) as e:
        _inputs(opts, world=1)
    for needle in ("--data=" + dataset, "splits text differently", str(other / "tokenizer"), "--no-check-tokenizer"):
        assert needle in str(e.value)
    _fails(_cfg(**{"data.train_data": dataset, "loss.mode": "sft", "checkpoint.load": other}), "splits text differently")
    opts.check_tokenizer = False
    assert _inputs(opts, world=1)[0]["counts"]  # the switch skips it, as data.check_tokenizer=false does
    # A converted checkpoint whose tokenizer/ holds no tokenizer files: was accepted here while training
    # refused it (issue 25 item 7). One rule now: both refuse, in the same words, each naming its switch.
    bare = tmp_path / "bare"
    _fake_checkpoint(bare, _cfg().model)
    (bare / "tokenizer").mkdir()
    (bare / "tokenizer/generation_config.json").write_text("{}")  # all the converter writes there then
    opts = PrecomputeOptions(load=str(bare), data=dataset, output=str(tmp_path / "c2"))
    with pytest.raises(PrecomputeError) as pre:
        _inputs(opts, world=1)
    train = {"data.train_data": dataset, "loss.mode": "sft", "checkpoint.load": bare}
    with pytest.raises(ConfigError) as trainer:
        check_before_init(_cfg(**train))
    for needle in ("does not load (no tokenizer files)", str(bare / "tokenizer"), "--tokenizer DIR",
                   "--no-check-tokenizer"):
        assert needle in str(pre.value), str(pre.value)
    assert str(pre.value).replace("--no-check-tokenizer", "data.check_tokenizer=false") == str(trainer.value)
    opts.check_tokenizer = False  # each switch skips it
    assert _inputs(opts, world=1)[0]["counts"]
    check_before_init(_cfg(**train, **{"data.check_tokenizer": "false"}))
