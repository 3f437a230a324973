"""Hugging Face BART -> GenRec: rename a `BartForConditionalGeneration` state dict.

The ID tables start at zero, so the converted model computes exactly what BART computes until it
is trained (this is how the paper starts from pretrained BART, and how tests compare with HF).
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .model import GenRec

_SKIP = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")
_POS_OFFSET = 2  # BartLearnedPositionalEmbedding reserves two rows before position 0


def config_from_hf(hf_config, n_users: int = 0, n_items: int = 0) -> ModelConfig:
    c = hf_config
    if c.encoder_attention_heads != c.decoder_attention_heads or c.encoder_ffn_dim != c.decoder_ffn_dim:
        raise ValueError("hf_config: encoder and decoder must share head count and FFN size")
    if c.activation_function != "gelu":
        raise ValueError(f"hf_config: activation_function must be 'gelu', got {c.activation_function!r}")
    return ModelConfig(
        vocab_size=c.vocab_size, d_model=c.d_model, encoder_layers=c.encoder_layers,
        decoder_layers=c.decoder_layers, n_heads=c.encoder_attention_heads, ffn_dim=c.encoder_ffn_dim,
        max_positions=c.max_position_embeddings, dropout=c.dropout, attention_dropout=c.attention_dropout,
        activation_dropout=c.activation_dropout, scale_embedding=c.scale_embedding, n_users=n_users,
        n_items=n_items, pad_id=c.pad_token_id, bos_id=c.bos_token_id, eos_id=c.eos_token_id,
    )


def _rename(key: str) -> str:
    key = key.removeprefix("model.")
    return key.replace(".fc1.", ".ffn.fc1.").replace(".fc2.", ".ffn.fc2.")


def from_hf_bart(hf_model, n_users: int = 0, n_items: int = 0) -> GenRec:
    """A GenRec model holding the weights of a Hugging Face `BartForConditionalGeneration`."""
    cfg = config_from_hf(hf_model.config, n_users, n_items)
    model = GenRec(cfg)
    state = {}
    for key, value in hf_model.state_dict().items():
        if key in _SKIP:
            continue
        if key.endswith("embed_positions.weight"):
            value = value[_POS_OFFSET:]
        state[_rename(key)] = value
    state["user_embed.weight"] = torch.zeros_like(model.user_embed.weight)
    state["item_embed.weight"] = torch.zeros_like(model.item_embed.weight)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"hf_model: cannot convert, missing {missing}, unexpected {unexpected}")
    return model
