"""GenRec text form and its sentencepiece (BPE) tokenizer.

A history is written `user_<u> item_<c1> item_<c2> ... <mask>` and split into sub-word pieces.
Every piece also carries the index of the user or item it belongs to, so the model can add one
ID embedding per user/item to all of that id's pieces.

Items are written as sub-word pieces (`item_tokens="pieces"`, the paper's choice) or, with
`item_tokens="whole"`, as one token each: item i is token `sentencepiece vocabulary + i`, so the decoder
ranks all items with one softmax (users and `<mask>` stay sentencepiece pieces).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MASK = "<mask>"
ITEM_TOKENS = ("pieces", "whole")


def item_text(code: str) -> str:
    return f"item_{code}"


def user_text(u: int) -> str:
    return f"user_{u + 1}"


@dataclass
class Encoded:
    """One encoder input: pieces and, per piece, the 1-based user/item index it belongs to (0 = none)."""

    tokens: np.ndarray  # (T,) int64
    user_ids: np.ndarray  # (T,) int64
    item_ids: np.ndarray  # (T,) int64


class GenRecTokenizer:
    """A sentencepiece BPE model plus each item's piece sequence (unique per item)."""

    def __init__(self, model_proto: bytes, item_codes: Sequence[str], item_tokens: str = "pieces"):
        if item_tokens not in ITEM_TOKENS:
            raise ValueError(f"item_tokens: expected one of {ITEM_TOKENS}, got {item_tokens!r}")
        self.item_tokens = item_tokens
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.mask_id = self.sp.piece_to_id(MASK)
        if self.sp.pad_id() != PAD_ID or self.sp.eos_id() != EOS_ID or self.mask_id == UNK_ID:
            raise ValueError("tokenizer: sentencepiece model lacks the pad/eos/<mask> ids genrec_fast expects")
        self.item_codes = list(item_codes)
        if item_tokens == "whole":
            n = self.sp.get_piece_size()
            self.item_pieces = [np.array([n + i], dtype=np.int64) for i in range(len(self.item_codes))]
        else:
            self.item_pieces = [np.array(p, dtype=np.int64) for p in
                                self.sp.encode([item_text(c) for c in self.item_codes])]
        self._check_items()

    def _check_items(self) -> None:
        seen = {}
        for i, p in enumerate(self.item_pieces):
            key = tuple(p.tolist())
            if UNK_ID in key:
                raise ValueError(f"tokenizer: item code {self.item_codes[i]!r} has unknown pieces")
            if key in seen:
                raise ValueError(f"tokenizer: items {seen[key]} and {i} share the piece sequence {key}")
            seen[key] = i

    @property
    def vocab_size(self) -> int:
        """Sentencepiece pieces, plus one token per item with `item_tokens="whole"`."""
        extra = len(self.item_codes) if self.item_tokens == "whole" else 0
        return self.sp.get_piece_size() + extra

    @classmethod
    def train(cls, histories: Sequence[np.ndarray], item_codes: Sequence[str],
              vocab_size: int = 1000, item_tokens: str = "pieces") -> "GenRecTokenizer":
        """Train BPE (deterministic) on the training histories' text plus one line listing every item."""
        lines = [" ".join([user_text(u)] + [item_text(item_codes[i]) for i in h[-64:]])
                 for u, h in enumerate(histories)]
        lines.append(" ".join(item_text(c) for c in item_codes))
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, user_defined_symbols=[MASK],
            character_coverage=1.0, hard_vocab_limit=False, max_sentence_length=1 << 22,
            split_by_number=True, num_threads=2, minloglevel=2,
        )
        return cls(model.getvalue(), item_codes, item_tokens)

    def save(self, directory: Path) -> None:
        (Path(directory) / "tokenizer.model").write_bytes(self.model_proto)
        (Path(directory) / "tokenizer.json").write_text(json.dumps({"item_tokens": self.item_tokens}))

    @classmethod
    def load(cls, directory: Path, item_codes: Sequence[str]) -> "GenRecTokenizer":
        meta = Path(directory) / "tokenizer.json"
        opts = json.loads(meta.read_text()) if meta.is_file() else {}
        return cls((Path(directory) / "tokenizer.model").read_bytes(), item_codes, **opts)

    def user_pieces(self, u: int) -> np.ndarray:
        return np.array(self.sp.encode(user_text(u)), dtype=np.int64)

    def decode_item(self, pieces: Sequence[int]) -> int:
        """Item index of a piece sequence (without EOS); KeyError if it is no item."""
        if not hasattr(self, "_by_pieces"):
            self._by_pieces = {tuple(p.tolist()): i for i, p in enumerate(self.item_pieces)}
        return self._by_pieces[tuple(int(x) for x in pieces)]

    def encode(self, items: Sequence[int], user: int | None = None, mask_at: int | None = None,
               max_len: int | None = None) -> Encoded:
        """Encode a history of item indices; `<mask>` replaces item `mask_at` or, if None, follows the history.

        With `max_len`, the oldest items are dropped until the input fits (the mask is never dropped).
        """
        check_mask_at(items, mask_at)
        parts, uids, iids = [], [], []
        if user is not None:
            p = self.user_pieces(user)
            parts.append(p); uids.append(np.full(len(p), user + 1)); iids.append(np.zeros(len(p), np.int64))
        body = []
        for j, i in enumerate(items):
            if j == mask_at:
                body.append((np.array([self.mask_id]), 0))
            else:
                body.append((self.item_pieces[i], int(i) + 1))
        if mask_at is None:
            body.append((np.array([self.mask_id]), 0))
        if max_len is not None:
            budget = max_len - 1 - sum(len(p) for p in parts)  # 1 for the closing EOS
            body = _keep_recent(body, budget, mask_at)
        for p, iid in body:
            parts.append(p); uids.append(np.zeros(len(p), np.int64)); iids.append(np.full(len(p), iid))
        parts.append(np.array([EOS_ID])); uids.append(np.zeros(1, np.int64)); iids.append(np.zeros(1, np.int64))
        return Encoded(np.concatenate(parts).astype(np.int64), np.concatenate(uids).astype(np.int64),
                       np.concatenate(iids).astype(np.int64))

    def target(self, item: int, eos: bool = True) -> np.ndarray:
        """Decoder target of an item: its pieces then EOS (eos=False: the pieces alone)."""
        return np.append(self.item_pieces[item], EOS_ID) if eos else self.item_pieces[item]


def check_mask_at(items: Sequence[int], mask_at: int | None) -> None:
    """ValueError unless `mask_at` is None or a position of `items`."""
    if mask_at is not None and not 0 <= mask_at < len(items):
        raise ValueError(f"mask_at: expected a position in [0, {len(items)}) of the history, got {mask_at!r}")


def _keep_recent(body: list, budget: int, mask_at: int | None) -> list:
    """Drop the oldest entries until the pieces fit in `budget`; keep the mask and at least one item."""
    total, start, floor = sum(len(p) for p, _ in body), 0, min(2, len(body))
    while total > budget and len(body) - start > floor and start != mask_at:
        total -= len(body[start][0])
        start += 1
    if total > budget:
        raise ValueError(f"max_len: {budget} pieces cannot hold the mask and the most recent item")
    return body[start:]
