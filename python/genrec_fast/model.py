"""GenRec: a BART-style encoder-decoder with token + position + ID embeddings.

Layer layout, normalisation and parameter names follow Hugging Face's BART (post-LN, GELU,
`layernorm_embedding`, tied LM head with `final_logits_bias`), so a `BartForConditionalGeneration`
state dict converts by renaming (see `from_hf_bart`). GenRec adds two ID tables: one vector per
user and per item, added to every piece of that id at the encoder input (index 0 = none/unknown).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .history_bias import HistoryBias, add_offsets, code_offsets, history_items
from .transition_bias import TransitionBias, context_items
from .item_topk import Head
from .kernels import attention
from .kernels.packed_attention import packed_attention
from .leaf_head import LeafHead, table_rows
from .loss import linear_cross_entropy


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)  # (B, H, T, hd)


def _merge(x: torch.Tensor) -> torch.Tensor:
    B, H, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, C)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.dropout = cfg.n_heads, cfg.attention_dropout
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _heads(self.k_proj(x), self.n_heads), _heads(self.v_proj(x), self.n_heads)  # 2 x (B, H, S, hd)

    def forward(self, x, k, v, lengths=None, is_causal=False, mask=None):
        """lengths (B,): valid keys per row (right padding), None = all; or mask (B, 1, T, S) bool
        (True = may attend). Inference goes through `kernels.attention` (the fused CUDA kernel on GPUs);
        training, causal and explicit masks use SDPA."""
        q = _heads(self.q_proj(x), self.n_heads)  # (B, H, T, hd)
        if self.training or is_causal or mask is not None:
            if mask is None and lengths is not None:
                mask = _key_mask(lengths, k.shape[2])
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)
        else:
            y = attention(q, k, v, key_lengths=lengths)
        return self.out_proj(_merge(y))  # (B, T, C)

    def grouped(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One query per beam, W = R / U beams per user sharing that user's K/V (never copied per beam)."""
        q = _heads(self.q_proj(x), self.n_heads)  # (R, H, 1, hd)
        y = attention(q, k, v, key_lengths=lengths, kv_group=x.shape[0] // k.shape[0])  # (R, H, 1, hd)
        return self.out_proj(_merge(y))  # (R, 1, C)


def _key_mask(lengths: torch.Tensor, S: int) -> torch.Tensor:
    return (torch.arange(S, device=lengths.device) < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.d_model, cfg.ffn_dim), nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.act_dropout, self.dropout = cfg.activation_dropout, cfg.dropout

    def forward(self, x):
        h = F.dropout(F.gelu(self.fc1(x)), self.act_dropout, self.training)
        return F.dropout(self.fc2(h), self.dropout, self.training)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn, self.self_attn_layer_norm = Attention(cfg), nn.LayerNorm(cfg.d_model)
        self.ffn, self.final_layer_norm = FeedForward(cfg), nn.LayerNorm(cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x, lengths, causal=False, mask=None):
        k, v = self.self_attn.kv(x)
        y = self.self_attn(x, k, v, None if causal or mask is not None else lengths, is_causal=causal, mask=mask)
        x = self.self_attn_layer_norm(x + F.dropout(y, self.dropout, self.training))
        return self.final_layer_norm(x + self.ffn(x))

    def packed(self, x, rows, slots, B: int, S: int, lengths):
        """Inference over the real pieces only: x (N, C) holds rows `rows` of the padded (B * S, C) input, each
        sequence's rows in order; projections, norms and FFN skip the padding. On a CPU the attention too
        (`kernels.packed_attention`, C++); elsewhere it runs padded: `slots` (B * S,) names the packed row each
        padded slot copies (any real row for the padding, whose keys are masked and whose outputs are
        dropped). -> (N, C)."""
        a = self.self_attn
        qkv = _fused_linear(x, a.q_proj, a.k_proj, a.v_proj)  # (N, 3C)
        if _cpp_packed_attention(x):
            y = packed_attention(qkv, lengths, a.n_heads)  # (N, C)
        else:
            qkv = qkv.index_select(0, slots)  # (B * S, 3C)
            q, k, v = (_heads(t, a.n_heads) for t in qkv.view(B, S, -1).chunk(3, dim=-1))  # 3 x (B, H, S, hd)
            y = _merge(attention(q, k, v, key_lengths=lengths)).reshape(B * S, -1)[rows]  # (N, C)
        x = self.self_attn_layer_norm(a.out_proj(y).add_(x))
        return self.final_layer_norm(self.ffn(x).add_(x))


def _cpp_packed_attention(t: torch.Tensor) -> bool:
    """Whether the encoder's packed self-attention runs as the C++ op (CPU tensors) rather than padded."""
    return t.device.type == "cpu"


def _fused_linear(x: torch.Tensor, *layers: nn.Linear) -> torch.Tensor:
    """The outputs of several Linear layers on the same input, side by side, from one matmul."""
    weight = torch.cat([m.weight for m in layers])  # (sum out, C)
    bias = torch.cat([m.bias for m in layers])
    return F.linear(x, weight, bias)


def _unpack(x: torch.Tensor, rows: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """(N, C) real pieces -> (B, S, C) with zeros at the padding."""
    out = x.new_zeros(B * S, x.shape[1])
    out[rows] = x
    return out.view(B, S, -1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn, self.self_attn_layer_norm = Attention(cfg), nn.LayerNorm(cfg.d_model)
        self.encoder_attn, self.encoder_attn_layer_norm = Attention(cfg), nn.LayerNorm(cfg.d_model)
        self.ffn, self.final_layer_norm = FeedForward(cfg), nn.LayerNorm(cfg.d_model)
        self.dropout = cfg.dropout

    def _res(self, x, y, norm):
        return norm(x + F.dropout(y, self.dropout, self.training))

    def forward(self, x, memory, lengths, self_mask=None, cross_mask=None):
        """Causal self-attention and cross-attention to `lengths` memory pieces, unless masks are given."""
        k, v = self.self_attn.kv(x)
        x = self._res(x, self.self_attn(x, k, v, is_causal=self_mask is None, mask=self_mask), self.self_attn_layer_norm)
        ck, cv = self.encoder_attn.kv(memory)
        x = self._res(x, self.encoder_attn(x, ck, cv, lengths, mask=cross_mask), self.encoder_attn_layer_norm)
        return self.final_layer_norm(x + self.ffn(x))

    def first_step(self, x, memory, lengths):
        """The decoder's first step (one query per user, no cache): x (1 or U, 1, C), memory (U, S, C).

        Self-attention over the query alone is v_proj then out_proj. Cross-attention never projects the
        memory: per head, q . (W_k m + b_k) = (W_k^T q) . m + const and sum_s p_s (W_v m_s + b_v) =
        W_v (sum_s p_s m_s) + b_v, so it runs on (U, S, C) with C x C weights once per user.
        -> (U, 1, C); equal to `step` on a fresh cache (tested)."""
        sa, ca = self.self_attn, self.encoder_attn
        x = self.self_attn_layer_norm(x + sa.out_proj(sa.v_proj(x)))
        U, S, C = memory.shape
        H = ca.n_heads
        hd = C // H
        q = ca.q_proj(x).reshape(-1, H, hd)  # (1 or U, H, hd)
        wk = ca.k_proj.weight.view(H, hd, C)  # head h's rows of W_k
        qk = torch.bmm(q.transpose(0, 1), wk).permute(1, 2, 0) * hd ** -0.5  # (1 or U, C, H): W_k,h^T q_h, scaled
        # (U, S, H); the first layer's query is every user's: one matmul over all memory rows
        scores = memory @ qk[0] if qk.shape[0] == 1 else torch.bmm(memory, qk)
        pad = torch.arange(S, device=memory.device)[None, :, None] >= lengths[:, None, None]
        p = scores.masked_fill(pad, float("-inf")).softmax(dim=1)  # (U, S, H)
        ctx = torch.bmm(p.transpose(1, 2), memory)  # (U, H, C): sum_s p m per head
        wv = ca.v_proj.weight.view(H, hd, C)
        y = torch.bmm(ctx.transpose(0, 1), wv.transpose(1, 2)).transpose(0, 1).reshape(U, 1, C) + ca.v_proj.bias
        x = self.encoder_attn_layer_norm(x + ca.out_proj(y))
        return self.final_layer_norm(x + self.ffn(x))

    def step(self, x, cache: "DecoderCache", i: int):
        """One new token per beam; writes its K/V into the self-attention cache of layer i."""
        k, v = cache.append(i, *self.self_attn.kv(x))  # 2 x (R, H, t + 1, hd)
        x = self.self_attn_layer_norm(x + self.self_attn(x, k, v))
        y = self.encoder_attn.grouped(x, cache.cross_k[i], cache.cross_v[i], cache.lengths)
        x = self.encoder_attn_layer_norm(x + y)
        return self.final_layer_norm(x + self.ffn(x))


@dataclass
class DecoderCache:
    """Per decoder layer: cross-attention K/V once per user, self-attention K/V per beam.

    The self-attention K/V of step t are written in place at position t of buffers (R, H, capacity, hd):
    no concatenation per step. Set `capacity` to the longest decode to avoid regrowth (it doubles).
    """

    cross_k: list  # per layer (U, H, S, hd)
    cross_v: list
    lengths: torch.Tensor  # (U,) encoder pieces per user (right padding)
    self_k: list  # per layer (R, H, capacity, hd), positions < step filled; None before the first step
    self_v: list
    step: int = 0
    capacity: int = 8
    leaf_key: torch.Tensor | None = None  # (R,) with a leaf head: the leaf of each row's cluster tokens so far
    history: tuple | None = None  # with a history bias over codes: (HistoryBias.state, codes (U, S, L)) per user
    transition: tuple | None = None  # with a transition bias over codes: the successors' codes (U, N, L), offsets
    # (U, 2, N) of a cluster step and of the leaf step
    prefix: torch.Tensor | None = None  # (R, t) with `history` or `transition`: each row's tokens after BOS
    native_step: object = None  # a callable (model, tokens, cache) -> (R, C) that replaces `decode_step_hidden`'s
    # PyTorch ops (first_step.decoder_step, set by beam_decode on a CPU)

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores layer i's new K/V (R, H, 1, hd) at position `step`; -> K/V so far, 2 x (R, H, step + 1, hd)."""
        t = self.step
        if self.self_k[i] is None or self.self_k[i].shape[2] <= t:
            self.self_k[i], self.self_v[i] = self._grown(self.self_k[i], k), self._grown(self.self_v[i], v)
        self.self_k[i][:, :, t:t + 1] = k
        self.self_v[i][:, :, t:t + 1] = v
        return self.self_k[i][:, :, :t + 1], self.self_v[i][:, :, :t + 1]

    def _grown(self, buf: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        R, H, _, hd = new.shape
        cap = max(self.capacity, self.step + 1, 2 * (0 if buf is None else buf.shape[2]))
        out = new.new_empty((R, H, cap, hd))
        if buf is not None:
            out[:, :, :self.step] = buf[:, :, :self.step]
        return out

    def reorder(self, parent_rows: torch.Tensor | None, users: torch.Tensor | None = None) -> None:
        """Keep the beams `parent_rows` (new row -> old row) and, if given, only the users `users`."""
        if parent_rows is not None and self.self_k[0] is not None:
            self.self_k = [self._gather(k, parent_rows) for k in self.self_k]
            self.self_v = [self._gather(v, parent_rows) for v in self.self_v]
        if parent_rows is not None and self.leaf_key is not None:
            self.leaf_key = self.leaf_key.index_select(0, parent_rows)
        if parent_rows is not None and self.prefix is not None:
            self.prefix = self.prefix.index_select(0, parent_rows)
        if users is not None and self.history is not None:
            (keys, recency, is_item), codes = self.history
            self.history = (keys.index_select(0, users), recency.index_select(0, users),
                            is_item.index_select(0, users)), codes.index_select(0, users)
        if users is not None and self.transition is not None:
            self.transition = tuple(t.index_select(0, users) for t in self.transition)
        if users is not None:
            self.cross_k = [k.index_select(0, users) for k in self.cross_k]
            self.cross_v = [v.index_select(0, users) for v in self.cross_v]
            self.lengths = self.lengths.index_select(0, users)

    def _gather(self, buf: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` of buf (R', H, capacity, hd), the unfilled positions too: one contiguous row copy is 3-7x
        faster on a CPU than copying only the filled positions, a strided view (5,120 rows of 2 x 3 x 32: 0.48 ->
        0.07 ms; 8 positions of which 1 filled: 0.49 -> 0.16 ms)."""
        return buf.index_select(0, rows)


def window_log_softmax(z: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """`log_softmax(z, -1)[:, lo:hi]` of z (R, V) -> (R, hi - lo), contiguous, without writing the (R, V)
    log-softmax: only the window's columns less each row's log-sum-exp."""
    return z[:, lo:hi] - torch.logsumexp(z, dim=-1, keepdim=True)


def _from_end(lengths: torch.Tensor, S: int) -> torch.Tensor:
    """Positions counted back from each row's last valid piece (0 = last, usually EOS): the most recent
    item sits at the same position whatever the history length. Padding gets position 0."""
    return (lengths[:, None] - 1 - torch.arange(S, device=lengths.device)).clamp(min=0)  # (B, S)


class Stack(nn.Module):
    """Positions + embedding LayerNorm + layers (BART's `encoder` / `decoder`)."""

    def __init__(self, cfg: ModelConfig, layer: type, n_layers: int):
        super().__init__()
        self.embed_positions = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.layernorm_embedding = nn.LayerNorm(cfg.d_model)
        self.layers = nn.ModuleList(layer(cfg) for _ in range(n_layers))


class GenRec(nn.Module):
    """The BART-style encoder-decoder of GenRec: token + position (+ user and item id) embeddings summed at
    the input; `encode` a history, `decode_step` / `decode_logprobs` one step of the search over item tokens,
    `logits` the teacher-forced logits that loss.py trains by masked item prediction. The optional leaf head
    and history / transition biases follow `cfg` (ModelConfig)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.user_embed = nn.Embedding(cfg.n_users + 1, cfg.d_model, padding_idx=0)
        self.item_embed = nn.Embedding(cfg.n_items + 1, cfg.d_model, padding_idx=0)
        self.encoder = Stack(cfg, EncoderLayer, cfg.encoder_layers)
        self.decoder = Stack(cfg, DecoderLayer, cfg.decoder_layers)
        self.register_buffer("final_logits_bias", torch.zeros(1, cfg.vocab_size))
        self.history = HistoryBias(cfg.d_model, cfg.max_positions) if cfg.history_bias else None
        self.transition = (TransitionBias(cfg.n_items, cfg.transition_context, cfg.transition_neighbors,
                                          clusters=cfg.leaf_head, reverse=cfg.transition_reverse)
                           if cfg.transition_bias else None)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.apply(self._init)
        if not cfg.item_id_embed:  # the table stays zero and out of training (config.py)
            nn.init.zeros_(self.item_embed.weight)
            self.item_embed.weight.requires_grad_(False)
        self.leaves: LeafHead | None = None  # cfg.leaf_head: set from the tokenizer by `attach_leaves`

    def attach_leaves(self, tokenizer) -> "GenRec":
        """With cfg.leaf_head, the leaves of the tokenizer's code table (derived data: not in the state dict)."""
        if self.cfg.leaf_head:  # a submodule: `.to(device)` moves its tables
            self.leaves = LeafHead.from_tokenizer(tokenizer).to(self.item_embed.weight.device)
        return self

    def _leaves(self) -> LeafHead | None:
        if self.cfg.leaf_head and self.leaves is None:
            raise ValueError("model.leaf_head: the model has no leaves; call model.attach_leaves(tokenizer) "
                             "(Recommender and Trainer do)")
        return self.leaves

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)  # BART's init_std
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()

    def _embed(self, stack: Stack, tokens: torch.Tensor, offset: int = 0, positions=None) -> torch.Tensor:
        """Token + position embeddings; positions (B, T) default to offset, offset + 1, ..."""
        last = offset + tokens.shape[1] if positions is None else int(positions.max()) + 1
        if last > self.cfg.max_positions:
            raise ValueError(f"input of {last} positions exceeds max_positions={self.cfg.max_positions}")
        pos = torch.arange(offset, offset + tokens.shape[1], device=tokens.device) if positions is None else positions
        return self.shared(tokens) * self.embed_scale + stack.embed_positions(pos)  # (B, T, C)

    def encode(self, tokens, user_ids, item_ids, mask, attn_mask=None, positions=None, packed: bool | None = None):
        """tokens/user_ids/item_ids (B, S) int64, mask (B, S) bool right-padded -> memory (B, S, C).

        attn_mask (B, 1, S, S) bool and positions (B, S) replace the padding/causal mask and the
        configured positions (prefix_batch.py packs every prefix of a sequence this way).
        packed (default: at inference with the padding mask only): the layers skip the padding
        (`EncoderLayer.packed`); the real pieces get the same memory, the padding gets zeros."""
        lengths = mask.sum(1)  # (B,)
        if positions is None and self.cfg.encoder_positions == "end":
            positions = _from_end(lengths, tokens.shape[1])
        causal = self.cfg.encoder_causal and attn_mask is None  # right padding: causal also hides the padding
        if packed is None:
            packed = not (self.training or causal or attn_mask is not None)
        if packed:
            return self._encode_packed(tokens, user_ids, item_ids, mask, lengths, positions)
        x = self._embed(self.encoder, tokens, positions=positions) + self.user_embed(user_ids) + self.item_embed(item_ids)
        x = F.dropout(self.encoder.layernorm_embedding(x), self.cfg.dropout, self.training)
        for layer in self.encoder.layers:
            x = layer(x, lengths, causal, attn_mask)
        return x

    def _encode_packed(self, tokens, user_ids, item_ids, mask, lengths, positions):
        """`encode` at inference over the real pieces only (EncoderLayer.packed); zeros at the padding."""
        B, S = tokens.shape
        rows = mask.reshape(-1).nonzero()[:, 0]  # (N,) real pieces of the (B * S) grid
        last = S if positions is None else int(positions.max()) + 1  # the same check as `_embed`
        if last > self.cfg.max_positions:
            raise ValueError(f"input of {last} positions exceeds max_positions={self.cfg.max_positions}")
        if positions is None:
            positions = torch.arange(S, device=tokens.device).expand(B, S)
        pos = positions.reshape(-1)[rows]  # (N,)
        tok = self.shared(tokens.reshape(-1)[rows])  # (N, C)
        tok = tok if self.embed_scale == 1.0 else tok * self.embed_scale
        x = tok + self.encoder.embed_positions(pos) + self.item_embed(item_ids.reshape(-1)[rows])
        users = user_ids.reshape(-1)[rows]
        if bool(users.any()):  # models served without user tokens pass none
            x = x + self.user_embed(users)
        x = self.encoder.layernorm_embedding(x)
        slots = None  # padded slot -> packed row (padding: 0), for the padded attention off the CPU
        if not _cpp_packed_attention(tokens):
            slots = torch.zeros(B * S, dtype=torch.long, device=tokens.device)
            slots[rows] = torch.arange(len(rows), device=tokens.device)
        for layer in self.encoder.layers:
            x = layer.packed(x, rows, slots, B, S, lengths)
        return _unpack(x, rows, B, S)

    def decode(self, decoder_tokens, memory, mask, self_mask=None, cross_mask=None, positions=None):
        """Teacher-forced decoder: decoder_tokens (B, T) -> logits (B, T, V). Optional masks (B, 1, T, T),
        (B, 1, T, S) and positions (B, T) let one row hold several independent targets."""
        return self.logits(self.decode_hidden(decoder_tokens, memory, mask, self_mask, cross_mask, positions),
                           decoder_tokens)

    def decode_hidden(self, decoder_tokens, memory, mask, self_mask=None, cross_mask=None, positions=None):
        """`decode` before the LM head: -> (B, T, C)."""
        x = F.dropout(self.decoder.layernorm_embedding(self._embed(self.decoder, decoder_tokens, positions=positions)),
                      self.cfg.dropout, self.training)
        for layer in self.decoder.layers:
            x = layer(x, memory, mask.sum(1), self_mask, cross_mask)
        return x

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.shared.weight) + self.final_logits_bias  # (..., V)

    def logits(self, hidden: torch.Tensor, decoder_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) of decoder states (B, T, C) fed decoder_tokens (B, T): the LM head,
        and with a leaf head the leaf softmax's logits at the last code step (leaf_head.py)."""
        out = self.lm_head(hidden)
        leaves = self._leaves()
        last = None if leaves is None else leaves.levels - 1
        if last is not None and hidden.shape[1] > last:
            key = leaves.keys(decoder_tokens[:, 1:last + 1])  # (B,) from the fed cluster tokens
            out[:, last] = leaves.vocab_logits(hidden[:, last], key, self.item_embed.weight)
        return out

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor, smoothing: float, ignore_index: int,
                  leaf_smoothing: float | None = None, item_aux: float = 0.0):
        """Cross-entropy of `logits(hidden, ...)` (B, T, V) against labels (B, T), without the (B, T, V) logits.
        With a leaf head the leaf softmax is smoothed by leaf_smoothing (None: smoothing), and item_aux > 0
        adds item_aux x the cross-entropy of a softmax over ALL items at the first step (`h_0 . e_item`, the
        one-token model's task on the leaf head's item vectors; smoothed by `smoothing`)."""
        leaves = self._leaves()
        if leaves is None:
            return linear_cross_entropy(hidden.flatten(0, 1), self.shared.weight, self.final_logits_bias[0],
                                        labels.flatten(), smoothing, ignore_index)
        last = leaves.levels - 1  # cluster steps through the LM head, the last through the leaf softmax
        head_labels = labels[:, :last].flatten()
        n_head = int((head_labels != ignore_index).sum())
        total = hidden.new_zeros(())
        if n_head:
            total = linear_cross_entropy(hidden[:, :last].flatten(0, 1), self.shared.weight,
                                         self.final_logits_bias[0], head_labels, smoothing, ignore_index) * n_head
        rows = (labels[:, last] != ignore_index).nonzero()[:, 0]  # (N,) targets that reach the last step
        leaf = leaves.loss_terms(hidden[rows, last], labels[rows, :last], labels[rows, last], self.item_embed.weight,
                                 smoothing if leaf_smoothing is None else leaf_smoothing,
                                 sparse=self.item_embed.sparse)  # (N,)
        n = n_head + len(rows)
        loss = (total + leaf.sum()) / n if n else hidden.new_tensor(float("nan"))
        if item_aux and len(rows):
            local = labels[rows, last] - leaves.first[-1]  # (N,) leaf-local index
            items = leaves.items[leaves.keys(labels[rows, :last]), local] - 1  # (N,) item index
            loss = loss + item_aux * linear_cross_entropy(hidden[rows, 0], self.item_embed.weight[1:], None, items,
                                                          smoothing, ignore_index)
        return loss

    def history_loss(self, tokens, user_ids, item_ids, mask, decoder_tokens, labels: torch.Tensor, smoothing: float,
                     ignore_index: int, first_item: int = 0, transition: tuple | None = None) -> torch.Tensor:
        """With cfg.history_bias and/or cfg.transition_bias: the cross-entropy of the first step's logits plus
        the biases' offsets (history_bias.py, transition_bias.py) against labels (B, 1), fused as `head_loss`
        (the (B, V) logits never whole). Item i is token first_item + i; transition: (context (B, R) item
        indices, own counts (B, R, M) to subtract) of `TransitionBias.pairs`."""
        memory = self.encode(tokens, user_ids, item_ids, mask)  # (B, S, C)
        hidden = self.decode_hidden(decoder_tokens, memory, mask)[:, 0]  # (B, C)
        tok, val = self.bias_offsets(hidden, memory, tokens, item_ids, mask, first_item, transition)
        return linear_cross_entropy(hidden, self.shared.weight, self.final_logits_bias[0], labels[:, 0], smoothing,
                                    ignore_index, offsets=(tok.masked_fill(tok < 0, self.cfg.pad_id), val))

    def bias_offsets(self, hidden, memory, tokens, item_ids, mask, first_item: int,
                     transition: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The biases' sparse offsets on the first step's logits in training (`history_loss`, and the sampled
        softmax's per-row classes): hidden (B, C), memory (B, S, C), the encoder input (B, S) -> (tokens (B, N),
        -1 where there is no item; offsets (B, N), 0 there)."""
        tok, val = [], []
        if self.history is not None:
            tok.append(tokens.masked_fill(~((item_ids > 0) & mask), -1))  # the history items' own tokens
            val.append(self.history.offsets(hidden, memory, item_ids, mask))  # (B, S)
        if self.transition is not None:
            items, values = self.transition.pairs(*transition)  # (B, R * M)
            tok.append(torch.where(items >= 0, first_item + items, -1))
            val.append(values)
        return torch.cat(tok, 1), torch.cat(val, 1)

    def codes_history_loss(self, tokens, user_ids, item_ids, mask, decoder_tokens, labels: torch.Tensor,
                           smoothing: float, ignore_index: int, leaf_smoothing: float | None = None,
                           transition: tuple | None = None) -> torch.Tensor:
        """With a leaf head and cfg.history_bias and/or cfg.transition_bias: the mean cross-entropy of every code
        step (`head_loss`), each step's logits plus the biases' offsets on the items whose code starts with the
        target's tokens so far (`history_bias.code_offsets`); fused, the (B, V) logits never whole.
        transition: as in `history_loss`."""
        leaves = self._leaves()
        memory = self.encode(tokens, user_ids, item_ids, mask)  # (B, S, C)
        hidden = self.decode_hidden(decoder_tokens, memory, mask)  # (B, L, C)
        values, codes = [], []
        if self.history is not None:
            values.append(self.history.score(hidden, self.history.state(memory, item_ids, mask)))  # (B, L, S)
            # (B, S, L) tokens of each position's item
            codes.append(table_rows(leaves.codes, item_ids.masked_fill(~mask, 0)))
        if self.transition is not None:
            items, t_values = self.transition.code_pairs(*transition)  # (B, N), (B, 2, N): cluster, leaf step
            leaf_step = (torch.arange(hidden.shape[1], device=items.device) >= leaves.levels - 1).long()
            values.append(t_values[:, leaf_step])  # (B, L, N)
            codes.append(table_rows(leaves.codes, items + 1))  # (B, N, L)
        values, codes = torch.cat(values, -1), torch.cat(codes, 1)
        last, total, n = leaves.levels - 1, hidden.new_zeros(()), 0
        for t in range(leaves.levels):
            rows = (labels[:, t] != ignore_index).nonzero()[:, 0]  # (N,)
            if not len(rows):
                continue
            tok, val = code_offsets(values[rows, t:t + 1], codes[rows], labels[rows, None, :t])  # 2 x (N, 1, S)
            if t < last:
                total = total + len(rows) * linear_cross_entropy(
                    hidden[rows, t], self.shared.weight, self.final_logits_bias[0], labels[rows, t], smoothing,
                    ignore_index, offsets=(tok[:, 0], val[:, 0]))
            else:
                total = total + leaves.loss_terms(hidden[rows, t], labels[rows, :last], labels[rows, t],
                                                  self.item_embed.weight,
                                                  smoothing if leaf_smoothing is None else leaf_smoothing,
                                                  offsets=(tok[:, 0], val[:, 0]), sparse=self.item_embed.sparse).sum()
            n += len(rows)
        return total / n if n else hidden.new_tensor(float("nan"))

    def history_offsets(self, heads: list, memory: torch.Tensor, item_ids: torch.Tensor,
                        mask: torch.Tensor) -> list:
        """The history bias of `first_heads(memory, mask)`'s states: -> [(U, S)] (zeros without the bias)."""
        if self.history is None:
            return [torch.zeros(item_ids.shape, dtype=torch.float32, device=item_ids.device)]
        return [self.history.offsets(heads[0].x, memory, item_ids, mask).float()]

    def bias_parts(self, heads: list, memory: torch.Tensor, item_ids: torch.Tensor, mask: torch.Tensor) -> dict:
        """Each bias's one-step logit offsets: {"history" / "transition": (items (U, N) item indices, -1 = none;
        offsets (U, N) float32)} for the biases the model has."""
        parts = {}
        if self.history is not None:
            parts["history"] = (history_items(item_ids, mask), self.history_offsets(heads, memory, item_ids, mask)[0])
        if self.transition is not None:
            t_items, t_values = self.transition.pairs(context_items(item_ids, mask, self.transition.context))
            parts["transition"] = (t_items, t_values.float())
        return parts

    def bias_pairs(self, heads: list, memory: torch.Tensor, item_ids: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, list] | None:
        """`bias_parts` side by side, as `item_topk(history=...)` takes them: (items (U, N) item indices,
        -1 = none; [offsets (U, N)]), or None without either bias."""
        parts = list(self.bias_parts(heads, memory, item_ids, mask).values())
        return (torch.cat([p[0] for p in parts], 1), [torch.cat([p[1] for p in parts], 1)]) if parts else None

    def forward(self, tokens, user_ids, item_ids, mask, decoder_tokens, attn_mask=None, positions=None,
                decoder_self_mask=None, cross_mask=None, decoder_positions=None):
        """-> logits (B, T, V). The optional masks and positions come from `prefix_batch.pad_packed`."""
        return self.logits(self.hidden(tokens, user_ids, item_ids, mask, decoder_tokens, attn_mask, positions,
                                       decoder_self_mask, cross_mask, decoder_positions), decoder_tokens)

    def hidden(self, tokens, user_ids, item_ids, mask, decoder_tokens, attn_mask=None, positions=None,
               decoder_self_mask=None, cross_mask=None, decoder_positions=None):
        """`forward` before the LM head: -> decoder states (B, T, C), for `loss.linear_cross_entropy`."""
        memory = self.encode(tokens, user_ids, item_ids, mask, attn_mask, positions)
        return self.decode_hidden(decoder_tokens, memory, mask, decoder_self_mask, cross_mask, decoder_positions)

    def start_decoding(self, memory: torch.Tensor, mask: torch.Tensor,
                       item_ids: torch.Tensor | None = None) -> DecoderCache:
        """Cross-attention K/V once per user: memory (U, S, C), mask (U, S); item_ids (U, S), needed by a
        history bias over codes (its offsets at every step: `DecoderCache.history`)."""
        B, S, C = memory.shape
        rows = mask.reshape(-1).nonzero()[:, 0]  # (N,) real pieces: the padding is never attended
        real = memory.reshape(B * S, C)[rows]  # (N, C)
        kv = [tuple(_heads(t, self.cfg.n_heads) for t in _unpack(
            _fused_linear(real, layer.encoder_attn.k_proj, layer.encoder_attn.v_proj), rows, B, S).chunk(2, dim=-1))
              for layer in self.decoder.layers]  # per layer 2 x (B, H, S, hd)
        n = len(kv)
        cache = DecoderCache([k for k, _ in kv], [v for _, v in kv], mask.sum(1), [None] * n, [None] * n)
        if (self.history is not None or self.transition is not None) and self.cfg.leaf_head:
            if item_ids is None:
                raise ValueError("start_decoding: a model with model.history_bias or model.transition_bias over "
                                 "codes needs the item_ids")
            codes = self._leaves().codes  # (n_items + 1, L) by item id, row 0 (no item) all -1
            if self.history is not None:
                cache.history = (self.history.state(memory, item_ids, mask),
                                 table_rows(codes, item_ids.masked_fill(~mask, 0)))
            if self.transition is not None:
                items, values = self.transition.code_pairs(context_items(item_ids, mask, self.transition.context))
                # (U, N, L), (U, 2, N): cluster, leaf step
                cache.transition = (table_rows(codes, items + 1), values.float())
        return cache

    def decode_step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """tokens (R,) = one new token per beam (R = users x beams, user-major) -> logits (R, V)."""
        hidden, at_leaf = self._leaf_aware_step(tokens, cache)  # (R, C)
        offsets = self._step_offsets(tokens, hidden, cache)
        if at_leaf:
            z = self.leaves.vocab_logits(hidden, cache.leaf_key, self.item_embed.weight)  # (R, V)
        else:
            z = self.lm_head(hidden)  # (R, V)
        return z if offsets is None else add_offsets(z, offsets)

    def decode_logprobs(self, tokens: torch.Tensor, cache: DecoderCache, lo: int = 0,
                        hi: int | None = None) -> torch.Tensor:
        """`log_softmax(decode_step(tokens, cache))[:, lo:hi]`: tokens (R,) -> float32 (R, hi - lo), the
        columns of tokens lo..hi-1 (a search step's `Trie.window`). The leaf head's step computes only its
        leaves' columns, never an (R, V) tensor."""
        hidden, at_leaf = self._leaf_aware_step(tokens, cache)  # (R, C)
        offsets = self._step_offsets(tokens, hidden, cache)
        if at_leaf:
            return self.leaves.window_logprobs(hidden, cache.leaf_key, self.item_embed.weight, lo, hi, offsets)
        z = self.lm_head(hidden).float()  # (R, V)
        return window_log_softmax(z if offsets is None else add_offsets(z, offsets), lo, hi)

    def _step_offsets(self, tokens: torch.Tensor, hidden: torch.Tensor, cache: DecoderCache) -> tuple | None:
        """The history and transition biases over codes at the step just run (`cache.step - 1`), whose states
        are hidden (R, C) after feeding tokens (R,), in `add_offsets`' forms: per user, tokens (U, 1, N) and
        float32 values (U, W, N), R = U x W; on a CPU after the first step, only the pairs whose item starts with the
        row's tokens so far, (rows (K,), tokens (K,), values (K,)) (a row's leaf holds a few of its user's ~N; on a
        GPU counting them is one more host sync a step, untried there). None without the biases."""
        if cache.history is None and cache.transition is None:
            return None
        t = cache.step - 1
        # the token fed at step t > 0 is the row's code token of column t - 1 (the rows' parents: `reorder`)
        cache.prefix = tokens.new_zeros((len(tokens), 0)) if t == 0 else torch.cat([cache.prefix, tokens[:, None]], 1)
        U = (cache.history[1] if cache.history is not None else cache.transition[0]).shape[0]
        W = hidden.shape[0] // U  # rows: U users x W beams, user-major
        if t > 0 and hidden.device.type == "cpu":
            return self._matched_offsets(hidden, cache, t, U, W)
        return self._user_offsets(hidden, cache, t, U, W)

    def _user_offsets(self, hidden: torch.Tensor, cache: DecoderCache, t: int, U: int, W: int) -> tuple:
        """`_step_offsets` per user: tokens (U, 1, N), float32 values (U, W, N) (`code_offsets`)."""
        values, codes = [], []
        if cache.history is not None:
            state, h_codes = cache.history
            values.append(self.history.score(hidden.view(U, W, -1), state))  # (U, W, S)
            codes.append(h_codes)
        if cache.transition is not None:
            t_codes, t_values = cache.transition
            leaf_step = int(t >= self._leaves().levels - 1)
            values.append(t_values[:, leaf_step, None].expand(U, W, -1))  # (U, W, N): the same for every beam
            codes.append(t_codes)
        tok, val = code_offsets(torch.cat(values, -1), torch.cat(codes, 1), cache.prefix.view(U, W, t))
        return tok, val.float()

    def _matched_offsets(self, hidden: torch.Tensor, cache: DecoderCache, t: int, U: int, W: int) -> tuple:
        """`_step_offsets` at step t > 0 as (rows, tokens, values) of the K matching pairs: the values `code_offsets`
        leaves non-zero, the history's scored at those pairs only (`HistoryBias.score_at`)."""
        codes = torch.cat(([cache.history[1]] if cache.history is not None else []) +
                          ([cache.transition[0]] if cache.transition is not None else []), 1)  # (U, N, L)
        own = codes[:, :, t]  # (U, N) each pair's token at this step
        match = (codes[:, None, :, :t] == cache.prefix.view(U, W, 1, t)).all(-1) & (own >= 0)[:, None]  # (U, W, N)
        users, beams, pairs = match.nonzero(as_tuple=True)  # (K,) each
        rows = users * W + beams
        values = hidden.new_zeros(len(rows), dtype=torch.float32)
        S = 0
        if cache.history is not None:
            state, h_codes = cache.history
            S = h_codes.shape[1]
            at = (pairs < S).nonzero()[:, 0]
            values[at] = self.history.score_at(hidden[rows[at]], state, users[at], pairs[at]).float()
        if cache.transition is not None:
            t_values = cache.transition[1]  # (U, 2, N_t): cluster step, leaf step
            leaf_step = int(t >= self._leaves().levels - 1)
            at = (pairs >= S).nonzero()[:, 0]
            values[at] = t_values[users[at], leaf_step, pairs[at] - S].float()
        return rows, own[users, pairs], values

    def _leaf_aware_step(self, tokens: torch.Tensor, cache: DecoderCache) -> tuple[torch.Tensor, bool]:
        """One decoder step -> states (R, C) and whether they feed the leaf head (else the LM head); with a
        leaf head, keeps the rows' leaf keys (`DecoderCache.leaf_key`) up to date."""
        leaves, t = self._leaves(), cache.step
        if leaves is not None and 1 <= t < leaves.levels:  # tokens of cluster column t - 1: the rows' leaves
            cache.leaf_key = leaves.step_key(cache.leaf_key if t > 1 else None, tokens, t - 1)
        return self.decode_step_hidden(tokens, cache), leaves is not None and t == leaves.levels - 1

    def decode_step_hidden(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """`decode_step` before the LM head: tokens (R,) -> decoder states (R, C)."""
        if cache.native_step is not None:
            return cache.native_step(self, tokens, cache)
        x = self.decoder.layernorm_embedding(self._embed(self.decoder, tokens[:, None], cache.step))  # (R, 1, C)
        for i, layer in enumerate(self.decoder.layers):
            x = layer.step(x, cache, i)
        cache.step += 1
        return x[:, 0]  # (R, C)

    def first_heads(self, memory: torch.Tensor, mask: torch.Tensor) -> list:
        """The first decoder step from BOS as `item_topk.Head`s, without a cache (`DecoderLayer.first_step`):
        memory (U, S, C), mask (U, S) -> [Head((U, C) states, LM head)]."""
        bos = torch.full((1, 1), self.cfg.bos_id, dtype=torch.long, device=memory.device)
        x = self.decoder.layernorm_embedding(self._embed(self.decoder, bos))  # (1, 1, C): the same for every user
        lengths = mask.sum(1)
        for layer in self.decoder.layers:
            x = layer.first_step(x, memory, lengths)  # (U, 1, C) from the first cross-attention on
        return [Head(x.expand(memory.shape[0], 1, -1)[:, 0], self.shared.weight, self.final_logits_bias[0])]
