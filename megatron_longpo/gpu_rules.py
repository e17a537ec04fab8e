"""Start-up rules of the GPU path (FP8, TE context parallelism) as pure functions.

Transformer Engine and Megatron-Core assert these deep inside the first forward or the model
constructor, minutes into a cluster job and with a message that names no option. Here each rule
returns the violation as text naming the option and the fix; :func:`megatron_longpo.config.validate`
raises them all at once before any process group exists. No imports of the config module (it
imports this one): the functions take the config sections duck-typed.

FP8 facts (TransformerEngine 2.x, Megatron-Core 0.16.1 ``fp8_utils.py``):
- every FP8 GEMM operand must have its leading-dims product and its last dim divisible by the
  recipe's alignment: 16 for per-tensor recipes (``delayed``, ``tensorwise``) and ``blockwise``,
  32 for ``mxfp8`` (``get_fp8_align_size``). The GEMMs of one layer on a TP rank are
  QKV [h -> (heads + 2*groups)*d/tp], proj [heads*d/tp -> h], fc1 [h -> 2*ffn/tp],
  fc2 [ffn/tp -> h]; their token dim is (rows x S/cp), which ``seq_length_multiple`` covers.
- ``mxfp8`` runs only on Blackwell (compute capability 10.x).
- FP8 runs only through TE modules: the local spec has no FP8 GEMMs.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from packaging.specifiers import SpecifierSet
from packaging.version import Version

FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
NVTE_ATTENTION_VARS = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


def fp8_alignment(recipe: str) -> int:
    """Divisibility every FP8 GEMM dim needs under ``recipe`` (Megatron's get_fp8_align_size)."""
    return 32 if recipe == "mxfp8" else 16


def fp8_rule_errors(model: Any, parallel: Any) -> list[str]:
    """Violations of the FP8 rules for ``model`` (ModelConfig) on ``parallel`` (ParallelConfig)."""
    if not parallel.fp8:
        return []
    errs: list[str] = []
    recipe = parallel.fp8_recipe
    if model.transformer_impl == "local":
        errs.append(
            "parallel.fp8 needs Transformer Engine layers but model.transformer_impl=local has no FP8 "
            "GEMMs; set model.transformer_impl=transformer_engine (or auto on a CUDA machine with TE), "
            "or parallel.fp8=null"
        )
    if model.params_dtype != "bf16":
        errs.append("parallel.fp8 needs model.params_dtype=bf16")
    if recipe == "delayed":
        if parallel.fp8_amax_history_len < 1:
            errs.append(f"parallel.fp8_amax_history_len must be >= 1 (got {parallel.fp8_amax_history_len})")
    tp = parallel.tensor_model_parallel_size
    a = fp8_alignment(recipe)
    d, h, heads, groups, ffn = (model.head_dim, model.hidden_size, model.num_attention_heads,
                                model.num_query_groups, model.ffn_hidden_size)
    if tp <= 0 or heads % tp or groups % tp or ffn % tp:
        return errs  # validate_model reports the TP divisibility itself
    dims = {
        "model.hidden_size (input of QKV and fc1, output of proj and fc2)": h,
        "(num_attention_heads + 2*num_query_groups) * head_dim / tp (QKV output per TP rank)":
            (heads + 2 * groups) * d // tp,
        "num_attention_heads * head_dim / tp (proj input per TP rank)": heads * d // tp,
        "model.ffn_hidden_size / tp (fc2 input per TP rank)": ffn // tp,
    }
    for what, value in dims.items():
        if value % a:
            errs.append(
                f"parallel.fp8 (recipe {recipe}) needs every FP8 GEMM dim divisible by {a}, but {what} = "
                f"{value}; change the model dims or parallel.tensor_model_parallel_size, or set parallel.fp8=null"
            )
    return errs


def fp8_device_errors(parallel: Any, capability: Optional[tuple[int, int]]) -> list[str]:
    """Rules that depend on the GPU (``capability`` = torch.cuda.get_device_capability(), or None)."""
    if not parallel.fp8 or capability is None:
        return []
    if parallel.fp8_recipe == "mxfp8" and capability[0] < 10:
        return [
            f"parallel.fp8_recipe=mxfp8 needs a Blackwell GPU (compute capability 10.x) but this GPU is "
            f"{capability[0]}.{capability[1]}; use parallel.fp8_recipe=delayed, tensorwise or blockwise on H100/H200"
        ]
    if capability < (8, 9):
        return [f"parallel.fp8 needs compute capability >= 8.9 (Ada/Hopper); this GPU is "
                f"{capability[0]}.{capability[1]}; set parallel.fp8=null"]
    return []


def te_context_parallel_errors(model: Any, parallel: Any, pair_layout: str) -> list[str]:
    """TE attention's CP rules (cp_comm_type) when the run may use TE attention."""
    cp, tp = parallel.context_parallel_size, parallel.tensor_model_parallel_size
    may_use_te = parallel.attention_backend == "te" or (
        parallel.attention_backend == "auto" and model.transformer_impl != "local" and pair_layout == "two_sequences"
    )
    if cp <= 1 or not may_use_te or tp <= 0:
        return []
    errs: list[str] = []
    if parallel.cp_comm_type == "a2a":
        heads, groups = model.num_attention_heads // tp, model.num_query_groups // tp
        for name, n in (("num_attention_heads", heads), ("num_query_groups", groups)):
            if n % cp:
                errs.append(
                    f"parallel.cp_comm_type=a2a (TE attention) scatters heads over CP: model.{name}/tp = {n} "
                    f"must be divisible by parallel.context_parallel_size ({cp}); use parallel.cp_comm_type=p2p "
                    "or all_gather, a smaller TP, or parallel.attention_backend=sdpa"
                )
    if parallel.cp_comm_type == "a2a+p2p":
        errs.append(
            "parallel.cp_comm_type=a2a+p2p needs hierarchical context-parallel groups, which this project "
            "does not create; use parallel.cp_comm_type=p2p, a2a or all_gather"
        )
    return errs


def nvte_env_errors(environ: Mapping[str, str]) -> list[str]:
    """Megatron-Core (attention_backend=auto) asserts each NVTE_*_ATTN variable is unset or 1."""
    return [
        f"environment variable {var}={environ[var]!r}: Megatron-Core 0.16 (attention_backend=auto) "
        f"requires it unset or 1 and sets it itself; unset {var} (choose the attention with "
        "parallel.attention_backend instead)"
        for var in NVTE_ATTENTION_VARS
        if var in environ and environ[var] != "1"
    ]


# ----------------------------------------------------------------------------------------------
# Transformer Engine version (setup.py pins the range megatron-core 0.16.1 is tested with)
# ----------------------------------------------------------------------------------------------

# megatron-core 0.16.1 pyproject.toml, extra "dev": transformer-engine[pytorch,core_cu13]>=2.9.0a0,<2.12.0
TE_SUPPORTED = ">=2.9.0a0,<2.12.0"
# From TE 2.16.1 ``set_extra_state`` refuses pickled (delayed-scaling) FP8 state unless this
# variable is 1, while ``get_extra_state`` still pickles it: such runs save but cannot resume.
TE_REFUSES_PICKLED_STATE_FROM = "2.16.1"
TE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"
TE_PICKLE_REFUSAL = "Refusing to load pickled Transformer Engine extra state"


def te_version_supported(version: str) -> bool:
    """Whether ``version`` of Transformer Engine is inside the range megatron-core 0.16.1 supports."""
    return Version(version) in SpecifierSet(TE_SUPPORTED, prereleases=True)


def te_refuses_pickled_state(version: Optional[str]) -> bool:
    """TE >= 2.16.1 refuses pickled delayed-scaling state on load (unless TE_PICKLE_ENV=1)."""
    return version is not None and Version(version) >= Version(TE_REFUSES_PICKLED_STATE_FROM)


def te_version_notes(version: Optional[str], parallel: Any) -> list[str]:
    """Start-up warnings about the installed TE (None: TE absent, nothing to say)."""
    if version is None:
        return []
    notes = []
    if not te_version_supported(version):
        notes.append(f"Transformer Engine {version} is outside the range megatron-core 0.16.1 is tested with "
                     f"({TE_SUPPORTED}); pip install 'transformer-engine[pytorch]{TE_SUPPORTED}' (docs/install.md)")
    if parallel.fp8 and parallel.fp8_recipe == "delayed" and te_refuses_pickled_state(version):
        notes.append(f"Transformer Engine {version} refuses pickled FP8 delayed-scaling state on load: this run "
                     f"resumes its own checkpoints (checkpoint.save) with {TE_PICKLE_ENV}=1 set for the load only; "
                     "other checkpoints need it set by you (trusted files only) or parallel.fp8_recipe=tensorwise")
    return notes


def is_te_pickle_refusal(err: BaseException) -> bool:
    """``err`` is TE's refusal to unpickle FP8 extra state."""
    return isinstance(err, RuntimeError) and TE_PICKLE_REFUSAL in str(err)


def fp8_resume_error(where: str, version: Optional[str]) -> str:
    """The one-line error for a checkpoint whose pickled FP8 state TE refused."""
    return (f"{where}: Transformer Engine {version or '?'} refuses the pickled FP8 delayed-scaling state in this "
            f"checkpoint ({TE_PICKLE_ENV} is not 1); if you trust the checkpoint set {TE_PICKLE_ENV}=1, or install "
            f"transformer-engine{TE_SUPPORTED} (setup.py's pin), or train with parallel.fp8_recipe=tensorwise "
            "(no pickled state)")
