"""Small Llama-style causal LMs for tests, the demo and benchmarks, built from a seed."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

# name -> (hidden, layers, heads, intermediate). Parameter counts with the 512-token vocab.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (32, 2, 2, 64),  # ~50k params: unit tests
    # 4-bit tests: every Linear's in and out size a multiple of 64, the shapes
    # bitsandbytes' AVX512-BF16 CPU kernel takes (models.keep_4bit_differentiable)
    "tiny4bit": (64, 2, 2, 128),
    "small": (64, 2, 4, 192),  # ~150k params: the demo
    "base": (128, 4, 4, 384),  # ~1M params: benchmarks
}


def build_model(size: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0,
                vocab_size: int | None = None, max_position_embeddings: int = 256
                ) -> LlamaForCausalLM:
    """A freshly initialised Llama of the named size, with the tokenizer's special ids."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(SIZES)}")
    hidden, layers, heads, inter = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model
