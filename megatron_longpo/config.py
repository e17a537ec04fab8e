"""Typed configuration for megatron_longpo.

Every option lives in one dataclass section; the docstring of each field is its ``help`` metadata.
A run is configured by a YAML file plus ``--section.key=value`` overrides, and every cross-field
rule is checked in :func:`validate` before any process group, model or file is touched, so a bad
config fails in seconds with a message that names the option and the rule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

from megatron_longpo.architectures import ARCH_NAMES, architecture
from megatron_longpo.gpu_rules import fp8_alignment, fp8_rule_errors, te_context_parallel_errors
from megatron_longpo.objectives import OBJECTIVES


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and the fix."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Decoder-only transformer of one family of megatron_longpo/architectures.py."""

    arch: Literal["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"] = _f(
        "llama", "Model family (megatron_longpo/architectures.py); selects the HF architecture on export.")
    num_layers: int = _f(2, "Number of transformer layers.")
    hidden_size: int = _f(64, "Hidden size.")
    ffn_hidden_size: int = _f(176, "Intermediate size of the SwiGLU MLP.")
    num_attention_heads: int = _f(4, "Number of query heads.")
    num_query_groups: int = _f(2, "Number of key/value heads (GQA); equal to heads for MHA.")
    kv_channels: Optional[int] = _f(None, "Head dim; default hidden_size // num_attention_heads.")
    vocab_size: int = _f(512, "Tokenizer vocabulary size (before padding).")
    make_vocab_size_divisible_by: int = _f(
        128, "Pad the embedding to a multiple of this times tensor_model_parallel_size."
    )
    max_position_embeddings: int = _f(4096, "Longest sequence the model is built for.")
    rope_theta: float = _f(10000.0, "RoPE base (LongPO policy: 1e7 for 128K-512K).")
    rope_scaling: Optional[dict] = _f(
        None, "HF-style rope_scaling dict; only {'rope_type': 'llama3', ...} is supported."
    )
    norm_epsilon: float = _f(1e-5, "RMSNorm epsilon.")
    add_qkv_bias: bool = _f(False, "Bias on the QKV projection (Qwen2).")
    qk_layernorm: bool = _f(False, "Per-head RMSNorm of queries and keys before RoPE (Qwen3).")
    num_experts: Optional[int] = _f(None, "Mixture-of-experts: experts per layer (Qwen3-MoE, Mixtral); null = dense MLP.")
    moe_router_topk: int = _f(2, "MoE: experts per token (HF num_experts_per_tok).")
    moe_ffn_hidden_size: Optional[int] = _f(None, "MoE: intermediate size of one expert; default ffn_hidden_size.")
    moe_norm_topk_prob: bool = _f(
        True, "MoE: renormalise the top-k router probabilities to sum to 1 (Mixtral; Qwen3-MoE norm_topk_prob).")
    moe_aux_loss_coeff: float = _f(
        0.0, "MoE: load-balancing loss coefficient (Switch style, per layer, summed); logged as moe/aux_loss.")
    moe_token_dispatcher: Literal["auto", "alltoall", "allgather"] = _f(
        "auto", "MoE token dispatcher of Megatron-Core; auto: alltoall on CUDA, on CPU alltoall at expert-TP 1 "
        "and allgather otherwise (what gloo can run; docs/cpu_compat.md).")
    tie_word_embeddings: bool = _f(False, "Share the input embedding and the output layer.")
    params_dtype: Literal["fp32", "bf16"] = _f("fp32", "Parameter / compute dtype.")
    init_method_std: float = _f(0.02, "Std of the normal weight init (random init only).")
    transformer_impl: Literal["auto", "local", "transformer_engine"] = _f(
        "auto", "Layer spec: TE on CUDA when it imports (auto), or forced."
    )
    attention_dropout: float = _f(0.0, "Attention dropout (LongPO uses 0).")
    hidden_dropout: float = _f(0.0, "Hidden dropout (LongPO uses 0).")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size


@dataclass
class ParallelConfig:
    """How the model and the batch are split over processes."""

    tensor_model_parallel_size: int = _f(1, "Tensor-parallel size (TP).")
    context_parallel_size: int = _f(1, "Context-parallel size (CP): sequence split over ranks.")
    pipeline_model_parallel_size: int = _f(
        1, "Pipeline-parallel size (PP): layers split into PP stages (1F1B schedule when > 1).")
    virtual_pipeline_model_parallel_size: Optional[int] = _f(
        None, "Virtual pipeline stages per PP rank (VPP, interleaved 1F1B); null = not interleaved. Needs PP > 1.")
    num_layers_in_first_pipeline_stage: Optional[int] = _f(
        None, "Layers on the first PP stage (uneven split; it also holds the embedding); null = even split.")
    num_layers_in_last_pipeline_stage: Optional[int] = _f(
        None, "Layers on the last PP stage (uneven split; it also holds the output layer); null = even split.")
    sequence_parallel: bool = _f(False, "Megatron sequence parallelism (needs TP > 1).")
    fp8: Optional[Literal["hybrid", "e4m3"]] = _f(None, "Transformer Engine FP8 recipe format.")
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = _f(
        "delayed", "FP8 scaling: delayed (amax history), tensorwise (current scaling), mxfp8 (Blackwell), blockwise."
    )
    fp8_amax_history_len: int = _f(1024, "Delayed scaling: amax history length (TE's recipe default).")
    fp8_amax_compute_algo: Literal["max", "most_recent"] = _f("max", "Delayed scaling: amax from the history.")
    attention_backend: Literal["auto", "te", "sdpa", "flash", "cudnn", "fa3"] = _f(
        "auto", "Core attention: TE (CUDA, its own CP), or the project's CP attention (any layout) with the block "
                "kernel sdpa, flash (flash-attn 2), cudnn (TE DotProductAttention, cuDNN fused) or fa3 (FlashAttention-3)."
    )
    cp_comm_type: Literal["p2p", "a2a", "all_gather", "a2a+p2p"] = _f(
        "p2p", "TE context-parallel communication (attention_backend=te)."
    )
    tp_comm_overlap: bool = _f(
        False, "Overlap the TP (sequence-parallel) all-gathers / reduce-scatters with the TE GEMMs (TE userbuffers). "
               "Needs TE layers, TP > 1 and sequence_parallel; userbuffers have one fixed shape, so every micro-batch "
               "is padded to data.max_seq_length. Not yet run on a GPU.")
    cp_kv_gather_chunks: int = _f(
        1, "Project CP attention: all-gather K/V in this many KV-head chunks, each gather overlapping the previous "
           "chunk's attention (1: one blocking gather). Must divide num_query_groups/tp; pays off at cp >= 4.")
    expert_model_parallel_size: int = _f(
        1, "Expert parallelism (EP): MoE experts split over EP ranks. Megatron-Core lays the expert groups "
        "(ETP x EP x expert-DP, ETP innermost) over the same TP x CP x DP ranks as the dense layers, so EP may "
        "span TP and CP ranks (ETP=1, EP=TP*CP on one node: every expert once); ETP x EP must divide TP x CP x DP.")
    expert_tensor_parallel_size: Optional[int] = _f(
        None, "Tensor parallelism inside each expert; null = tensor_model_parallel_size.")
    distributed_backend: Literal["auto", "nccl", "gloo"] = _f(
        "auto", "torch.distributed backend: nccl on CUDA, gloo on CPU (auto)."
    )
    distributed_timeout_minutes: int = _f(30, "Collective timeout.")


@dataclass
class DataConfig:
    """Preprocessed preference data and how pairs are laid out."""

    train_data: Optional[str] = _f(None, "Prefix of the preprocessed training dataset.")
    valid_data: Optional[str] = _f(None, "Prefix of an optional validation dataset.")
    max_seq_length: int = _f(1024, "Longest laid-out pair (tokens) a micro-batch may hold.")
    pair_layout: Literal["two_sequences", "shared_prefix"] = _f(
        "two_sequences", "Chosen/rejected as two sequences, or one [prefix|chosen|rejected]."
    )
    shuffle: bool = _f(True, "Shuffle samples each epoch (seeded).")
    check_tokenizer: bool = _f(
        True, "Refuse data whose tokenizer splits text differently from the tokenizer of the model checkpoint.")


# parallel.attention_backend values (the torch-free CLIs offer the same choices)
ATTENTION_BACKENDS = ("auto", "te", "sdpa", "flash", "cudnn", "fa3")

# Positions per chunk of the vocab-parallel log-prob: the default of training, reference and
# evaluation (here because the torch-free CLIs need it too; loss/logprobs.py re-exports it).
DEFAULT_LOGPROB_CHUNK_SIZE = 4096


@dataclass
class LossConfig:
    """The LongPO objective (see docs/loss.md)."""

    mode: Literal["longpo", "dpo", "sft", "sft_rejected"] = _f(
        "longpo", "Objective (megatron_longpo/objectives.py): LongPO (reference on the short context), dpo (reference "
        "on the long one), sft (NLL of the chosen sequence) or sft_rejected (NLL of the rejected one)."
    )
    beta: float = _f(0.01, "DPO temperature beta.")
    lam: float = _f(0.01, "Weight lambda of the preference term.")
    nll_weight: float = _f(1.0, "Weight of the NLL term.")
    nll_reduction: Literal["sequence_mean", "token_mean"] = _f(
        "sequence_mean", "Mean of per-pair token means, or all NLL tokens pooled."
    )
    nll_target: Literal["sequence", "responses"] = _f(
        "sequence", "NLL over the whole chosen sequence or only its responses."
    )
    logprob_chunk_size: int = _f(DEFAULT_LOGPROB_CHUNK_SIZE, "Positions per chunk in the vocab-parallel log-prob.")


@dataclass
class ReferenceConfig:
    """Where reference log-probs come from."""

    source: Literal["cache", "online"] = _f("cache", "Precomputed cache or a frozen model.")
    cache_path: Optional[str] = _f(None, "Reference cache (tools/precompute_reference.py).")
    valid_cache_path: Optional[str] = _f(None, "Reference cache of data.valid_data (source=cache).")
    load: Optional[str] = _f(
        None, "Reference checkpoint: needed by source=online; with source=cache, if set, the cache must come from it."
    )
    rope_theta: Optional[float] = _f(None, "Reference rope_theta; default: the checkpoint's.")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    optimizer: Literal["adam", "sgd", "rmsprop"] = _f(
        "adam", "Optimizer (rmsprop: the released LongPO script; torch.optim.RMSprop, momentum 0, not centered)."
    )
    lr: float = _f(5e-7, "Peak learning rate.")
    min_lr: float = _f(0.0, "Final learning rate of the decay.")
    lr_decay_style: Literal["cosine", "linear", "constant"] = _f("cosine", "LR decay.")
    lr_warmup_fraction: float = _f(0.1, "Warm-up as a fraction of train_iters.")
    lr_warmup_steps: Optional[int] = _f(None, "Warm-up steps (absolute); overrides lr_warmup_fraction when set.")
    scheduler_on_resume: Literal["auto", "checkpoint", "config"] = _f(
        "auto", "On resume, when the config's LR schedule (lr, min_lr, warm-up, decay steps = train_iters, style) "
                "differs from the checkpoint's: 'checkpoint' keeps the saved schedule, 'config' continues the step count "
                "on the config's schedule (e.g. after raising train_iters), 'auto' refuses and names both.")
    weight_decay: float = _f(0.0, "Weight decay.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.95, "Adam beta2.")
    adam_eps: float = _f(1e-8, "Adam epsilon.")
    rmsprop_alpha: float = _f(0.99, "RMSprop smoothing constant (torch default, as in the released script).")
    rmsprop_eps: float = _f(1e-8, "RMSprop epsilon.")
    clip_grad: float = _f(1.0, "Gradient-norm clipping (0 disables).")
    use_distributed_optimizer: bool = _f(True, "Shard optimizer state over DP (CUDA only).")


@dataclass
class TrainingConfig:
    """Batching, length and recomputation of the run."""

    micro_batch_size: int = _f(1, "Pairs per micro-batch.")
    global_batch_size: int = _f(8, "Pairs per optimizer step over all DP ranks.")
    train_iters: int = _f(10, "Optimizer steps.")
    num_epochs: Optional[float] = _f(
        None, "Train this many passes over data.train_data instead: train_iters = ceil(num_epochs * samples / "
              "global_batch_size), set at start-up (the log shows the epoch).")
    seed: int = _f(1234, "Seed for init, data order and RNG trackers.")
    recompute_granularity: Optional[Literal["full", "selective"]] = _f(
        None, "Activation recomputation: full (whole layers, per recompute_method) or selective (the "
              "recompute_modules of every layer); tools/estimate_memory.py --recompute lists the choices that fit.")
    recompute_method: Literal["uniform", "block"] = _f(
        "uniform", "Full recompute: uniform (every layer, in units of recompute_num_layers) or block (only the "
                   "first recompute_num_layers layers; the others keep their activations).")
    recompute_num_layers: int = _f(1, "Full recompute: layers per unit (uniform) or layers recomputed (block).")
    recompute_modules: list = _f(
        ["core_attn"], "Selective recompute: any of layernorm (both norms, ~free), mlp (the SwiGLU MLP), core_attn "
                       "(the attention kernel; saves nothing with flash-class kernels).")
    exit_duration_mins: Optional[float] = _f(None, "Save and exit after this many minutes.")
    exit_interval: Optional[int] = _f(None, "Save and exit when the step number is a multiple of this.")
    eval_interval: Optional[int] = _f(None, "Run validation every N steps.")
    eval_iters: int = _f(
        4, "Validation GLOBAL batches per evaluation (0: every full global batch of data.valid_data once). Capped at "
           "the full global batches the set holds, so no sample counts twice.")


@dataclass
class CheckpointConfig:
    """Saving and loading."""

    save: Optional[str] = _f(None, "Run directory for checkpoints.")
    load: Optional[str] = _f(None, "Checkpoint (run dir or iter dir) to start or resume from.")
    save_interval: Optional[int] = _f(None, "Save every N steps (and at the end).")
    keep_last: int = _f(2, "Keep the newest K checkpoints (0 keeps all).")
    finetune: bool = _f(False, "Load weights only (no optimizer, step counter reset).")
    load_iteration: Optional[int] = _f(
        None, "Resume / load this iteration instead of the newest (e.g. when the newest is damaged): of "
        "checkpoint.save once it holds one, else of checkpoint.load.")
    verify: Literal["full", "size", "none"] = _f(
        "full", "Check checkpoint files against the size + CRC32 manifest written at save before loading.")
    allow_data_change: bool = _f(
        False, "Resume checkpoint.save on a train_data other than the one it was trained on; the new data is read "
               "from its first sample (the saved position belongs to the old data).")
    fallback_on_corrupt: bool = _f(
        True, "When resuming from checkpoint.save and its newest iteration is damaged, resume from the newest intact "
              "earlier one (and say so) instead of stopping.")


@dataclass
class LoggingConfig:
    """Progress output."""

    log_interval: int = _f(1, "Print a metrics line every N steps.")
    tensorboard_dir: Optional[str] = _f(None, "TensorBoard event directory.")
    wandb_project: Optional[str] = _f(None, "Weights & Biases project (enables wandb).")
    wandb_mode: Literal["online", "offline", "disabled"] = _f("offline", "wandb mode.")
    wandb_run_name: Optional[str] = _f(None, "wandb run name.")
    wandb_run_id: Optional[str] = _f(
        None, "wandb run id; default: one id per checkpoint.save directory (kept in RUN/wandb_run_id), so a resumed "
              "or requeued run continues the same wandb run.")
    metrics_jsonl: Optional[str] = _f(None, "Append every step's metrics as a JSON line (rank 0).")


@dataclass
class EvaluationConfig:
    """Synthetic long-context tasks scored every training.eval_interval steps (docs/evaluation.md)."""

    tasks: list = _f([], "Tasks, e.g. [niah_single, variable_tracking, kv_retrieval]; empty disables.")
    lengths: list = _f([], "Prompt lengths in tokens, e.g. [4096, 131072] (a short and a long one).")
    samples: int = _f(4, "Samples per task and length.")
    seed: int = _f(0, "Seed of the task instances (the same questions at every length).")
    tokenizer: Optional[str] = _f(None, "Tokenizer; default: the one recorded with data.train_data.")
    chat_template: Literal["auto", "tokenizer", "mistral", "chatml"] = _f(
        "auto", "Chat template; auto: the one data.train_data was preprocessed with."
    )
    haystack: Optional[str] = _f(None, "Haystack documents (.txt/.md/.jsonl file or directory); default: built-in filler.")
    tokens_per_batch: int = _f(32768, "Padded tokens per evaluation forward.")


@dataclass
class LongPOConfig:
    """Everything a run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


# ----------------------------------------------------------------------------------------------
# Loading: dict / YAML / CLI overrides
# ----------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if "e" in value.lower() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: expected a JSON object, got {value!r}") from e
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _section_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown option '{path}'; valid options here: {sorted(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, path)
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """``section.key old -> new`` for every option that differs between two ``to_dict`` configs."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def apply_overrides(cfg: LongPOConfig, overrides: Sequence[str]) -> LongPOConfig:
    """Apply ``section.key=value`` (leading dashes optional) overrides to a config copy."""
    data = to_dict(cfg)
    for item in overrides:
        text = item.lstrip("-")
        if "=" not in text:
            raise ConfigError(f"override '{item}' must look like --section.key=value")
        key, value = text.split("=", 1)
        parts = key.replace("-", "_").split(".")
        if len(parts) != 2:
            raise ConfigError(f"override '{item}': key must be section.key, e.g. --parallel.tensor_model_parallel_size=2")
        section, name = parts
        if section not in data:
            raise ConfigError(f"override '{item}': unknown section '{section}'; valid: {sorted(data)}")
        if name not in data[section]:
            raise ConfigError(
                f"override '{item}': unknown option '{section}.{name}'; valid: {sorted(data[section])}"
            )
        data[section][name] = yaml.safe_load(value) if value.strip() != "" else None
    return from_dict(LongPOConfig, data)


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> LongPOConfig:
    """Load a YAML config (or defaults when ``path`` is None) and apply CLI overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
    try:
        cfg = from_dict(LongPOConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") if path else e
    return apply_overrides(cfg, overrides)


def save_config(cfg: LongPOConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------
# Validation: every cross-field rule, in one place
# ----------------------------------------------------------------------------------------------


def seq_length_multiple(parallel: ParallelConfig) -> int:
    """Every laid-out sequence length must be a multiple of this (CP zigzag, SP, FP8)."""
    # TE FP8 GEMMs need each rank's token count to be a multiple of 16 (32 for mxfp8).
    alignment = fp8_alignment(getattr(parallel, "fp8_recipe", "delayed")) if parallel.fp8 else 1
    return split_length_multiple(parallel.context_parallel_size, parallel.tensor_model_parallel_size,
                                 parallel.sequence_parallel, alignment)


def split_length_multiple(cp_size: int, tp_size: int = 1, sequence_parallel: bool = False, alignment: int = 1) -> int:
    """THE divisibility rule of a laid-out length S (the one statement; everything else asks it).

    2*cp zigzag chunks (none without CP), each rank's share split over tp with sequence
    parallelism, and ``alignment`` tokens per chunk (and SP shard) for FP8 GEMMs (1 without FP8).
    Here rather than in runtime/zigzag.py because config validation needs it and stays torch-free.
    """
    return (2 * cp_size if cp_size > 1 else 1) * (tp_size if sequence_parallel else 1) * alignment


def check_split_length(seq_len: int, cp_size: int, tp_size: int = 1, sequence_parallel: bool = False) -> None:
    """Raise ValueError naming the rule if ``seq_len`` cannot be split over the CP (and SP) ranks."""
    mult = split_length_multiple(cp_size, tp_size, sequence_parallel)
    if seq_len % mult == 0:
        return
    why = []
    if cp_size > 1:
        why.append(f"context parallelism needs a multiple of 2*cp = {2 * cp_size}")
    if sequence_parallel and tp_size > 1:
        why.append(f"times tp = {tp_size} with sequence parallelism")
    raise ValueError(
        f"sequence length {seq_len} is not a multiple of {mult}: {', '.join(why)}; pad batches to "
        "megatron_longpo.config.seq_length_multiple(parallel)"
    )


def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    m = model.make_vocab_size_divisible_by * tp
    return ((model.vocab_size + m - 1) // m) * m


def pipeline_stage_layers(num_layers: int, parallel: ParallelConfig) -> list[list[int]]:
    """Transformer layers per (PP rank, virtual stage): ``out[rank][chunk]`` (pure; Megatron's split).

    Even split unless ``num_layers_in_first/last_pipeline_stage`` are set; the remaining layers are
    spread evenly over the middle stages. Each PP rank's layers are split evenly over its VPP
    chunks. Raises ConfigError (naming the option and the fix) for a split that does not add up.
    """
    errs = pipeline_layout_errors(num_layers, parallel)
    if errs:
        raise ConfigError("; ".join(errs))
    return _stage_layers(num_layers, parallel)


def _rank_layers(num_layers: int, p: ParallelConfig) -> list[int]:
    """Layers per PP rank: the fixed first/last counts, the rest evenly over the middle stages."""
    pp = p.pipeline_model_parallel_size
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    middle = pp - (first is not None) - (last is not None)
    even = (num_layers - (first or 0) - (last or 0)) // middle if middle > 0 else 0
    out = [even] * pp
    if first is not None:
        out[0] = first
    if last is not None:
        out[-1] = last
    return out


def _stage_layers(num_layers: int, p: ParallelConfig) -> list[list[int]]:
    v = p.virtual_pipeline_model_parallel_size or 1
    return [[n // v] * v for n in _rank_layers(num_layers, p)]


def pipeline_layout_errors(num_layers: int, p: ParallelConfig) -> list[str]:
    """Rules of the pipeline split (Megatron's TransformerConfig checks, naming our options)."""
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    if pp < 1:
        return []  # reported by validate_model
    errs = []
    if vpp is not None and (vpp < 2 or pp < 2):
        errs.append(
            f"parallel.virtual_pipeline_model_parallel_size={vpp} needs parallel.pipeline_model_parallel_size > 1 "
            "and a value >= 2 (interleaved stages per PP rank); set it to null for the plain 1F1B schedule")
    for name, n in (("num_layers_in_first_pipeline_stage", first), ("num_layers_in_last_pipeline_stage", last)):
        if n is not None and (pp < 2 or n < 1):
            errs.append(f"parallel.{name}={n} needs parallel.pipeline_model_parallel_size > 1 and a value >= 1; "
                        "set it to null for an even split")
    if errs:
        return errs
    middle = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if first is not None or last is not None:
        if rest < 0 or (middle == 0 and rest != 0) or (middle > 0 and (rest <= 0 or rest % middle)):
            return [
                f"parallel.num_layers_in_first_pipeline_stage={first} + num_layers_in_last_pipeline_stage={last} "
                f"leave {rest} of model.num_layers={num_layers} layers for {middle} middle stage(s) of "
                f"parallel.pipeline_model_parallel_size={pp}: the rest must split evenly over the middle stages "
                "(and be 0 without one); change the first/last stage layer counts"]
    elif num_layers % pp or num_layers < pp:
        return [
            f"model.num_layers ({num_layers}) must be a positive multiple of parallel.pipeline_model_parallel_size "
            f"({pp}); use another PP size or set parallel.num_layers_in_first_pipeline_stage / "
            "num_layers_in_last_pipeline_stage for an uneven split"]
    v = vpp or 1
    for rank, n in enumerate(_rank_layers(num_layers, p)):
        if n % v or n < v:
            return [
                f"pipeline stage {rank} holds {n} layer(s), which parallel.virtual_pipeline_model_parallel_size={v} "
                f"cannot split into {v} equal chunks of >= 1 layer; use a VPP size that divides every stage's "
                "layer count (or null)"]
    return []


# Ranges of the float options: (low, low included, high, high included); None: unbounded. Every
# float option, listed here or not, must be finite: nan / inf pass comparisons like `beta <= 0`
# and only surface at step 1 as a grad-norm traceback.
FLOAT_RANGES: dict[str, tuple[Optional[float], bool, Optional[float], bool]] = {
    "model.rope_theta": (0.0, False, None, False),
    "model.norm_epsilon": (0.0, False, None, False),
    "model.init_method_std": (0.0, False, None, False),
    "model.attention_dropout": (0.0, True, 1.0, False),
    "model.hidden_dropout": (0.0, True, 1.0, False),
    "model.moe_aux_loss_coeff": (0.0, True, None, False),
    "loss.beta": (0.0, False, None, False),
    "loss.lam": (0.0, True, None, False),
    "loss.nll_weight": (0.0, True, None, False),
    "reference.rope_theta": (0.0, False, None, False),
    "optim.lr": (0.0, True, None, False),
    "optim.min_lr": (0.0, True, None, False),
    "optim.lr_warmup_fraction": (0.0, True, 1.0, True),
    "optim.weight_decay": (0.0, True, None, False),
    "optim.adam_beta1": (0.0, True, 1.0, False),
    "optim.adam_beta2": (0.0, True, 1.0, False),
    "optim.adam_eps": (0.0, False, None, False),
    "optim.rmsprop_alpha": (0.0, True, 1.0, False),
    "optim.rmsprop_eps": (0.0, False, None, False),
    "optim.clip_grad": (0.0, True, None, False),
    "training.num_epochs": (0.0, False, None, False),
    "training.exit_duration_mins": (0.0, False, None, False),
}


def float_errors(section: str, obj: Any) -> list[str]:
    """Every float field of a config section is finite and inside its FLOAT_RANGES entry."""
    errs = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if not isinstance(v, float):
            continue
        name = f"{section}.{f.name}"
        lo, lo_in, hi, hi_in = FLOAT_RANGES.get(name, (None, False, None, False))
        if not math.isfinite(v):
            errs.append(f"{name} must be a finite number (got {v})")
        elif (lo is not None and (v < lo or (v == lo and not lo_in))) or \
                (hi is not None and (v > hi or (v == hi and not hi_in))):
            low, high = "-inf" if lo is None else f"{lo:g}", "inf" if hi is None else f"{hi:g}"
            errs.append(f"{name} must be in {'[' if lo_in else '('}{low}, {high}{']' if hi_in else ')'} (got {v})")
    return errs


def validate_model(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Model/parallel rules shared by training, precompute and conversion tools."""
    tp = parallel.tensor_model_parallel_size
    errs = float_errors("model", model)
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "vocab_size", "max_position_embeddings"):
        if getattr(model, name) <= 0:
            errs.append(f"model.{name} must be > 0 (got {getattr(model, name)})")
    for name in ("tensor_model_parallel_size", "context_parallel_size",
                 "pipeline_model_parallel_size"):
        if getattr(parallel, name) < 1:
            errs.append(f"parallel.{name} must be >= 1")
    if errs:
        raise ConfigError("; ".join(errs))
    if model.num_attention_heads % model.num_query_groups:
        errs.append(
            f"model.num_attention_heads ({model.num_attention_heads}) must be divisible by "
            f"model.num_query_groups ({model.num_query_groups})"
        )
    if model.num_attention_heads % tp:
        errs.append(
            f"model.num_attention_heads ({model.num_attention_heads}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp}): rule num_attention_heads % tp == 0"
        )
    if model.num_query_groups % tp:
        errs.append(
            f"model.num_query_groups ({model.num_query_groups}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp}): rule num_query_groups % tp == 0"
        )
    if model.ffn_hidden_size % tp:
        errs.append(
            f"model.ffn_hidden_size ({model.ffn_hidden_size}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if model.kv_channels is None and model.hidden_size % model.num_attention_heads:
        errs.append(
            f"model.hidden_size ({model.hidden_size}) must be divisible by "
            f"model.num_attention_heads ({model.num_attention_heads}) or set model.kv_channels"
        )
    if model.head_dim % 2:
        errs.append(f"head dim ({model.head_dim}) must be even for RoPE")
    errs += _moe_errors(model, parallel)
    errs += pipeline_layout_errors(model.num_layers, parallel)
    if parallel.sequence_parallel and tp == 1:
        errs.append("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
    if model.rope_scaling is not None and model.rope_scaling.get("rope_type", model.rope_scaling.get("type")) != "llama3":
        errs.append(
            f"model.rope_scaling={model.rope_scaling} is not supported; only rope_type 'llama3' "
            "(or none) can be expressed by Megatron-Core's GPTModel"
        )
    if errs:
        raise ConfigError("; ".join(errs))


def _moe_errors(model: ModelConfig, parallel: ParallelConfig) -> list[str]:
    """Mixture-of-experts fields against the family (architectures.py) and the expert layout."""
    if model.arch not in ARCH_NAMES:
        return [f"model.arch={model.arch!r} is not a known family; choose one of {list(ARCH_NAMES)}"]
    spec = architecture(model.arch)
    ep, etp = parallel.expert_model_parallel_size, parallel.expert_tensor_parallel_size
    errs = []
    if ep < 1 or (etp is not None and etp < 1):
        errs.append("parallel.expert_model_parallel_size and parallel.expert_tensor_parallel_size must be >= 1")
        return errs
    if model.num_experts is None:
        if spec.moe is not None:
            errs.append(f"model.arch={model.arch} is a mixture-of-experts family: set model.num_experts")
        if ep > 1:
            errs.append("parallel.expert_model_parallel_size > 1 needs a mixture-of-experts model (model.num_experts)")
        return errs
    if spec.moe is None:
        errs.append(f"model.num_experts={model.num_experts} but model.arch={model.arch} is dense; use qwen3_moe or mixtral")
    if model.num_experts < 1 or not 1 <= model.moe_router_topk <= model.num_experts:
        errs.append(f"model.moe_router_topk ({model.moe_router_topk}) must be in 1..model.num_experts ({model.num_experts})")
    if model.num_experts % ep:
        errs.append(f"model.num_experts ({model.num_experts}) must be divisible by parallel.expert_model_parallel_size ({ep})")
    if model.expert_ffn_hidden_size % (etp or parallel.tensor_model_parallel_size):
        errs.append(f"model.moe_ffn_hidden_size ({model.expert_ffn_hidden_size}) must be divisible by the expert "
                    f"tensor-parallel size ({etp or parallel.tensor_model_parallel_size})")
    if parallel.tensor_model_parallel_size > 1 and not parallel.sequence_parallel:
        errs.append("a mixture-of-experts model with parallel.tensor_model_parallel_size > 1 needs "
                    "parallel.sequence_parallel=true (Megatron-Core's MoE layer rule)")
    if model.moe_aux_loss_coeff < 0:
        errs.append(f"model.moe_aux_loss_coeff must be >= 0 (got {model.moe_aux_loss_coeff})")
    return errs


def expert_option_errors(model: ModelConfig, parallel: ParallelConfig, world_size: int, where: str) -> list[str]:
    """The expert layout of a forward-only tool (reference precompute, evaluation) against the
    model of checkpoint ``where`` and the world size, worded in the tools' options (--ep, --etp);
    checked before any process group. validate_model then applies the remaining MoE rules."""
    ep, etp, pp = (parallel.expert_model_parallel_size, parallel.expert_tensor_parallel_size,
                   parallel.pipeline_model_parallel_size)
    if ep < 1 or (etp is not None and etp < 1):
        return [f"--ep and --etp must be >= 1 (got {ep}, {etp})"]
    if model.num_experts is None:
        return [f"--{name} {n} needs a mixture-of-experts model but {where} is dense (model.arch={model.arch}); "
                f"drop --{name}" for name, n in (("ep", ep), ("etp", etp)) if n is not None and n > 1]
    errs = []
    if model.num_experts % ep:
        fits = [d for d in range(1, model.num_experts + 1) if model.num_experts % d == 0]
        errs.append(f"--ep {ep} must divide the {model.num_experts} experts of {where}; use one of {fits}")
    expert_tp = etp or parallel.tensor_model_parallel_size
    if world_size % (ep * expert_tp * pp):
        errs.append(f"the world size {world_size} (torchrun --nproc-per-node x nodes) must be a multiple of --ep x "
                    f"--etp (default --tp) x --pp = {ep}x{expert_tp}x{pp}; launch a multiple of {ep * expert_tp * pp} "
                    "processes or lower --ep")
    return errs


def validate(cfg: LongPOConfig, world_size: Optional[int] = None) -> None:
    """Check every rule of a training config; raise ConfigError naming each violated one."""
    validate_model(cfg.model, cfg.parallel)
    p = cfg.parallel
    errs = [e for f in dataclasses.fields(cfg) if f.name != "model"
            for e in float_errors(f.name, getattr(cfg, f.name))]
    model_parallel = p.tensor_model_parallel_size * p.context_parallel_size * p.pipeline_model_parallel_size
    if world_size is not None and world_size % model_parallel:
        errs.append(
            f"world size {world_size} must be divisible by tp*cp*pp = "
            f"{p.tensor_model_parallel_size}*{p.context_parallel_size}*"
            f"{p.pipeline_model_parallel_size} = {model_parallel}: rule world_size % (tp*cp*pp) == 0"
        )
    expert_parallel = p.expert_model_parallel_size * (p.expert_tensor_parallel_size or p.tensor_model_parallel_size)
    if world_size is not None and world_size % (expert_parallel * p.pipeline_model_parallel_size):
        errs.append(
            f"world size {world_size} must be divisible by ep*etp*pp = {p.expert_model_parallel_size}*"
            f"{p.expert_tensor_parallel_size or p.tensor_model_parallel_size}*{p.pipeline_model_parallel_size}"
        )
    mult = seq_length_multiple(p)
    if cfg.data.max_seq_length % mult:
        what = "2*cp" + ("*tp (sequence parallel)" if p.sequence_parallel else "")
        if p.fp8:
            what += f", {fp8_alignment(p.fp8_recipe)} per CP rank (fp8)"
        errs.append(
            f"data.max_seq_length ({cfg.data.max_seq_length}) must be a multiple of {mult} "
            f"({what}): rule max_seq_length % {mult} == 0"
        )
    if cfg.data.max_seq_length > cfg.model.max_position_embeddings:
        errs.append(
            f"data.max_seq_length ({cfg.data.max_seq_length}) exceeds "
            f"model.max_position_embeddings ({cfg.model.max_position_embeddings}); raise the latter (RoPE extends to any length)"
        )
    t = cfg.training
    if world_size is not None and not errs:
        dp = world_size // model_parallel
        if t.global_batch_size % (t.micro_batch_size * dp):
            errs.append(
                f"training.global_batch_size ({t.global_batch_size}) must be divisible by "
                f"micro_batch_size*dp = {t.micro_batch_size}*{dp}"
            )
        elif p.virtual_pipeline_model_parallel_size and (t.global_batch_size // (t.micro_batch_size * dp)) % \
                p.pipeline_model_parallel_size:
            n_mb = t.global_batch_size // (t.micro_batch_size * dp)
            errs.append(
                f"parallel.virtual_pipeline_model_parallel_size needs the micro-batches per step and DP rank "
                f"(training.global_batch_size / (micro_batch_size*dp) = {n_mb}) to be a multiple of "
                f"parallel.pipeline_model_parallel_size ({p.pipeline_model_parallel_size}) (Megatron's interleaved "
                "schedule); change training.global_batch_size or micro_batch_size")
    if t.train_iters < 0:
        errs.append("training.train_iters must be >= 0")
    errs += _recompute_errors(cfg)
    if cfg.loss.logprob_chunk_size <= 0:
        errs.append("loss.logprob_chunk_size must be > 0")
    if cfg.loss.mode in OBJECTIVES:
        objective = OBJECTIVES[cfg.loss.mode]
        if not objective.terms(cfg.loss.nll_weight) or (objective.terms(cfg.loss.nll_weight) == ("preference",)
                                                         and cfg.loss.lam == 0):
            errs.append(f"loss.mode={cfg.loss.mode} with loss.nll_weight={cfg.loss.nll_weight} and loss.lam="
                        f"{cfg.loss.lam} trains nothing; set loss.nll_weight > 0" +
                        (" or loss.lam > 0" if objective.preference else ""))
    else:
        errs.append(f"loss.mode={cfg.loss.mode!r} is not an objective; choose from {list(OBJECTIVES)}")
    if cfg.optim.optimizer == "rmsprop" and cfg.optim.use_distributed_optimizer:
        errs.append(
            "optim.optimizer=rmsprop needs optim.use_distributed_optimizer: false (Megatron-Core 0.16.1's "
            "distributed optimizer keeps Adam moments only)"
        )
    errs += fp8_rule_errors(cfg.model, p)  # FP8 needs TE layers, bf16 and aligned GEMM dims
    errs += te_context_parallel_errors(cfg.model, p, cfg.data.pair_layout)
    if cfg.data.pair_layout == "shared_prefix" and p.attention_backend == "te":
        errs.append(
            "data.pair_layout=shared_prefix cannot run on parallel.attention_backend=te (TE attention "
            "cannot express the branch mask); set parallel.attention_backend to auto, sdpa or flash"
        )
    errs += _attention_kernel_errors(cfg)
    errs += _cp_overlap_errors(cfg)
    errs += _tp_overlap_errors(cfg)
    errs += _evaluation_errors(cfg)
    if p.virtual_pipeline_model_parallel_size:
        # The reference and evaluation forwards run one model chunk per pipeline stage.
        if cfg.reference.source == "online":
            errs.append("reference.source=online cannot run with parallel.virtual_pipeline_model_parallel_size "
                        "(the frozen reference runs one chunk per stage); precompute the cache "
                        "(tools/precompute_reference.py --pp N) and set reference.source=cache, or set VPP to null")
        if cfg.evaluation.tasks:
            errs.append("evaluation.tasks cannot run with parallel.virtual_pipeline_model_parallel_size; evaluate the "
                        "checkpoints with tools/evaluate.py --pp N, or set VPP to null")
    if t.eval_iters < 0:
        errs.append(f"training.eval_iters must be >= 0 (0 = the whole validation set), got {t.eval_iters}")
    if cfg.optim.min_lr > cfg.optim.lr:
        errs.append(f"optim.min_lr ({cfg.optim.min_lr}) must be <= optim.lr ({cfg.optim.lr})")
    if cfg.optim.lr_warmup_steps is not None and not 0 <= cfg.optim.lr_warmup_steps <= max(t.train_iters, 0):
        errs.append(f"optim.lr_warmup_steps ({cfg.optim.lr_warmup_steps}) must be in [0, training.train_iters]")
    if cfg.checkpoint.load_iteration is not None and cfg.checkpoint.load_iteration < 0:
        errs.append(f"checkpoint.load_iteration must be >= 0 (got {cfg.checkpoint.load_iteration})")
    if errs:
        raise ConfigError("; ".join(errs))


RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")  # the dense-model choices of Megatron-Core 0.16.1


def _recompute_errors(cfg: LongPOConfig) -> list[str]:
    t = cfg.training
    errs = []
    if t.recompute_granularity == "full" and not 1 <= t.recompute_num_layers <= cfg.model.num_layers:
        errs.append(f"training.recompute_num_layers ({t.recompute_num_layers}) must be in [1, model.num_layers="
                    f"{cfg.model.num_layers}] with training.recompute_granularity=full")
    if t.recompute_granularity == "selective":
        mods = t.recompute_modules
        if not isinstance(mods, list) or not mods or any(m not in RECOMPUTE_MODULES for m in mods):
            errs.append(f"training.recompute_modules must be a non-empty list of {list(RECOMPUTE_MODULES)} with "
                        f"training.recompute_granularity=selective, got {mods!r}")
        elif "layernorm" in mods and cfg.parallel.fp8 and cfg.parallel.fp8_recipe == "delayed":
            errs.append("training.recompute_modules=layernorm cannot run with parallel.fp8_recipe=delayed "
                        "(Megatron-Core 0.16.1); use parallel.fp8_recipe=tensorwise or drop layernorm")
    return errs


def _tp_overlap_errors(cfg: LongPOConfig) -> list[str]:
    p = cfg.parallel
    if not p.tp_comm_overlap:
        return []
    errs = []
    if p.tensor_model_parallel_size < 2 or not p.sequence_parallel:
        errs.append("parallel.tp_comm_overlap needs parallel.tensor_model_parallel_size > 1 and "
                    "parallel.sequence_parallel=true (it overlaps the sequence-parallel collectives)")
    if cfg.model.transformer_impl == "local":
        errs.append("parallel.tp_comm_overlap needs Transformer Engine layers (TE userbuffers); set "
                    "model.transformer_impl=transformer_engine (or auto with TE) or parallel.tp_comm_overlap=false")
    if cfg.evaluation.tasks:
        errs.append("parallel.tp_comm_overlap cannot run evaluation.tasks during training (their batches have other "
                    "shapes than the userbuffers); evaluate the checkpoints with tools/evaluate.py instead")
    return errs


def _cp_overlap_errors(cfg: LongPOConfig) -> list[str]:
    p, m = cfg.parallel, cfg.model
    n, tp = p.cp_kv_gather_chunks, p.tensor_model_parallel_size
    if n < 1:
        return [f"parallel.cp_kv_gather_chunks must be >= 1 (got {n})"]
    if n > 1 and (m.num_query_groups // max(tp, 1)) % n:
        return [f"parallel.cp_kv_gather_chunks={n} must divide the KV heads per TP rank (model.num_query_groups/tp = "
                f"{m.num_query_groups // max(tp, 1)}); use 1 or a divisor"]
    if n > 1 and p.attention_backend == "te":
        return ["parallel.cp_kv_gather_chunks applies to the project CP attention only, not parallel.attention_backend=te"]
    return []


def _attention_kernel_errors(cfg: LongPOConfig) -> list[str]:
    """Rules of the project attention's CUDA block kernels (flash-attn 2, TE cuDNN, FA3)."""
    kernel = cfg.parallel.attention_backend
    if kernel not in ("flash", "cudnn", "fa3"):
        return []
    errs = []
    if cfg.model.params_dtype != "bf16":
        errs.append(f"parallel.attention_backend={kernel} runs bf16 only (model.params_dtype="
                    f"{cfg.model.params_dtype}); set model.params_dtype=bf16 or parallel.attention_backend=sdpa")
    if kernel == "fa3" and cfg.model.attention_dropout > 0:
        errs.append(f"parallel.attention_backend=fa3 has no attention dropout (model.attention_dropout="
                    f"{cfg.model.attention_dropout}); set it to 0 or use parallel.attention_backend=cudnn or sdpa")
    if cfg.model.head_dim > 256 or cfg.model.head_dim % 8:
        errs.append(f"parallel.attention_backend={kernel} needs a head dim <= 256 and a multiple of 8 (got "
                    f"{cfg.model.head_dim}); use parallel.attention_backend=sdpa")
    return errs


def _evaluation_errors(cfg: LongPOConfig) -> list[str]:
    """Shape rules of the evaluation section (task names are checked when the suite is built)."""
    e = cfg.evaluation
    if not e.tasks:
        return []
    errs = []
    if not isinstance(e.tasks, list) or not all(isinstance(t, str) for t in e.tasks):
        errs.append(f"evaluation.tasks must be a list of task names, got {e.tasks!r}")
    if not e.lengths or not isinstance(e.lengths, list) or any(
            isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in e.lengths):
        errs.append(f"evaluation.lengths must be a non-empty list of positive token counts, got {e.lengths!r}")
    if e.samples <= 0 or e.tokens_per_batch <= 0:
        errs.append("evaluation.samples and evaluation.tokens_per_batch must be > 0")
    if not cfg.training.eval_interval:
        errs.append("evaluation.tasks is set but training.eval_interval is not; set training.eval_interval=N")
    return errs
