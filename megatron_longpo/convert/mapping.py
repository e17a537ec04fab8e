"""HF <-> Megatron (TP=1 layout) parameter mapping as a list of row copies.

Every Megatron parameter is a row-wise concatenation of row ranges of HF tensors:

    HF (Llama / Mistral / Qwen2)                    Megatron GPTModel (TP=1)
    model.embed_tokens.weight [V, h]                embedding.word_embeddings.weight [V_pad, h] (rows >= V zero)
    model.layers.i.input_layernorm.weight           decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight    decoder.layers.i.self_attention.linear_qkv.weight
        fused per query group g: [q heads of g (n/ng heads); k_g; v_g], each head_dim rows
    model.layers.i.self_attn.{q,k,v}_proj.bias      decoder.layers.i.self_attention.linear_qkv.bias (Qwen2)
    model.layers.i.self_attn.o_proj.weight          decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm.weight  decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight        decoder.layers.i.mlp.linear_fc1.weight = [gate; up]
    model.layers.i.mlp.down_proj.weight             decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                               decoder.final_layernorm.weight
    lm_head.weight [V, h] (untied only)             output_layer.weight [V_pad, h]

HF's GQA gives query head j the key/value head j // (n/ng), so query group g owns the contiguous
query heads g*(n/ng) .. (g+1)*(n/ng)-1. HF and Megatron both rotate halves (rotate_half,
rotary_interleaved=False), so no per-head permutation is needed. Import and export use the same
:class:`Piece` list, so HF -> Megatron -> HF copies every value back to where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_longpo.config import ModelConfig, padded_vocab_size
from megatron_longpo.models.sharding import VOCAB_PARAMS  # rows >= vocab_size are padding

__all__ = ["Piece", "Unit", "VOCAB_PARAMS", "check_coverage", "hf_shapes", "megatron_shapes", "pieces", "units"]


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


def _layer_hf(cfg: ModelConfig, i: int) -> list[str]:
    p = f"model.layers.{i}."
    names = [p + "input_layernorm.weight"]
    names += [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
    if cfg.add_qkv_bias:
        names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    names += [p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight"]
    names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def _layer_megatron(cfg: ModelConfig, i: int) -> list[str]:
    p = f"decoder.layers.{i}."
    names = [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight"]
    if cfg.add_qkv_bias:
        names.append(p + "self_attention.linear_qkv.bias")
    names += [p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight"]
    names += [p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    return names


def units(cfg: ModelConfig) -> list[Unit]:
    out = [Unit("embedding", ("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",))]
    for i in range(cfg.num_layers):
        out.append(Unit(f"layer {i}", tuple(_layer_megatron(cfg, i)), tuple(_layer_hf(cfg, i))))
    head_m, head_h = ["decoder.final_layernorm.weight"], ["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        head_m.append("output_layer.weight")
        head_h.append("lm_head.weight")
    out.append(Unit("head", tuple(head_m), tuple(head_h)))
    return out


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of ``cfg`` with its shape, in checkpoint order."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h)})
        if cfg.add_qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def megatron_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every TP=1 Megatron parameter of ``cfg`` with its (vocab-padded) shape."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d
    vp = padded_vocab_size(cfg, 1)
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (vp, h)}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attention.linear_qkv.weight"] = (qkv, h)
        if cfg.add_qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (qkv,)
        shapes[p + "self_attention.linear_proj.weight"] = (h, cfg.num_attention_heads * d)
        shapes[p + "pre_mlp_layernorm.weight"] = (h,)
        shapes[p + "mlp.linear_fc1.weight"] = (2 * f, h)
        shapes[p + "mlp.linear_fc2.weight"] = (h, f)
    shapes["decoder.final_layernorm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["output_layer.weight"] = (vp, h)
    return shapes


def _qkv_pieces(cfg: ModelConfig, megatron: str, hf_prefix: str, suffix: str) -> list[Piece]:
    d = cfg.head_dim
    per = cfg.num_attention_heads // cfg.num_query_groups  # query heads per group
    block = (per + 2) * d  # rows of one group in the fused tensor
    out = []
    for g in range(cfg.num_query_groups):
        base = g * block
        out.append(Piece(megatron, (base, base + per * d), hf_prefix + "q_proj" + suffix, (g * per * d, (g + 1) * per * d)))
        out.append(Piece(megatron, (base + per * d, base + (per + 1) * d), hf_prefix + "k_proj" + suffix, (g * d, (g + 1) * d)))
        out.append(Piece(megatron, (base + (per + 1) * d, base + block), hf_prefix + "v_proj" + suffix, (g * d, (g + 1) * d)))
    return out


def pieces(cfg: ModelConfig) -> list[Piece]:
    """All row copies between HF and Megatron, grouped by Megatron parameter, model order."""
    hs = hf_shapes(cfg)

    def whole(m: str, hf: str) -> Piece:
        n = hs[hf][0]
        return Piece(m, (0, n), hf, (0, n))

    out = [whole("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    f = cfg.ffn_hidden_size
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out.append(whole(m + "input_layernorm.weight", h + "input_layernorm.weight"))
        out += _qkv_pieces(cfg, m + "self_attention.linear_qkv.weight", h + "self_attn.", ".weight")
        if cfg.add_qkv_bias:
            out += _qkv_pieces(cfg, m + "self_attention.linear_qkv.bias", h + "self_attn.", ".bias")
        out.append(whole(m + "self_attention.linear_proj.weight", h + "self_attn.o_proj.weight"))
        out.append(whole(m + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight"))
        out.append(Piece(m + "mlp.linear_fc1.weight", (0, f), h + "mlp.gate_proj.weight", (0, f)))
        out.append(Piece(m + "mlp.linear_fc1.weight", (f, 2 * f), h + "mlp.up_proj.weight", (0, f)))
        out.append(whole(m + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight"))
    out.append(whole("decoder.final_layernorm.weight", "model.norm.weight"))
    if not cfg.tie_word_embeddings:
        out.append(whole("output_layer.weight", "lm_head.weight"))
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
        assert _tiles(spans, hs[name][0]), f"HF {name} not tiled: {sorted(spans)}"
    for name, spans in covered_m.items():
        rows = cfg.vocab_size if name in VOCAB_PARAMS else ms[name][0]
        assert _tiles(spans, rows), f"Megatron {name} not tiled: {sorted(spans)}"


def _tiles(spans: list[tuple[int, int]], n: int) -> bool:
    pos = 0
    for a, b in sorted(spans):
        if a != pos:
            return False
        pos = b
    return pos == n
