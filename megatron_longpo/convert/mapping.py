"""HF <-> Megatron (TP=1, EP=1 layout) parameter mapping as a list of row copies.

Derived from the parameter template of the family (megatron_longpo/architectures.py). Every
Megatron parameter is a row-wise concatenation of row ranges of HF tensors, e.g. for Llama:

    HF                                              Megatron GPTModel (TP=1)
    model.embed_tokens.weight [V, h]                embedding.word_embeddings.weight [V_pad, h] (rows >= V zero)
    model.layers.i.input_layernorm.weight           decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight    decoder.layers.i.self_attention.linear_qkv.weight
        fused per query group g: [q heads of g (n/ng heads); k_g; v_g], each head_dim rows
    model.layers.i.self_attn.{q,k,v}_proj.bias      decoder.layers.i.self_attention.linear_qkv.bias (Qwen2)
    model.layers.i.self_attn.o_proj.weight          decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm.weight  decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight        decoder.layers.i.mlp.linear_fc1.weight = [gate; up]
    model.layers.i.mlp.down_proj.weight             decoder.layers.i.mlp.linear_fc2.weight
    model.layers.i.self_attn.{q,k}_norm.weight      decoder.layers.i.self_attention.{q,k}_layernorm.weight (Qwen3)
    model.layers.i.mlp.gate.weight (MoE router)     decoder.layers.i.mlp.router.weight
    model.layers.i.mlp.experts.e.{gate,up}_proj     decoder.layers.i.mlp.experts.local_experts.e.linear_fc1 = [gate; up]
    model.norm.weight                               decoder.final_layernorm.weight
    lm_head.weight [V, h] (untied only)             output_layer.weight [V_pad, h]

HF's GQA gives query head j the key/value head j // (n/ng), so query group g owns the contiguous
query heads g*(n/ng) .. (g+1)*(n/ng)-1. HF and Megatron both rotate halves (rotate_half,
rotary_interleaved=False), so no per-head permutation is needed. Import and export use the same
:class:`Piece` list, so HF -> Megatron -> HF copies every value back to where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megatron_longpo.architectures import EMBEDDING, HEAD, Param, architecture
from megatron_longpo.config import ModelConfig, padded_vocab_size
from megatron_longpo.models.sharding import VOCAB_PARAMS  # rows >= vocab_size are padding

__all__ = ["Piece", "Unit", "VOCAB_PARAMS", "check_coverage", "hf_shapes", "megatron_shapes", "pieces", "tiles", "units"]


@dataclass(frozen=True)
class Piece:
    """Megatron ``megatron[dst0:dst1]`` equals HF ``hf[src0:src1]`` (dim 0)."""

    megatron: str
    dst: tuple[int, int]
    hf: str
    src: tuple[int, int]


@dataclass(frozen=True)
class Unit:
    """Parameters converted together: the embedding, one transformer layer, or the head."""

    name: str
    megatron: tuple[str, ...]  # Megatron parameter names, model order
    hf: tuple[str, ...]  # HF tensor names, HF checkpoint order


def _flag(cfg: ModelConfig, when: str) -> bool:
    if not when:
        return True
    if when == "untied":
        return not cfg.tie_word_embeddings
    return bool(getattr(cfg, when))


def _dims(cfg: ModelConfig) -> dict[str, int]:
    d = cfg.head_dim
    return dict(h=cfg.hidden_size, f=cfg.ffn_hidden_size, m=cfg.expert_ffn_hidden_size, d=d,
                q=cfg.num_attention_heads * d, kv=cfg.num_query_groups * d, V=cfg.vocab_size,
                E=cfg.num_experts or 0)


def _expand(cfg: ModelConfig, template: tuple[Param, ...], **fmt: int) -> list[Param]:
    """The template's parameters present in ``cfg`` with ``{i}`` filled in; expert ``{e}`` entries
    follow the rest, expert by expert (the order of HF checkpoints)."""
    present = [t for t in template if _flag(cfg, t.when)]
    out = [replace(t, hf=t.hf.format(**fmt), megatron=t.megatron.format(**fmt)) for t in present if "{e}" not in t.hf]
    for e in range(cfg.num_experts or 0):
        out += [replace(t, hf=t.hf.format(e=e, **fmt), megatron=t.megatron.format(e=e, **fmt))
                for t in present if "{e}" in t.hf]
    return out


def _unit_params(cfg: ModelConfig) -> list[tuple[str, list[Param]]]:
    spec = architecture(cfg.arch)
    out = [("embedding", _expand(cfg, EMBEDDING))]
    out += [(f"layer {i}", _expand(cfg, spec.layer, i=i)) for i in range(cfg.num_layers)]
    out.append(("head", _expand(cfg, HEAD)))
    return out


def units(cfg: ModelConfig) -> list[Unit]:
    out = []
    for name, params in _unit_params(cfg):
        megatron = tuple(dict.fromkeys(p.megatron for p in params))
        out.append(Unit(name, megatron, tuple(p.hf for p in params)))
    return out


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of ``cfg`` with its shape, in checkpoint order."""
    dims = _dims(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for _, params in _unit_params(cfg):
        for p in params:
            shapes[p.hf] = tuple(dims[s] for s in p.shape)
    return shapes


def megatron_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every TP=1 Megatron parameter of ``cfg`` with its (vocab-padded) shape."""
    hs = hf_shapes(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for _, params in _unit_params(cfg):
        for p in params:  # fused parameters: rows add up (q + k + v, gate + up)
            rows = hs[p.hf][0] + (shapes[p.megatron][0] if p.megatron in shapes else 0)
            shapes[p.megatron] = (rows,) + hs[p.hf][1:]
    vp = padded_vocab_size(cfg, 1)
    for name in VOCAB_PARAMS:
        if name in shapes:
            shapes[name] = (vp,) + shapes[name][1:]
    return shapes


def _qkv_pieces(cfg: ModelConfig, q: Param, k: Param, v: Param) -> list[Piece]:
    d = cfg.head_dim
    per = cfg.num_attention_heads // cfg.num_query_groups  # query heads per group
    block = (per + 2) * d  # rows of one group in the fused tensor
    out = []
    for g in range(cfg.num_query_groups):
        base = g * block
        out.append(Piece(q.megatron, (base, base + per * d), q.hf, (g * per * d, (g + 1) * per * d)))
        out.append(Piece(k.megatron, (base + per * d, base + (per + 1) * d), k.hf, (g * d, (g + 1) * d)))
        out.append(Piece(v.megatron, (base + (per + 1) * d, base + block), v.hf, (g * d, (g + 1) * d)))
    return out


def pieces(cfg: ModelConfig) -> list[Piece]:
    """All row copies between HF and Megatron, grouped by Megatron parameter, model order."""
    hs = hf_shapes(cfg)
    out: list[Piece] = []
    for _, params in _unit_params(cfg):
        by_m: dict[str, dict[str, Param]] = {}
        for p in params:
            by_m.setdefault(p.megatron, {})[p.part] = p
        for m, parts in by_m.items():
            if "q" in parts:
                out += _qkv_pieces(cfg, parts["q"], parts["k"], parts["v"])
            elif "gate" in parts:
                gate, up = parts["gate"], parts["up"]
                f = hs[gate.hf][0]
                out.append(Piece(m, (0, f), gate.hf, (0, f)))
                out.append(Piece(m, (f, 2 * f), up.hf, (0, f)))
            else:
                n = hs[parts["whole"].hf][0]
                out.append(Piece(m, (0, n), parts["whole"].hf, (0, n)))
    return out


def check_coverage(cfg: ModelConfig) -> None:
    """Internal consistency: pieces tile every HF tensor and every Megatron row below the vocab."""
    hs, ms = hf_shapes(cfg), megatron_shapes(cfg)
    covered_hf: dict[str, list[tuple[int, int]]] = {n: [] for n in hs}
    covered_m: dict[str, list[tuple[int, int]]] = {n: [] for n in ms}
    for p in pieces(cfg):
        assert p.dst[1] - p.dst[0] == p.src[1] - p.src[0], p
        covered_hf[p.hf].append(p.src)
        covered_m[p.megatron].append(p.dst)
    for name, spans in covered_hf.items():
        assert tiles(spans, hs[name][0]), f"HF {name} not tiled: {sorted(spans)}"
    for name, spans in covered_m.items():
        rows = cfg.vocab_size if name in VOCAB_PARAMS else ms[name][0]
        assert tiles(spans, rows), f"Megatron {name} not tiled: {sorted(spans)}"


def tiles(spans: list[tuple[int, int]], n: int) -> bool:
    pos = 0
    for a, b in sorted(spans):
        if a != pos:
            return False
        pos = b
    return pos == n
