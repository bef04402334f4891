"""A tiny Llama built in-process, for the causal-LM trainer tests and the scripts they launch (zero3_train.py,
fsdp2_fused.py): no pytest, so a launched script can import it."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 96


def tiny_llama(seed: int, layers: int = 2, hidden: int = 32, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a teacher with a peaked, varied distribution
        model.get_output_embeddings().weight.mul_(8.0)
    return model
