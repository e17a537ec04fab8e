"""Write a tiny random Llama in HF format, sized for the bundled sample tokenizer.

It stands in for the short-context starting model (e.g. Mistral-7B-Instruct-v0.2) in the CPU
quickstart: tools/convert_hf_to_megatron.py turns it into the Megatron checkpoint that the
reference precompute and the policy start from. Deterministic (seeded).

    python examples/make_tiny_base_model.py --out runs/quickstart/hf_base
"""

import argparse
import shutil
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=str(Path(__file__).parent / "data" / "tokenizer.model"))
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    import sentencepiece as spm
    import transformers

    vocab = spm.SentencePieceProcessor(model_file=args.tokenizer).get_piece_size()
    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 3,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(args.tokenizer, out / "tokenizer.model")
    print(f"[base] tiny Llama ({sum(p.numel() for p in model.parameters()):,} params, vocab {vocab}) -> {out}")


if __name__ == "__main__":
    main()
