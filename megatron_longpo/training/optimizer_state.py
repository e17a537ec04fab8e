"""The plain (non-distributed) optimizer's state in a checkpoint: one entry per parameter under
that parameter's global key, so it loads into any TP / PP / EP layout.

Why not Megatron-Core 0.16.1's ``optimizer.sharded_state_dict``: it nests the state by the torch
optimizer's parameter ids and, with experts, by the chained optimizer. At EP > 1 the expert
parameters (``allreduce=False``) get a second optimizer whose tensors are keyed ``chained_1.`` and
whose param groups and ``common_step`` go to common.pt under ``optimizer[1]``; at EP = 1 every
parameter is in one optimizer, unprefixed. Loading at another EP size fails in
``dist_checkpointing.load`` -> ``mapping.apply_factory_merges`` ("Different dict keys ...
dict_keys([0, 1, 'param_groups']) vs dict_keys(['state'])"), and the tensor keys differ anyway.

Here every state tensor is keyed ``optimizer.state.<name>.<model key>`` (Megatron's own
``make_sharded_optimizer_tensor`` on the model's ShardedTensor: global layer offsets, the expert's
global index, GLU fc1 factories, TP sharding, replica ids all come from the model), the dict
nesting holds only sharded entries (nothing layout-dependent reaches common.pt) and the only
non-tensor entry is the step shared by every parameter (torch's optimizers) or every param group
(TE / apex FusedAdam on GPU). Param-group hyper-parameters are not stored: they come from the
config, and lr / weight decay from the restored scheduler.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

__all__ = ["ParamState", "param_states", "sharded_optimizer_state", "load_optimizer_state"]


@dataclass
class ParamState:
    """One parameter as the optimizer sees it."""

    model: torch.nn.Parameter  # the model's parameter
    main: torch.Tensor  # what the torch optimizer updates: ``model`` or its fp32 main copy (bf16)
    state: dict  # the torch optimizer's state of ``main`` (exp_avg, square_avg, step, ...)


def _wrappers(optimizer) -> list:
    """The Megatron optimizers of ``optimizer`` (a ChainedOptimizer: dense, then experts at EP > 1)."""
    return [w for w in getattr(optimizer, "chained_optimizers", [optimizer]) if getattr(w, "optimizer", None) is not None]


def _model_param_of(wrapper) -> dict[int, torch.nn.Parameter]:
    """id(tensor the torch optimizer updates) -> the model parameter it trains."""
    out = {id(p): p for g in wrapper.optimizer.param_groups for p in g["params"]}
    for model_group, main_group in zip(getattr(wrapper, "float16_groups", ()), getattr(wrapper, "fp32_from_float16_groups", ())):
        out.update({id(main): p for p, main in zip(model_group, main_group)})
    return out


def param_states(optimizer) -> list[ParamState]:
    """Every parameter of ``optimizer`` (a plain Megatron optimizer, chained or not) with its state."""
    out = []
    for w in _wrappers(optimizer):
        model_of = _model_param_of(w)
        out += [ParamState(model_of[id(m)], m, w.optimizer.state[m]) for g in w.optimizer.param_groups for m in g["params"]]
    return out


def _model_entries(model_sd: dict) -> dict[int, object]:
    """id(parameter) -> its ShardedTensor / ShardedTensorFactory in the model's sharded state dict."""
    tensors, _ = extract_sharded_tensors_and_factories(model_sd)
    return {id(t.data): t for t in nested_values(tensors)}


def sharded_optimizer_state(optimizer, model_sd: dict, is_loading: bool = False) -> dict:
    """The optimizer entry of a training checkpoint: ``{"state": {i: {name: ShardedTensor}}, "step": t}``.

    ``is_loading``: first create the state tensors (zeros) the checkpoint is read into, as
    Megatron's ``init_state_fn`` does. The model weights are loaded from the model entry (a bf16
    parameter equals its saved fp32 main copy rounded), as Megatron's own load does.
    """
    if is_loading:
        for w in _wrappers(optimizer):
            w.init_state_fn(w.optimizer, w.config)
    entries = _model_entries(model_sd)
    state, steps = {}, set()
    for i, ps in enumerate(param_states(optimizer)):
        sh = entries[id(ps.model)]
        tensors = {k: v for k, v in ps.state.items() if k != "step"}
        if ps.main is not ps.model:  # bf16 parameter: its fp32 main copy is optimizer state too
            tensors["fp32_param"] = ps.main
        state[str(i)] = {k: make_sharded_optimizer_tensor(sh, v, prefix=f"optimizer.state.{k}") for k, v in tensors.items()}
        if "step" in ps.state:
            steps.add(float(ps.state["step"]))
    # TE / apex FusedAdam (GPU) count the step per param group, torch's optimizers per parameter.
    group_steps = [g["step"] for w in _wrappers(optimizer) for g in w.optimizer.param_groups if g["params"] and "step" in g]
    for where, found in (("parameters", steps), ("param groups", {float(x) for x in group_steps})):
        if len(found) > 1:
            raise ValueError(f"the optimizer's step differs between {where} ({sorted(found)}); one step is saved")
    out: dict = {"state": state}  # below: common.pt entries (on loading, placeholders the saved values replace)
    if steps:
        out["step"] = torch.tensor(steps.pop())
    if group_steps:
        out["group_step"] = group_steps[0]
    return out


@torch.no_grad()
def load_optimizer_state(optimizer, loaded: dict) -> None:
    """Copy what :func:`sharded_optimizer_state` (``is_loading=True``) read into the optimizer."""
    step = loaded.get("step")
    for i, ps in enumerate(param_states(optimizer)):
        for k, v in loaded["state"][str(i)].items():
            (ps.main if k == "fp32_param" else ps.state[k]).copy_(v)
        if step is not None:
            ps.state["step"] = step.detach().clone().to(torch.float32)
    if "group_step" in loaded:
        for w in _wrappers(optimizer):
            for g in w.optimizer.param_groups:
                if g["params"]:
                    g["step"] = copy.deepcopy(loaded["group_step"])
