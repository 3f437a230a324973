"""A hybrid: a one-token GenRec model and a SASRec peer rank the union of their top items together.

GenRec and SASRec rank new items differently: on Beauty's validation users (seen items excluded) each hits 3.1% of
users the other misses (docs/experiments/datasets.md). Each model proposes its `candidates` best items (after the
filters exclude_seen and allowed_items); both score the union (U, <= 2N) with their own logits, normalised over the
candidates (GenRec's with its history and transition offsets), and the items are ranked by

    score = (1 - weight) * log P_genrec(item | candidates) + weight * log P_sasrec(item | candidates)

weight 0 is GenRec's order, 1 SASRec's (over the union). A normaliser over the candidates shifts each user's
scores by a constant, so the order is that of the weighted sum of the two models' logits. `cascade.fit_weight`
chooses the weight on validation targets. Saved as a directory with hybrid.json, genrec/ and sasrec/;
`genrec_fast.load` reads it like any checkpoint. Serving costs both models: GenRec's one step + top-k and
SASRec's encoder + its head + top-k (the fused C++ scan GenRec's one-token head uses).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .cascade import append_new_items, check_candidates, combine
from .checkpoint import HYBRID, read_json, read_pair, save_pair
from .data import Catalog
from .decoding import first_step_heads
from .item_topk import Head, candidate_logits, item_topk
from .recommend import Recommender
from .sasrec import SASRec, left_padded

DEFAULT_CANDIDATES = 50  # each model's list: the length the fusion diagnostic used (scripts/fuse_rankings.py)


class Hybrid(Recommender):
    """`genrec` (a one-token `Recommender`) and `sasrec` (a `SASRec` over the same catalog, `sasrec_catalog`), each
    proposing its best max(candidates, k) items; `recommend`, `decode` and `encode_batch` as for one model, with
    scores as in the module docstring."""

    def __init__(self, genrec: Recommender, sasrec: SASRec, sasrec_catalog: Catalog,
                 candidates: int = DEFAULT_CANDIDATES, weight: float = 0.5):
        if type(genrec) is not Recommender:  # (a cascade or hybrid cannot score given items in one step)
            raise ValueError(f"genrec: expected one model's Recommender (genrec_fast.load of a checkpoint), got "
                             f"{type(genrec).__name__}")
        if not genrec.one_step:
            raise ValueError("genrec: expected a model with one token per item and no EOS step (it scores SASRec's "
                             f"candidates in one decoder step), got one with item_tokens="
                             f"{genrec.tokenizer.item_tokens!r}, item_eos={genrec.model.cfg.item_eos}")
        if not isinstance(sasrec, SASRec):
            raise ValueError(f"sasrec: expected a SASRec model (sasrec.load), got {type(sasrec).__name__}")
        if sasrec_catalog.item_ids != genrec.catalog.item_ids or sasrec.cfg.n_items != len(genrec.catalog.item_ids):
            raise ValueError("sasrec: its catalog's item ids differ from GenRec's (both must be trained on the same "
                             "data with the same --id-order and --seed)")
        check_candidates(candidates)
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight: expected a number in [0, 1], got {weight!r}")
        super().__init__(genrec.model, genrec.tokenizer, genrec.catalog, genrec.max_items, genrec.use_users,
                         genrec.exclude_seen)
        self.genrec, self.sasrec = genrec, sasrec.to(genrec.device).eval()
        self.candidates, self.weight = candidates, float(weight)
        self.fit: dict = {}  # what `cascade.fit_weight` measured, saved with the hybrid

    @property
    def one_step(self) -> bool:
        return False  # (calibrate.py and the CLI ask: a hybrid is not one model's one step)

    def settings(self) -> dict:
        """What `cascade.fit_weight` records beside the weight."""
        return {"candidates": self.candidates, "kind": "hybrid"}

    def encode_batch(self, histories, users) -> dict:
        """GenRec's padded encoder batch and SASRec's left-padded window, cut to the batch's longest history
        (U, T <= window): SASRec masks the padding and aligns positions from the right, so the columns of padding
        alone change no state; a short history no longer pays for the whole window."""
        window = self.sasrec.cfg.window
        T = max([min(len(h), window) for h in histories] + [1])
        return {"genrec": self.genrec.encode_batch(histories, users),
                "sasrec": left_padded(histories, window)[:, window - T:].to(self.device)}

    def decode(self, enc: dict, k: int, num_beams: int, exclude=None, allow=None, backend: str = "auto",
               length_penalty: float = 0.0):
        """-> items (U, k) int64 item indices (-1 = none) and hybrid scores (U, k) float32, best first.
        num_beams, backend and length_penalty are unused (no beam search: both models rank in one step)."""
        return combine(*self.candidates_scored(enc, k, num_beams, exclude, allow), self.weight, k)

    @torch.inference_mode()
    def candidates_scored(self, enc: dict, k: int, num_beams: int = 0, exclude=None, allow=None,
                          backend: str = "auto", length_penalty: float = 0.0):
        """-> the union of both models' max(candidates, k) best allowed items (U, C) (GenRec's first, -1 = none),
        log P_genrec (U, C) and log P_sasrec (U, C) over it: what `combine` orders for any weight."""
        n_items, n = len(self.catalog.item_ids), max(self.candidates, k)
        first = int(self.tokenizer.item_flat[0])
        heads, pairs = first_step_heads(self.model, enc["genrec"])
        g_items, _ = item_topk(heads, first, n_items, n, exclude, allow, history=pairs, precision=self._precision)
        s_heads = [self.sasrec_head(enc["sasrec"])]
        s_items, _ = item_topk(s_heads, 0, n_items, n, exclude, allow, precision=self._precision)  # (U, n)
        cand = append_new_items(g_items, s_items)  # (U, 2n), -1 = none
        z_s = candidate_logits(s_heads, 0, cand)  # (U, 2n), -inf at -1
        z_g = candidate_logits(heads, first, cand, pairs)
        log_g, log_s = (torch.log_softmax(z, dim=1).nan_to_num(float("-inf")).cpu().numpy() for z in (z_g, z_s))
        return cand, log_g, log_s

    def sasrec_head(self, seq: torch.Tensor) -> Head:
        """SASRec's window (U, window) -> its scores as an `item_topk.Head`: the last state (U, d) and the item
        table without the padding row (n_items, d), so that SASRec ranks the catalog with the fused head + top-k
        that one-token GenRec models use (never storing (U, n_items) scores on a CPU)."""
        return Head(self.sasrec(seq)[:, -1].contiguous(), self.sasrec.item.weight[1:], None)

    def save(self, path: str | Path, genrec_dir: str | Path, sasrec_dir: str | Path) -> Path:
        """Write hybrid.json and copies of the two checkpoint directories to `path` (`checkpoint.save_pair`)."""
        cfg = {"candidates": self.candidates, "weight": self.weight, "exclude_seen": self.exclude_seen,
               "fit": self.fit}
        return save_pair(path, HYBRID, {"genrec": genrec_dir, "sasrec": sasrec_dir}, cfg)


def load_sasrec_dir(path: str | Path, device: str | torch.device = "cpu") -> tuple[SASRec, Catalog]:
    """A `train --model sasrec` checkpoint directory -> the model on `device` and its catalog."""
    from . import sasrec
    path = Path(path)
    return sasrec.load(path).to(device), Catalog(**read_json(path / "catalog.json"))


def load_hybrid(path: str | Path, device: str | torch.device = "cpu") -> Hybrid:
    """A directory written by `Hybrid.save` -> the hybrid, its fit record in `.fit`."""
    from .recommend import load
    path = Path(path)
    cfg = read_pair(path, HYBRID, "hybrid")
    hybrid = Hybrid(load(path / "genrec", device), *load_sasrec_dir(path / "sasrec", device), cfg["candidates"],
                    cfg["weight"])
    hybrid.fit = cfg.get("fit", {})
    hybrid.exclude_seen = bool(cfg.get("exclude_seen", hybrid.exclude_seen))  # recommend()'s default
    return hybrid
