"""Move full (TP=1 layout) tensors to and from one tensor-parallel rank's shard.

The "full" layout of every parameter is the one a TP=1 Megatron model has. Under TP:
- column-parallel weights (QKV, fc1, output layer, embedding rows) split along dim 0,
  row-parallel weights (attention proj, fc2) along dim 1 (``param.partition_dim``);
- the gated MLP's fc1 is [gate; up] on EVERY rank, so rank r holds [gate_r; up_r], not a
  contiguous slice of the full [gate; up];
- QKV is stored per query group ([q..., k, v] for each group), and groups are split contiguously,
  so a plain dim-0 slice is right;
- vocabulary rows are padded to a multiple of ``make_vocab_size_divisible_by * tp``; padding rows
  differ between TP sizes, so only the first ``vocab_size`` rows carry meaning;
- MoE experts: EP rank r holds experts r*n .. r*n+n-1 as ``local_experts.0 .. n-1`` (n =
  experts / ep), each split over the expert-tensor-parallel group (``ExpertShards``); the full
  layout names every expert by its global index.
Used by tests (TP=N / EP=N vs TP=1), checkpoint conversion and layout changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


@dataclass(frozen=True)
class ExpertShards:
    """This rank's place in the expert layout (from ``ParallelGroups``: ep_* and etp_* fields)."""

    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    ep_group: Optional[dist.ProcessGroup] = None
    etp_group: Optional[dist.ProcessGroup] = None

    @classmethod
    def of(cls, groups) -> "ExpertShards":  # runtime.distributed.ParallelGroups (a higher layer)
        return cls(groups.ep_rank, groups.ep_size, groups.etp_rank, groups.etp_size, groups.ep_group, groups.etp_group)


def _local_experts(names) -> int:
    """Experts per layer held by this rank (0 for a dense model)."""
    return max((int(m.group(1)) + 1 for n in names if (m := _LOCAL_EXPERT.search(n))), default=0)


def global_expert_name(name: str, ep_rank: int, local_count: int) -> str:
    """Full-layout name of a local expert parameter (unchanged for other parameters)."""
    m = _LOCAL_EXPERT.search(name)
    if m is None:
        return name
    return name[: m.start(1)] + str(ep_rank * local_count + int(m.group(1))) + name[m.end(1):]


def is_glu_fc1(name: str) -> bool:
    if _LOCAL_EXPERT.search(name):  # an expert's fc1 is [gate; up] too
        return name.endswith(("linear_fc1.weight", "linear_fc1.bias"))
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def partition_dim(param: torch.Tensor) -> Optional[int]:
    """Dim along which ``param`` is TP-sharded, or None when replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return int(getattr(param, "partition_dim"))
    return None


def _resize_vocab(full: torch.Tensor, rows: int) -> torch.Tensor:
    if full.shape[0] >= rows:
        return full[:rows]
    pad = full.new_zeros((rows - full.shape[0],) + tuple(full.shape[1:]))
    return torch.cat([full, pad], 0)


def full_to_local(name: str, full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The shard of ``full`` that ``param`` (this rank's parameter) holds."""
    dim = partition_dim(param)
    if name.endswith(VOCAB_PARAMS):
        full = _resize_vocab(full, param.shape[0] * tp_size)
    if dim is None or tp_size == 1:
        return full.reshape(param.shape).clone()
    if is_glu_fc1(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0).clone()
    return full.chunk(tp_size, dim=dim)[tp_rank].clone()


def local_to_full(
    name: str, local: torch.Tensor, param: torch.Tensor, tp_group: dist.ProcessGroup, vocab_size: Optional[int] = None
) -> torch.Tensor:
    """Gather a TP-sharded tensor (a parameter or its gradient) into the full layout."""
    dim = partition_dim(param)
    tp_size = dist.get_world_size(tp_group)
    if dim is not None and tp_size > 1:
        parts = [torch.empty_like(local) for _ in range(tp_size)]
        dist.all_gather(parts, local.contiguous(), group=tp_group)
        if is_glu_fc1(name):
            gates = [p.chunk(2, 0)[0] for p in parts]
            ups = [p.chunk(2, 0)[1] for p in parts]
            full = torch.cat(gates + ups, 0)
        else:
            full = torch.cat(parts, dim=dim)
    else:
        full = local
    if vocab_size is not None and name.endswith(VOCAB_PARAMS):
        full = full[:vocab_size]
    return full


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor], tp_rank: int, tp_size: int,
                         experts: ExpertShards = ExpertShards()) -> None:
    """Copy a full-layout state dict (TP=1, EP=1 parameter names) into ``model``."""
    params = dict(model.named_parameters())
    n = _local_experts(params)
    names = {name: global_expert_name(name, experts.ep_rank, n) for name in params}
    missing = sorted(set(names.values()) - set(full))
    if missing:
        raise KeyError(f"full state dict lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, p in params.items():
            if names[name] != name or _LOCAL_EXPERT.search(name):
                p.copy_(full_to_local(name, full[names[name]], p, experts.etp_rank, experts.etp_size))
            else:
                p.copy_(full_to_local(name, full[name], p, tp_rank, tp_size))


def gather_full_state_dict(
    model: torch.nn.Module, tp_group: dist.ProcessGroup, vocab_size: Optional[int] = None, grads: bool = False,
    experts: ExpertShards = ExpertShards(), of: Optional[Callable[[torch.nn.Parameter], torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """Full-layout parameters (or their ``.grad`` / Megatron ``.main_grad``, or ``of(param)``: a
    tensor of the parameter's shape such as its Adam ``exp_avg``) of a TP / EP model."""
    out = {}
    params = dict(model.named_parameters())
    n = _local_experts(params)
    for name, p in params.items():
        t = p if of is None else of(p)
        if grads:
            t = getattr(p, "main_grad", None)
            if t is None:
                t = p.grad
            if t is None:
                t = torch.zeros_like(p)
        if not _LOCAL_EXPERT.search(name):
            out[name] = local_to_full(name, t.detach(), p, tp_group, vocab_size).clone()
            continue
        full = local_to_full(name, t.detach(), p, experts.etp_group, None) if experts.etp_size > 1 else t.detach()
        parts = [full.clone()]
        if experts.ep_size > 1:
            parts = [torch.empty_like(full) for _ in range(experts.ep_size)]
            dist.all_gather(parts, full.contiguous(), group=experts.ep_group)
        for r, part in enumerate(parts):
            out[global_expert_name(name, r, n)] = part.clone()
    return out


# ----------------------------------------------------------------------------------------------
# Pipeline stages: a chunk names its layers 0..n-1; the full layout numbers them globally.
# ----------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")
_TIED_OUTPUT = "output_layer.weight"
_EMBEDDING = "embedding.word_embeddings.weight"


def _inner(chunk: torch.nn.Module) -> torch.nn.Module:
    m = chunk
    while not hasattr(m, "decoder") and hasattr(m, "module"):
        m = m.module
    return m


def stage_full_names(chunk: torch.nn.Module) -> dict[str, str]:
    """``chunk.named_parameters()`` name -> its name in the full (PP=1) model.

    Layer indices get the chunk's global offset (``TransformerLayer.layer_number`` is global,
    1-based). A last stage that duplicates a tied embedding as ``output_layer.weight`` maps it to
    the embedding (the one full tensor both stages hold).
    """
    inner = _inner(chunk)
    numbers = [layer.layer_number - 1 for layer in inner.decoder.layers]
    tied = bool(getattr(inner, "share_embeddings_and_output_weights", False))
    out = {}
    for name, _ in chunk.named_parameters():
        m = _LAYER.match(name)
        if m:
            full = f"{m.group(1)}{numbers[int(m.group(2))]}{m.group(3)}"
        elif tied and name.endswith(_TIED_OUTPUT):
            full = name[: -len(_TIED_OUTPUT)] + _EMBEDDING
        else:
            full = name
        out[name] = full
    return out


def load_full_state_dict_chunks(chunks: list[torch.nn.Module], full: dict[str, torch.Tensor],
                                tp_rank: int, tp_size: int) -> None:
    """Copy a full-layout (PP=1, TP=1) state dict into this rank's pipeline chunks."""
    for chunk in chunks:
        names = stage_full_names(chunk)
        load_full_state_dict(chunk, {local: full[names[local]] for local in names if names[local] in full},
                             tp_rank, tp_size)


def gather_full_state_dict_chunks(
    chunks: list[torch.nn.Module], tp_group: dist.ProcessGroup, pp_group: Optional[dist.ProcessGroup],
    vocab_size: Optional[int] = None, grads: bool = False,
) -> dict[str, torch.Tensor]:
    """Full-layout (PP=1, TP=1) parameters or gradients of a pipelined model, on every rank of
    ``pp_group`` (collective over TP, then PP). A tied embedding comes from the first stage."""
    mine: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        names = stage_full_names(chunk)
        for local, t in gather_full_state_dict(chunk, tp_group, vocab_size, grads).items():
            mine.setdefault(names[local], t)
    if pp_group is None or dist.get_world_size(pp_group) == 1:
        return mine
    parts: list = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(parts, mine, group=pp_group)
    out: dict[str, torch.Tensor] = {}
    for part in parts:  # stage order: the first stage's embedding wins
        for k, v in part.items():
            out.setdefault(k, v)
    return out
