"""Config loading, overrides and the start-up validation rules."""

import pytest

from megatron_longpo.config import (
    ConfigError,
    DataConfig,
    LongPOConfig,
    ModelConfig,
    ParallelConfig,
    apply_overrides,
    pipeline_stage_layers,
    load_config,
    padded_vocab_size,
    save_config,
    seq_length_multiple,
    validate,
)


def _cfg(**sections):
    return LongPOConfig(**sections)


def test_yaml_roundtrip_and_overrides(tmp_path):
    cfg = _cfg(model=ModelConfig(hidden_size=128, num_attention_heads=8, num_query_groups=4))
    p = tmp_path / "c.yaml"
    save_config(cfg, p)
    back = load_config(p, ["--parallel.tensor_model_parallel_size=2", "--loss.beta=0.1",
                           "--parallel.sequence_parallel=true", "--checkpoint.save=/tmp/x",
                           "--model.rope_scaling={\"rope_type\": \"llama3\", \"factor\": 8}"])
    assert back.model.hidden_size == 128
    assert back.parallel.tensor_model_parallel_size == 2
    assert back.parallel.sequence_parallel is True
    assert back.loss.beta == pytest.approx(0.1)
    assert back.checkpoint.save == "/tmp/x"
    assert back.model.rope_scaling == {"rope_type": "llama3", "factor": 8}


@pytest.mark.parametrize(
    "override, needle",
    [
        ("--model.hidden_sise=3", "unknown option 'model.hidden_sise'"),
        ("--modle.hidden_size=3", "unknown section 'modle'"),
        ("--model.hidden_size=abc", "model.hidden_size: expected an integer"),
        ("--loss.mode=ppo", "loss.mode: 'ppo' is not one of"),
        ("--parallel.sequence_parallel=maybe", "expected true/false"),
        ("model.hidden_size", "must look like --section.key=value"),
    ],
)
def test_bad_overrides_name_the_option(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(LongPOConfig(), [override])


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  hidden: 12\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown option 'model.hidden'"):
        load_config(p)


@pytest.mark.parametrize(
    "model_kw, par_kw, data_kw, world, rule",
    [
        (dict(num_attention_heads=6, num_query_groups=2), dict(tensor_model_parallel_size=4), {}, 4,
         "num_attention_heads % tp == 0"),
        (dict(num_attention_heads=8, num_query_groups=2), dict(tensor_model_parallel_size=4), {}, 4,
         "num_query_groups % tp == 0"),
        ({}, dict(context_parallel_size=2), dict(max_seq_length=102), 2, "max_seq_length % 4 == 0"),
        ({}, dict(tensor_model_parallel_size=2, context_parallel_size=2, sequence_parallel=True),
         dict(max_seq_length=12), 4, "max_seq_length % 8 == 0"),
        ({}, dict(tensor_model_parallel_size=2, context_parallel_size=2), {}, 6, "world_size % (tp*cp*pp) == 0"),
        ({}, dict(sequence_parallel=True), {}, 1, "sequence_parallel=true needs"),
        (dict(num_layers=3), dict(pipeline_model_parallel_size=2), {}, 2,
         "model.num_layers (3) must be a positive multiple of parallel.pipeline_model_parallel_size (2)"),
        (dict(num_layers=4), dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4), {}, 2,
         "virtual_pipeline_model_parallel_size=4 cannot split into 4 equal chunks"),
        ({}, dict(virtual_pipeline_model_parallel_size=2), {}, 1, "needs parallel.pipeline_model_parallel_size > 1"),
        (dict(num_layers=4), dict(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=4), {}, 2,
         "leave 0 of model.num_layers=4 layers for 1 middle stage"),
        (dict(num_layers=4), dict(num_layers_in_last_pipeline_stage=2), {}, 1,
         "num_layers_in_last_pipeline_stage=2 needs parallel.pipeline_model_parallel_size > 1"),
        (dict(num_attention_heads=4, num_query_groups=3), {}, {}, 1, "divisible by model.num_query_groups"),
        (dict(rope_scaling={"rope_type": "yarn"}), {}, {}, 1, "rope_scaling"),
    ],
)
def test_divisibility_rules(model_kw, par_kw, data_kw, world, rule):
    data_kw = {"max_seq_length": 256, **data_kw}
    cfg = _cfg(model=ModelConfig(max_position_embeddings=4096, **model_kw), parallel=ParallelConfig(**par_kw),
               data=DataConfig(**data_kw))
    with pytest.raises(ConfigError) as e:
        validate(cfg, world)
    assert rule in str(e.value)


def test_valid_config_passes_and_batch_rule():
    cfg = _cfg(model=ModelConfig(num_attention_heads=8, num_query_groups=4),
               parallel=ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2),
               data=DataConfig(max_seq_length=256))
    validate(cfg, 8)  # dp = 2, gbs 8 % (1*2) == 0
    bad = apply_overrides(cfg, ["--training.global_batch_size=3"])
    with pytest.raises(ConfigError, match="global_batch_size"):
        validate(bad, 8)


def test_pipeline_stage_layers_and_vpp_rules():
    P = ParallelConfig
    assert pipeline_stage_layers(8, P(pipeline_model_parallel_size=4)) == [[2]] * 4
    assert pipeline_stage_layers(8, P(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)) == \
        [[2, 2], [2, 2]]
    assert pipeline_stage_layers(10, P(pipeline_model_parallel_size=4, num_layers_in_first_pipeline_stage=1,
                                       num_layers_in_last_pipeline_stage=3)) == [[1], [3], [3], [3]]
    assert sum(map(sum, pipeline_stage_layers(80, P(pipeline_model_parallel_size=4,
                                                    virtual_pipeline_model_parallel_size=5)))) == 80
    vpp = P(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    cfg = _cfg(model=ModelConfig(num_layers=4), parallel=vpp, data=DataConfig(max_seq_length=256))
    validate(apply_overrides(cfg, ["--training.global_batch_size=4"]), 2)
    with pytest.raises(ConfigError, match=r"micro-batches per step and DP rank .* = 3\) to be a multiple of"):
        validate(apply_overrides(cfg, ["--training.global_batch_size=3"]), 2)
    with pytest.raises(ConfigError, match="reference.source=online cannot run with parallel.virtual_pipeline"):
        validate(apply_overrides(cfg, ["--training.global_batch_size=4", "--reference.source=online"]), 2)


def test_seq_multiple_and_vocab_padding():
    assert seq_length_multiple(ParallelConfig()) == 1
    assert seq_length_multiple(ParallelConfig(context_parallel_size=4)) == 8
    assert seq_length_multiple(ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2,
                                              sequence_parallel=True)) == 8
    # FP8: each CP rank's share (and its SP shard) must be a multiple of 16 tokens.
    m = seq_length_multiple(ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2,
                                           sequence_parallel=True, fp8="hybrid"))
    assert m % 8 == 0 and (m // 4 // 2) % 16 == 0
    assert padded_vocab_size(ModelConfig(vocab_size=32000), 8) == 32768
    assert padded_vocab_size(ModelConfig(vocab_size=32000), 1) == 32000
    assert padded_vocab_size(ModelConfig(vocab_size=151936), 4) == 152064


def _float_options():
    import dataclasses
    import typing

    out = []
    for sec, cls in typing.get_type_hints(LongPOConfig).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (float, typing.Optional[float]):
                out.append(f"{sec}.{f.name}")
    return out


def test_float_options_are_all_ranged():
    """Each float option has a range entry (a new option without one is only checked for finiteness)."""
    from megatron_longpo.config import FLOAT_RANGES

    assert set(_float_options()) == set(FLOAT_RANGES), set(_float_options()) ^ set(FLOAT_RANGES)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("option", _float_options())
def test_every_float_option_must_be_finite(option, value):
    """--loss.beta=nan once passed validation and crashed at step 1 in Megatron's grad-norm code."""
    cfg = apply_overrides(LongPOConfig(), [f"--{option}={value}"])
    with pytest.raises(ConfigError, match=rf"{option} must be a finite number"):
        validate(cfg)


@pytest.mark.parametrize("override, needle", [
    ("--loss.beta=0", "loss.beta must be in (0, inf)"),
    ("--loss.lam=-0.5", "loss.lam must be in [0, inf)"),
    ("--optim.adam_beta2=1.0", "optim.adam_beta2 must be in [0, 1)"),
    ("--optim.lr_warmup_fraction=1.5", "optim.lr_warmup_fraction must be in [0, 1]"),
    ("--model.hidden_dropout=-0.1", "model.hidden_dropout must be in [0, 1)"),
    ("--model.rope_theta=0", "model.rope_theta must be in (0, inf)"),
    ("--optim.min_lr=1e-3", "optim.min_lr (0.001) must be <= optim.lr"),
])
def test_float_ranges(override, needle):
    with pytest.raises(ConfigError) as e:
        validate(apply_overrides(LongPOConfig(), [override]))
    assert needle in str(e.value)
