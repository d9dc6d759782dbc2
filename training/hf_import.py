"""Pretrained transformers LLM (Qwen2 / Llama) -> our initial LLM weights.

    python -m training.hf_import --hf HF_MODEL_DIR --out OUT_DIR [--dtype fp32|bf16|fp16] [--vocab-size N]

OUT_DIR gets llm_config.json + model.safetensors (DecoderLM.from_pretrained reads them; a stage config points at
it with `stage.init_llm_from`). --vocab-size grows the embedding (and an untied head) for added special tokens,
new rows = mean of the old rows; the text tokenizer's vocab_size is the number to pass.
"""

from __future__ import annotations

import argparse
import sys

import torch

from training.hf_convert import load_hf_llm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.hf_import", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--hf", required=True, help="transformers model directory (config.json + weights)")
    parser.add_argument("--out", required=True, help="output directory (llm_config.json + model.safetensors)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights"
    )
    parser.add_argument("--vocab-size", type=int, default=None, help="grow the vocabulary to this size")
    args = parser.parse_args(argv)
    try:
        model, config = load_hf_llm(args.hf, dtype=torch.float32)
        if args.vocab_size is not None:
            model.resize_token_embeddings(args.vocab_size)
        model.to(DTYPES[args.dtype]).save_pretrained(args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"hf_import: error: {error}", file=sys.stderr)
        return 2
    params = sum(p.numel() for p in model.parameters())
    print(
        f"hf_import: {args.hf} -> {args.out}: {config.num_layers} layers, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}, {params / 1e6:.1f}M parameters, {args.dtype}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
