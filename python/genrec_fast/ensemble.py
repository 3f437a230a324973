"""An ensemble of GenRec models that share one tokenizer: the decoder step averages their log-probabilities.

Members trained with different seeds on the same data and tokenizer make different mistakes; the
beam search ranks items by the mean of the members' token log-probabilities (a product of experts,
renormalised per step by `beam_decode`'s log_softmax). For items of one token without EOS the score
of an item is the members' mean log-probability of it, up to a constant per user.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .model import GenRec, window_log_softmax

# fields every member must share: they fix the input pieces and how the output is read
SHARED_FIELDS = ("vocab_size", "pad_id", "bos_id", "eos_id", "item_eos", "n_users", "n_items", "max_positions")


@dataclass
class EnsembleCache:
    """One `DecoderCache` per member, reordered together."""

    caches: list

    @property
    def capacity(self) -> int:
        return self.caches[0].capacity

    @capacity.setter
    def capacity(self, n: int) -> None:
        for c in self.caches:
            c.capacity = n

    @property
    def lengths(self) -> torch.Tensor:
        return self.caches[0].lengths

    def reorder(self, parent_rows: torch.Tensor | None, users: torch.Tensor | None = None) -> None:
        for c in self.caches:
            c.reorder(parent_rows, users)


class Ensemble(nn.Module):
    """Members with the same vocabulary and ids; `decode_step` returns the mean of their log-softmax."""

    def __init__(self, members: Sequence[GenRec]):
        super().__init__()
        if not members:
            raise ValueError("members: expected at least one model, got none")
        for i, m in enumerate(members[1:], 1):
            for f in SHARED_FIELDS:
                if getattr(m.cfg, f) != getattr(members[0].cfg, f):
                    raise ValueError(f"members: model {i} has {f}={getattr(m.cfg, f)!r}, model 0 has "
                                     f"{getattr(members[0].cfg, f)!r} (members must share tokenizer and data)")
        self.members = nn.ModuleList(members)

    @property
    def cfg(self):
        return self.members[0].cfg

    def encode(self, tokens, user_ids, item_ids, mask) -> list:
        """(B, S) inputs -> one memory (B, S, C_m) per member."""
        return [m.encode(tokens, user_ids, item_ids, mask) for m in self.members]

    def start_decoding(self, memory: list, mask: torch.Tensor, item_ids: torch.Tensor | None = None) -> EnsembleCache:
        return EnsembleCache([m.start_decoding(x, mask, item_ids) for m, x in zip(self.members, memory)])

    def first_heads(self, memory: list, mask: torch.Tensor) -> list:
        """Every member's first decoder step from BOS as `item_topk.Head`s (no cache)."""
        return [h for m, x in zip(self.members, memory) for h in m.first_heads(x, mask)]

    @property
    def history(self):
        """Truthy when any member has a history bias (`GenRec.history`)."""
        return any(m.history is not None for m in self.members) or None

    def history_offsets(self, heads: list, memory: list, item_ids: torch.Tensor, mask: torch.Tensor) -> list:
        """Each member's history bias (zeros for members without one): -> [(U, S)] per member."""
        return [o for i, (m, x) in enumerate(zip(self.members, memory))
                for o in m.history_offsets(heads[i:i + 1], x, item_ids, mask)]

    @property
    def transition(self):
        """Truthy when any member has a transition bias (`GenRec.transition`)."""
        return any(m.transition is not None for m in self.members) or None

    def bias_pairs(self, heads: list, memory: list, item_ids: torch.Tensor, mask: torch.Tensor):
        """Every member's `GenRec.bias_pairs` side by side: items (U, N_1 + N_2 + ...) and one (U, N) offset
        tensor per member, zero on the other members' items; None when no member has a bias."""
        parts = [m.bias_pairs(heads[i:i + 1], x, item_ids, mask) for i, (m, x) in enumerate(zip(self.members, memory))]
        if all(p is None for p in parts):
            return None
        U = item_ids.shape[0]
        items = [p[0] if p is not None else item_ids.new_full((U, 0), -1) for p in parts]
        offsets = []
        for i, p in enumerate(parts):
            blocks = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in items]
            if p is not None:
                blocks[i] = p[1][0]
            offsets.append(torch.cat(blocks, 1))
        return torch.cat(items, 1), offsets

    def decode_step(self, tokens: torch.Tensor, cache: EnsembleCache) -> torch.Tensor:
        """tokens (R,) -> mean member log-probabilities (R, V)."""
        out = None
        for m, c in zip(self.members, cache.caches):
            lp = F.log_softmax(m.decode_step(tokens, c).float(), dim=-1)  # (R, V)
            out = lp if out is None else out.add_(lp)
        return out / len(self.members)

    def decode_logprobs(self, tokens: torch.Tensor, cache: EnsembleCache, lo: int = 0,
                        hi: int | None = None) -> torch.Tensor:
        """`log_softmax(decode_step(tokens, cache))[:, lo:hi]` -> float32 (R, hi - lo): the renormalised mean
        needs every member's whole vocabulary, so only the host copy shrinks to the window."""
        return window_log_softmax(self.decode_step(tokens, cache), lo, hi)


def check_same_files(paths: Sequence[str | Path], names: Sequence[str]) -> None:
    """Members must come from the same tokenizer and catalog: the files `names` are byte-identical."""
    first = Path(paths[0])
    for p in paths[1:]:
        for name in names:
            if (Path(p) / name).read_bytes() != (first / name).read_bytes():
                raise ValueError(f"checkpoints: {p} has a different {name} than {first} "
                                 f"(ensemble members must be trained on the same data with the same tokenizer)")
