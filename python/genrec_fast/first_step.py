"""The model at inference on a CPU as C++ calls instead of PyTorch ops (csrc/first_step.h, csrc/decoder_step.h).

`first_step`: what `item_decode` needs of a one-token model before its top-k (each user's first decoder state and
the history / transition offsets: `GenRec.encode`, `first_heads` and `bias_pairs`) in one call. In PyTorch that is
~900 ops (views included), and for a small batch their dispatch, not their arithmetic, is the cost: most of a 2 ms
batch-1 call at Beauty's size. `encode`: the same call stopping after the encoder, and `decoder_step`: one step of
every beam row through the decoder layers, for the models the trie search decodes (`beam_decode`).

The parameters are read in place: their pointers are collected on every call (once per decode for its steps), so
training steps, `calibrate`'s scaling, `.to()` or a replaced module are always seen, never a stale copy. `chosen`
picks the C++ path for batches of up to `USERS_PER_THREAD` users a thread, where it gains. `first_step_reference` and `GenRec.decode_step_hidden`'s
own ops are the definitions; tests hold the C++ paths to them.
"""
from __future__ import annotations

import weakref

import torch

from .model import GenRec
from .native import core

# the order of `_sizes`, as csrc/bindings.cpp's `first_step_model` reads them
_SIZES = ("dim", "heads", "ffn", "max_positions", "vocab", "n_users", "n_items", "bos", "encoder_layers",
          "decoder_layers", "positions_from_end", "recency_len", "width", "neighbors", "context")


USERS_PER_THREAD = 512  # beyond this many users a thread PyTorch's ops (their GEMMs) are as fast (1.0-1.1x the C++ at
# 512 on one thread, 0.8-1.0x at 1,024: benchmarks/README.md)


def chosen(model, enc: dict, encoder_only: bool = False) -> bool:
    """Whether decoding takes the C++ path (`first_step`, or with encoder_only `encode`): it can run, and the batch
    is small enough to gain (on one thread, 2026-12-07: the first step 1.2-1.4x PyTorch's ops at 128-256 users,
    1.1x at 512; the encoder 1.0-1.1x at 256-512, the decoder step 1.5x; the C++ splits the users over the threads)."""
    why = unusable_encoder(model, enc) if encoder_only else unusable(model, enc)
    return why is None and enc["tokens"].shape[0] <= USERS_PER_THREAD * torch.get_num_threads()


def unusable_encoder(model, enc: dict) -> str | None:
    """Why `encode` cannot run this model on this batch, or None when it can."""
    if not isinstance(model, GenRec):
        return f"needs one GenRec model, got {type(model).__name__}"
    if model.training:
        return "the model is in training mode"
    if model.cfg.encoder_causal:
        return "needs a bidirectional encoder"
    if model.shared.weight.device.type != "cpu" or model.shared.weight.dtype != torch.float32:
        return "needs float32 weights on the CPU"
    if enc["tokens"].device.type != "cpu":
        return "needs the batch on the CPU"
    return None


def unusable(model, enc: dict) -> str | None:
    """Why `first_step` cannot run this model on this batch, or None when it can."""
    why = unusable_encoder(model, enc)
    if why is None and (model.cfg.leaf_head or model.cfg.item_eos):
        return "needs one-token items without EOS"
    return why


def _paths(model: GenRec) -> list:
    """Dotted names of the parameters and buffers, in the order csrc/bindings.cpp's `first_step_model` reads them
    (None: a bias the model has not)."""
    lin = lambda p: [p + ".weight", p + ".bias"]  # noqa: E731 (nn.Linear and nn.LayerNorm alike)
    out = ["shared.weight", "user_embed.weight", "item_embed.weight", "encoder.embed_positions.weight",
           *lin("encoder.layernorm_embedding"), "decoder.embed_positions.weight", *lin("decoder.layernorm_embedding")]
    for i in range(len(model.encoder.layers)):
        p = f"encoder.layers.{i}."
        out += [*lin(p + "self_attn.q_proj"), *lin(p + "self_attn.k_proj"), *lin(p + "self_attn.v_proj"),
                *lin(p + "self_attn.out_proj"), *lin(p + "self_attn_layer_norm"), *lin(p + "ffn.fc1"),
                *lin(p + "ffn.fc2"), *lin(p + "final_layer_norm")]
    for i in range(len(model.decoder.layers)):
        p = f"decoder.layers.{i}."
        out += [*lin(p + "self_attn.q_proj"), *lin(p + "self_attn.k_proj"), *lin(p + "self_attn.v_proj"),
                *lin(p + "self_attn.out_proj"), *lin(p + "self_attn_layer_norm"),
                *lin(p + "encoder_attn.q_proj"), *lin(p + "encoder_attn.k_proj"), *lin(p + "encoder_attn.v_proj"),
                *lin(p + "encoder_attn.out_proj"), *lin(p + "encoder_attn_layer_norm"), *lin(p + "ffn.fc1"),
                *lin(p + "ffn.fc2"), *lin(p + "final_layer_norm")]
    out += [None] * 5 if model.history is None else [*lin("history.query"), *lin("history.key"), "history.recency"]
    t = model.transition
    out += [None] * 4 if t is None else ["transition.items", "transition.counts", "transition.weight",
                                         None if t.reverse_weight is None else "transition.reverse_weight"]
    return out


class _Slots:
    """Where each tensor of `_paths` lives: (the owning module's parameter or buffer dict, name), read on every
    call, and every module on the way, checked by identity on every call (`stale`). A model trained, calibrated,
    moved or with a module replaced is so always seen as it is now, at ~10 us a call instead of the ~170 us of
    walking nn.Module attributes."""

    def __init__(self, model: GenRec):
        hops, self.leaves = {}, []
        for name in ("history", "transition", "encoder", "decoder"):  # present or None: a replacement shows
            hops[(id(model), name)] = (model._modules, name, model._modules.get(name))
        for path in _paths(model):
            if path is None:
                self.leaves.append(None)
                continue
            *mods, leaf = path.split(".")
            m = model
            for name in mods:
                child = m._modules[name]
                hops[(id(m), name)] = (m._modules, name, child)
                m = child
            self.leaves.append((m._parameters if leaf in m._parameters else m._buffers, leaf))
        self.hops = list(hops.values())
        self.checked = None  # the (pointers, table sizes) last checked by `_check`

    def stale(self) -> bool:
        return any(d.get(n) is not c for d, n, c in self.hops)

    def tensors(self) -> list:
        return [None if slot is None else slot[0].get(slot[1]) for slot in self.leaves]


_slots = weakref.WeakKeyDictionary()  # model -> _Slots


def _sizes(model: GenRec, tensors: list) -> list:
    cfg, h, t = model.cfg, model.history, model.transition
    return [cfg.d_model, cfg.n_heads, cfg.ffn_dim, cfg.max_positions, tensors[0].shape[0], tensors[1].shape[0] - 1,
            tensors[2].shape[0] - 1, cfg.bos_id, cfg.encoder_layers, cfg.decoder_layers,
            int(cfg.encoder_positions == "end"), 0 if h is None else len(h.recency),
            0 if t is None else t.items.shape[1], 0 if t is None else t.neighbors, 0 if t is None else t.context]


def _shape(path: str, sizes: list) -> tuple:
    """The shape `first_step` reads of a tensor (None for a dimension it takes from the tensor)."""
    C, F, n_items, width, context = sizes[0], sizes[2], sizes[6], sizes[12], sizes[14]
    if path.endswith("embed_positions.weight"):
        return (sizes[3], C)
    if path in ("shared.weight", "user_embed.weight", "item_embed.weight"):
        return (None, C)
    if path in ("transition.items", "transition.counts"):
        return (n_items + 1, width)
    if path.startswith("transition."):
        return (context,)
    if path == "history.recency":
        return (None,)
    if path.endswith("fc1.weight"):
        return (F, C)
    if path.endswith("fc2.weight"):
        return (C, F)
    if path.endswith("fc1.bias"):
        return (F,)
    return (C, C) if path.endswith("proj.weight") or path.startswith("history.") and path.endswith("weight") else (C,)


def _check(model: GenRec, paths: list, tensors: list, sizes: list) -> None:
    """Every tensor contiguous on the CPU in its dtype, of the shape the sizes give it: the C++ reads no further."""
    if len(model.encoder.layers) != sizes[8] or len(model.decoder.layers) != sizes[9]:
        raise ValueError("first_step: the model's layer counts differ from its config")
    for path, x in zip(paths, tensors):
        if path is None:
            continue
        want = torch.int32 if path == "transition.items" else torch.float32
        if x is None or x.device.type != "cpu" or x.dtype != want or not x.is_contiguous():
            raise ValueError(f"first_step: {path} must be a contiguous {want} tensor on the CPU")
        shape = _shape(path, sizes)
        if len(shape) != x.dim() or any(e is not None and e != n for e, n in zip(shape, x.shape)):
            raise ValueError(f"first_step: {path} has shape {tuple(x.shape)}, expected {shape} (None: any)")


def _pointers(model: GenRec) -> tuple[list, list]:
    """-> the sizes and the pointer table of the model as it is now (`_Slots`; checked when either changes)."""
    slots = _slots.get(model)
    if slots is None or slots.stale():
        slots = _slots[model] = _Slots(model)
    tensors = slots.tensors()
    sizes = _sizes(model, tensors)
    ptrs = [0 if x is None else x.data_ptr() for x in tensors]
    key = (ptrs, sizes)
    if slots.checked != key:
        _check(model, _paths(model), tensors, sizes)
        slots.checked = key
    return sizes, ptrs


def first_step(model: GenRec, enc: dict, threads: int | None = None) -> tuple[torch.Tensor, tuple | None]:
    """enc: padded encoder batch (tokens, user_ids, item_ids (U, S) int64, mask (U, S) bool, right-padded) ->
    the first decoder states (U, C) float32 (`first_heads(...)[0].x`) and the bias pairs as `bias_pairs` returns
    them (items (U, P) int64, -1 = none; [offsets (U, P) float32]), or None for a model without biases."""
    why = unusable(model, enc)
    if why:
        raise ValueError(f"first_step: {why}")
    _, heads, pairs = _run(model, enc, False, True, threads)
    return heads, pairs


def encode(model: GenRec, enc: dict, threads: int | None = None,
           table: tuple[list, list] | None = None) -> torch.Tensor:
    """`model.encode` of a padded batch at inference, as one C++ call (any item form): -> memory (U, S, C) float32,
    zeros at the padding. table: `pointers` of this model read earlier in the same decode (else read now)."""
    why = unusable_encoder(model, enc)
    if why:
        raise ValueError(f"encode: {why}")
    return _run(model, enc, True, False, threads, table)[0]


def pointers(model: GenRec) -> tuple[list, list]:
    """The model's sizes and weight pointers as the C++ calls read them, checked (ValueError on a bad tensor). A
    decode reads them once (`decoder_step`'s `table`): its weights do not change between its steps."""
    return _pointers(model)


def decoder_step(model: GenRec, tokens: torch.Tensor, cache, threads: int | None = None,
                 table: tuple[list, list] | None = None) -> torch.Tensor:
    """`model.decode_step_hidden(tokens, cache)` as one C++ call (csrc/decoder_step.h): tokens (R,) one new token
    per beam row (R = users x width, user-major) -> the decoder states (R, C); writes the rows' keys and values at
    slot `cache.step` and advances it. The cache's buffers grow as the PyTorch step grows them. table: `pointers`
    of this model read earlier in the same decode (else read now)."""
    C, H, t = model.cfg.d_model, model.cfg.n_heads, cache.step
    R, U = tokens.shape[0], cache.lengths.shape[0]
    for i in range(len(model.decoder.layers)):
        if cache.self_k[i] is None or cache.self_k[i].shape[2] <= t:
            new = torch.empty(R, H, 1, C // H)
            cache.self_k[i], cache.self_v[i] = cache._grown(cache.self_k[i], new), cache._grown(cache.self_v[i], new)
        cache.cross_k[i], cache.cross_v[i] = cache.cross_k[i].contiguous(), cache.cross_v[i].contiguous()
    S = cache.cross_k[0].shape[2]
    buffers = cache.self_k + cache.self_v + cache.cross_k + cache.cross_v
    for b, rows in zip(buffers, [R] * (2 * len(cache.self_k)) + [U] * (2 * len(cache.cross_k))):
        if b.dtype != torch.float32 or b.device.type != "cpu" or not b.is_contiguous() or b.shape[0] != rows:
            raise ValueError(f"decoder_step: cache buffers must be contiguous float32 on the CPU with {rows} rows, got "
                             f"{tuple(b.shape)} {b.dtype} on {b.device}")
    lengths, tokens = cache.lengths.long().contiguous(), tokens.long().contiguous()
    hidden = torch.empty(R, C)
    sizes, ptrs = _pointers(model) if table is None else table
    core().decoder_step(sizes, [model.embed_scale, model.decoder.layernorm_embedding.eps], ptrs, tokens.data_ptr(), R,
                        U, t, cache.self_k[0].shape[2], S, lengths.data_ptr(), [k.data_ptr() for k in cache.self_k],
                        [v.data_ptr() for v in cache.self_v], [k.data_ptr() for k in cache.cross_k],
                        [v.data_ptr() for v in cache.cross_v], hidden.data_ptr(),
                        torch.get_num_threads() if threads is None else threads)
    cache.step += 1
    return hidden


def _run(model: GenRec, enc: dict, memory: bool, first: bool, threads: int | None, table: tuple | None = None):
    tokens, users, items = (enc[k].contiguous() for k in ("tokens", "user_ids", "item_ids"))
    mask = enc["mask"].contiguous()
    if mask.dtype != torch.bool or tokens.dtype != torch.long or tokens.shape != mask.shape:
        raise ValueError("enc: expected int64 ids and a bool mask of one shape (U, S)")
    U, S = tokens.shape
    sizes, ptrs = _pointers(model) if table is None else table
    P = (S if model.history is not None else 0) + sizes[12] * sizes[14] if first else 0
    mem = torch.empty(U, S, model.cfg.d_model) if memory else None
    heads = torch.empty(U, model.cfg.d_model) if first else None
    pair_items = torch.empty(U, P, dtype=torch.long)
    pair_offsets = torch.empty(U, P)
    ln = model.encoder.layernorm_embedding
    core().first_step(sizes, [model.embed_scale, ln.eps], ptrs, tokens.data_ptr(), users.data_ptr(),
                      items.data_ptr(), mask.data_ptr(), U, S, 0 if mem is None else mem.data_ptr(),
                      0 if heads is None else heads.data_ptr(), pair_items.data_ptr(), pair_offsets.data_ptr(),
                      torch.get_num_threads() if threads is None else threads)
    return mem, heads, (pair_items, [pair_offsets]) if P else None


@torch.inference_mode()
def first_step_reference(model: GenRec, enc: dict) -> tuple[torch.Tensor, tuple | None]:
    """The PyTorch ops `first_step` replaces (item_decode's path before its top-k)."""
    memory = model.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
    heads = model.first_heads(memory, enc["mask"])
    return heads[0].x.contiguous(), model.bias_pairs(heads, memory, enc["item_ids"], enc["mask"])
