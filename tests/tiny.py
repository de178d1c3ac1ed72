"""Tiny random models of every registered architecture, built in code (no downloads)."""
from __future__ import annotations

import torch

VOCAB = 320


def tiny_config(model_type: str, *, layers: int = 2):
    """A ``layers``-block config of ``model_type`` small enough to export in seconds (every linear's
    input a multiple of 64, so Jetson's INT4 blocks fit)."""
    return _tiny_config(model_type, layers)


def _tiny_config(model_type: str, layers: int):
    from transformers import FalconH1Config, Gemma3TextConfig, LlamaConfig, Mamba2Config, MambaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
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
                                layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2))
    if model_type == "mamba":
        return MambaConfig(vocab_size=VOCAB, hidden_size=64, state_size=16, num_hidden_layers=layers, expand=2, conv_kernel=4)
    if model_type == "mamba2":  # expand * hidden = num_heads * head_dim = 128
        return Mamba2Config(vocab_size=VOCAB, hidden_size=64, state_size=16, num_hidden_layers=layers, expand=2, num_heads=8,
                            head_dim=16, n_groups=2, conv_kernel=4, chunk_size=8, tie_word_embeddings=False)
    if model_type == "falcon_h1":  # non-trivial muP multipliers, so the tests cover them
        return FalconH1Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head="auto",
            mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
            embedding_multiplier=1.7, lm_head_multiplier=0.6, mlp_multipliers=[0.8, 1.3], key_multiplier=0.9,
            attention_in_multiplier=1.1, attention_out_multiplier=0.7, ssm_multipliers=[0.9, 1.1, 1.2, 0.8, 1.05],
            ssm_in_multiplier=1.25, ssm_out_multiplier=0.75, initializer_range=0.08, tie_word_embeddings=False)
    raise ValueError(model_type)


def tiny_model(model_type: str, *, seed: int = 0, layers: int = 2):
    """A seeded random causal LM in eval mode, fp32, SDPA attention (none for state-space models)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    attention = {} if model_type in ("mamba", "mamba2") else {"attn_implementation": "sdpa"}
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, layers=layers), **attention)
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
