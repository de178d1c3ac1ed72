"""Tiny random models of every registered architecture, built in code (no downloads)."""
from __future__ import annotations

import torch

VOCAB = 320


def tiny_config(model_type: str):
    """A 2-block config of ``model_type`` small enough to export in seconds."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if model_type == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if model_type == "mistral":
        return MistralConfig(**common, tie_word_embeddings=False)
    if model_type == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if model_type == "qwen3":
        return Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    if model_type == "gemma3_text":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "full_attention"])
    raise ValueError(model_type)


def tiny_model(model_type: str, *, seed: int = 0):
    """A seeded random causal LM in eval mode, fp32, SDPA attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="sdpa")
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_tokenizer(text: str):
    """A byte-level BPE tokenizer trained on ``text`` with at most VOCAB tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
