"""GenRec text form and its sentencepiece (BPE) tokenizer.

A history is written `user_<u> item_<c1> item_<c2> ... <mask>` and split into sub-word pieces.
Every piece also carries the index of the user or item it belongs to, so the model can add one
ID embedding per user/item to all of that id's pieces.

Items are written as sub-word pieces (`item_tokens="pieces"`, the paper's choice); with
`item_tokens="whole"`, as one token each: item i is token `sentencepiece vocabulary + i`, so the decoder
ranks all items with one softmax; with `item_tokens="codes"`, as the tokens of a code table (n_items, L)
(collab_codes.py: cluster levels then an index that makes codes unique), column l's value v being token
`sentencepiece vocabulary + (values of the columns before l) + v`. Users and `<mask>` stay sentencepiece pieces.
"""
from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MASK = "<mask>"
ITEM_TOKENS = ("pieces", "whole", "codes")
CODE_INPUTS = ("all", "first")
CODE_TABLE = "item_code_table.npy"  # the code table in a checkpoint directory
WORDS_PER_LINE = 1000  # words per tokenizer training line: far below sentencepiece's max_sentence_length
MAX_HISTORY_LINES = 100_000  # users (and histories) sampled for the BPE statistics: bounds sentencepiece's
# time whatever the number of users (a million items and 100,000 histories: ~6 s)
USER_DIGITS = " ".join(f"user_{d}" for d in range(10))  # every character a user's text can hold


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


def training_lines(histories: Sequence[np.ndarray], item_codes: Sequence[str], item_tokens: str) -> list[str]:
    """Sentencepiece training text, never one line holding every item (it would pass max_sentence_length).

    The users (at most MAX_HISTORY_LINES, a seeded sample) and, with too few users to show them all,
    every character a user's text can hold. "whole" adds nothing else: the encoder's other text is
    <mask> (a user-defined symbol) and whole item tokens. "pieces" writes each user with its history's
    items, and every item's text, WORDS_PER_LINE words a line: BPE counts words, so how they are cut
    into lines does not change the model (the same model as one line listing every item).
    """
    users = np.arange(len(histories))
    if len(users) > MAX_HISTORY_LINES:
        users = np.sort(np.random.default_rng(0).choice(len(users), MAX_HISTORY_LINES, replace=False))
    words = [user_text(u) for u in users.tolist()]
    cover = [USER_DIGITS] if set(USER_DIGITS.replace(" ", "")) - set("".join(words)) else []
    if item_tokens != "pieces":  # whole items and codes are tokens of their own, not text
        return _word_lines(words) + cover
    lines = [" ".join([w] + [item_text(item_codes[i]) for i in histories[u][-64:]])
             for w, u in zip(words, users.tolist())]
    return lines + _word_lines([item_text(c) for c in item_codes]) + cover


def _word_lines(words: list[str]) -> list[str]:
    return [" ".join(words[s:s + WORDS_PER_LINE]) for s in range(0, len(words), WORDS_PER_LINE)]


def _flatten(pieces: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-item piece lists -> offsets (n + 1,) and flat pieces (total,), both int64."""
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))  # (n,)
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=int(offsets[-1]))
    return offsets, flat


def first_duplicate(offsets: np.ndarray, flat: np.ndarray) -> tuple[int, int] | None:
    """Two items with the same piece sequence, or None. The items of each length are sorted by a key of their
    pieces (one int64 where the pieces' bits fit, else a byte string) and neighbours compared: O(n log n), no
    Python object per item (ten million codes of 3 tokens: ~1.5 s, as byte strings 7.7 s)."""
    lengths = np.diff(offsets)  # (n,)
    for n in np.unique(lengths).tolist():
        items = np.flatnonzero(lengths == n)  # (m,)
        if len(items) < 2:
            continue
        if n == 0:
            return int(items[0]), int(items[1])
        rows = np.ascontiguousarray(flat[offsets[items][:, None] + np.arange(n)])  # (m, n)
        keys = _row_keys(rows)  # (m,)
        order = np.argsort(keys, kind="stable")
        same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
        if len(same):
            return int(items[order[same[0]]]), int(items[order[same[0] + 1]])
    return None


def _row_keys(rows: np.ndarray) -> np.ndarray:
    """rows (m, n) of non-negative ids -> (m,) keys equal exactly where rows are: the pieces' bits packed into one
    int64 where they fit in 63 bits, else each row's bytes."""
    m, n = rows.shape
    bits = max(int(rows.max(initial=0)).bit_length(), 1)
    if rows.min(initial=0) < 0 or bits * n > 63:
        return rows.view(np.dtype((np.void, rows.itemsize * n)))[:, 0]  # (m,) one byte string per item
    keys = np.zeros(m, dtype=np.int64)
    for c in range(n):
        keys = (keys << bits) | rows[:, c]
    return keys


class ItemPieces(Sequence):
    """`item_pieces[i]`: item i's pieces, a view `item_flat[item_offsets[i]:item_offsets[i + 1]]` (not a copy:
    do not write to it), without one array per item (a million of those take ~1 s and ~120 MB)."""

    def __init__(self, offsets: np.ndarray, flat: np.ndarray):
        self.starts, self.ends, self.flat = offsets[:-1], offsets[1:], flat  # (n,), (n,), (total,)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.flat[self.starts[i]:self.ends[i]]  # numpy: negative i counts from the end, IndexError past it

    def __iter__(self):
        for a, b in zip(self.starts.tolist(), self.ends.tolist()):
            yield self.flat[a:b]


class GenRecTokenizer:
    """A sentencepiece BPE model plus each item's piece sequence (unique per item), stored flat:
    item i is `item_flat[item_offsets[i]:item_offsets[i + 1]]` (also `item_pieces[i]`): what the decoder
    generates. The encoder reads `input_pieces[i]`, the same pieces except for codes with
    code_input="first": one position per item, its first code token (the ID embedding added to it tells
    items apart), so a history costs the encoder what one token per item costs."""

    def __init__(self, model_proto: bytes, item_codes: Sequence[str], item_tokens: str = "pieces",
                 code_table: np.ndarray | None = None, code_input: str = "all"):
        if item_tokens not in ITEM_TOKENS:
            raise ValueError(f"item_tokens: expected one of {ITEM_TOKENS}, got {item_tokens!r}")
        if code_input not in CODE_INPUTS:
            raise ValueError(f"code_input: expected one of {CODE_INPUTS}, got {code_input!r}")
        if (code_table is not None) != (item_tokens == "codes"):
            raise ValueError("code_table: expected one (n_items, L) table exactly when item_tokens='codes'")
        self.item_tokens = item_tokens
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.mask_id = self.sp.piece_to_id(MASK)
        if self.sp.pad_id() != PAD_ID or self.sp.eos_id() != EOS_ID or self.mask_id == UNK_ID:
            raise ValueError("tokenizer: sentencepiece model lacks the pad/eos/<mask> ids genrec_fast expects")
        self.item_codes = list(item_codes)
        if item_tokens == "whole":  # item i is token n_sp + i
            n, n_sp = len(self.item_codes), self.sp.get_piece_size()
            self.item_offsets = np.arange(n + 1, dtype=np.int64)  # (n_items + 1,)
            self.item_flat = np.arange(n_sp, n_sp + n, dtype=np.int64)  # (n_items,)
        elif item_tokens == "codes":
            self.code_table = _check_code_table(code_table, len(self.item_codes))  # (n_items, L)
            n, width = self.code_table.shape
            sizes = self.code_table.max(0) + 1 if n else np.zeros(width, np.int64)  # (L,) values per column
            self.code_sizes = sizes
            first = self.sp.get_piece_size() + np.r_[0, np.cumsum(sizes)[:-1]]  # (L,) first token of each column
            self.code_first = first
            self.item_offsets = np.arange(n + 1, dtype=np.int64) * width
            self.item_flat = (self.code_table + first).reshape(-1)  # (n_items * L,)
        else:
            self.item_offsets, self.item_flat = _flatten(self.sp.encode([item_text(c) for c in self.item_codes]))
        self.item_pieces = ItemPieces(self.item_offsets, self.item_flat)
        self.code_input = code_input if item_tokens == "codes" else "all"
        if self.code_input == "first":  # (n_items,) each item's first code token, one position each
            self.input_offsets = np.arange(len(self.item_codes) + 1, dtype=np.int64)
            self.input_flat = self.item_flat[::self.code_table.shape[1]].copy()
        else:
            self.input_offsets, self.input_flat = self.item_offsets, self.item_flat
        self.input_pieces = ItemPieces(self.input_offsets, self.input_flat)
        self._check_items()

    def _check_items(self) -> None:
        unknown = np.flatnonzero(self.item_flat == UNK_ID)
        if len(unknown):
            i = int(np.searchsorted(self.item_offsets, unknown[0], side="right")) - 1
            raise ValueError(f"tokenizer: item code {self.item_codes[i]!r} has unknown pieces")
        pair = first_duplicate(self.item_offsets, self.item_flat)
        if pair is not None:
            i, j = pair
            raise ValueError(f"tokenizer: items {i} and {j} share the piece sequence "
                             f"{tuple(self.item_pieces[i].tolist())}")

    @property
    def vocab_size(self) -> int:
        """Sentencepiece pieces, plus one token per item with "whole", one per value of each code column with "codes"."""
        if self.item_tokens == "whole":
            return self.sp.get_piece_size() + len(self.item_codes)
        if self.item_tokens == "codes":
            return self.sp.get_piece_size() + int(self.code_sizes.sum())
        return self.sp.get_piece_size()

    @classmethod
    def train(cls, histories: Sequence[np.ndarray], item_codes: Sequence[str],
              vocab_size: int = 1000, item_tokens: str = "pieces",
              code_table: np.ndarray | None = None, code_input: str = "all") -> "GenRecTokenizer":
        """Train BPE (deterministic) on the text the encoder reads besides whole item tokens (see `training_lines`)."""
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(training_lines(histories, item_codes, item_tokens)), model_writer=model,
                model_type="bpe", vocab_size=vocab_size, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                user_defined_symbols=[MASK], character_coverage=1.0, hard_vocab_limit=False,
                max_sentence_length=1 << 22, split_by_number=True, num_threads=2, minloglevel=2,
            )
        except RuntimeError as e:
            if "smaller than required_chars" not in str(e):
                raise
            need = re.search(r"(\d+) vs (\d+)", str(e))
            raise ValueError(f"tokenizer.vocab_size: {vocab_size} is below the {need.group(2) if need else 'more'} "
                             "pieces the text's characters and the special tokens need; raise it") from None
        return cls(model.getvalue(), item_codes, item_tokens, code_table, code_input)

    def save(self, directory: Path) -> None:
        (Path(directory) / "tokenizer.model").write_bytes(self.model_proto)
        opts = {"item_tokens": self.item_tokens}
        if self.item_tokens == "codes":
            opts["code_input"] = self.code_input
        (Path(directory) / "tokenizer.json").write_text(json.dumps(opts))
        if self.item_tokens == "codes":
            np.save(Path(directory) / CODE_TABLE, self.code_table)

    @classmethod
    def load(cls, directory: Path, item_codes: Sequence[str]) -> "GenRecTokenizer":
        meta = Path(directory) / "tokenizer.json"
        try:
            opts = json.loads(meta.read_text()) if meta.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"checkpoint {directory}: tokenizer.json is not valid JSON ({e}); the file is "
                             "damaged") from None
        if opts.get("item_tokens") == "codes":
            if not (Path(directory) / CODE_TABLE).is_file():
                raise FileNotFoundError(f"checkpoint {directory}: missing {CODE_TABLE} (a codes model's item codes)")
            opts["code_table"] = np.load(Path(directory) / CODE_TABLE)
        try:
            return cls((Path(directory) / "tokenizer.model").read_bytes(), item_codes, **opts)
        except ValueError as e:
            if meta.is_file():
                raise
            raise ValueError(f"checkpoint {directory}: {e}; it has no tokenizer.json, which every checkpoint but "
                             "the oldest (items as pieces) has: is it missing?") from None

    def user_pieces(self, u: int) -> np.ndarray:
        return np.array(self.sp.encode(user_text(u)), dtype=np.int64)

    def decode_item(self, pieces: Sequence[int]) -> int:
        """Item index of a piece sequence (without EOS); KeyError if it is no item."""
        key = np.asarray(pieces, dtype=np.int64).reshape(-1)  # (L,)
        if self.item_tokens == "whole":  # item i is the one token item_flat[0] + i
            i = int(key[0] - self.item_flat[0]) if len(key) == 1 and len(self.item_flat) else -1
            if 0 <= i < len(self.item_flat):
                return i
        else:
            if not hasattr(self, "_by_pieces"):  # built on first use: one bytes key per item
                self._by_pieces = {p.tobytes(): i for i, p in enumerate(self.item_pieces)}
            if key.tobytes() in self._by_pieces:
                return self._by_pieces[key.tobytes()]
        raise KeyError(tuple(key.tolist()))

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
                body.append((self.input_pieces[i], int(i) + 1))
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


def _check_code_table(table, n_items: int) -> np.ndarray:
    table = np.asarray(table)
    if table.ndim != 2 or table.shape[0] != n_items or table.shape[1] < 1 or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"code_table: expected an integer array of shape ({n_items}, L >= 1), got "
                         f"{table.dtype} {table.shape}")
    if table.size and table.min() < 0:
        raise ValueError("code_table: codes must be >= 0")
    return table.astype(np.int64)


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
