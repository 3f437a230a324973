"""SASRec (Kang & McAuley 2018), the peer every dataset is scored against, trained and evaluated here.

Item + learned position embeddings over a left-padded window of the most recent items, causal
self-attention blocks (the query normalised, keys and values not, as in the authors' code), a final
LayerNorm; an item's score is the last position's state dotted with its embedding. Trained with
cross-entropy over every item at every position of the training sequences (the strong variant of the
paper's sampled binary loss), Adam, early stopping on validation NDCG@10. Scored by evaluate.py's code,
the same that scores GenRec, so the two stand side by side on any dataset (`genrec-fast train --model sasrec`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Catalog, SequenceData, Split, leave_one_out
from .evaluate import KS, PARTS, evaluate, popularity_ranker

log = logging.getLogger(__name__)


@dataclass
class SASRecConfig:
    n_items: int = 0
    d_model: int = 64
    blocks: int = 2
    n_heads: int = 1
    window: int = 50  # most recent items read
    dropout: float = 0.5  # chosen on Beauty validation: NDCG@10 .0474 vs .0456 at 0.2 (docs/experiments/beauty.md)
    lr: float = 1e-3
    batch_size: int = 128
    max_epochs: int = 400
    patience: int = 10  # validations without NDCG@10 gain before stopping
    min_steps: int = 3000  # optimizer steps before patience may stop a run: a small dataset (MovieLens
    # latest-small: 6 steps an epoch) otherwise stops at popularity's level (docs/experiments/datasets.md)
    eval_every: int = 2  # epochs between validations
    eval_users: int = 0  # validation users (0 = all; SASRec ranks all of Beauty's 22k users in ~2 s)
    max_minutes: float = 0.0  # time budget (0 = none): no epoch starts that would end past it, and one still
    # running when it passes stops there (validated: the run's last)
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"sasrec.d_model ({self.d_model}) must be divisible by sasrec.n_heads ({self.n_heads})")
        if self.min_steps < 0:
            raise ValueError(f"sasrec.min_steps must be >= 0, got {self.min_steps!r}")
        for name in ("d_model", "blocks", "n_heads", "window", "batch_size", "max_epochs", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"sasrec.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"sasrec.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("n_items", "eval_users", "threads", "lr", "max_minutes", "patience"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"sasrec.{name} must be >= 0, got {getattr(self, name)!r}")


def config_from(spec: dict) -> SASRecConfig:
    """A SASRecConfig from {field: value} (a JSON config's "sasrec" section, `--set sasrec.FIELD=VALUE`s): an
    unknown field or a value of the wrong type (as config.py checks GenRec's: true is no int, "abc" no float; an
    int for a float becomes a float) raises ValueError naming the field, before any training."""
    from .config import _typed
    types = {f.name: str(f.type) for f in dataclasses.fields(SASRecConfig)}
    unknown = sorted(set(spec) - set(types))
    if unknown:
        raise ValueError(f"config: sasrec has no field {unknown[0]!r}; expected one of {sorted(types)}")
    return SASRecConfig(**{name: _typed(f"sasrec.{name}", types[name], v) for name, v in spec.items()})


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        d = cfg.d_model
        self.attn_norm, self.ffn_norm = nn.LayerNorm(d, eps=1e-8), nn.LayerNorm(d, eps=1e-8)
        self.attn = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, barred: torch.Tensor) -> torch.Tensor:
        """x (B, T, d), keep (B, T, 1) 1 at real items, barred (B * heads, T, T) True where attention is barred."""
        q = self.attn_norm(x)
        a, _ = self.attn(q, x, x, attn_mask=barred, need_weights=False)
        x = q + a
        h = self.ffn_norm(x)
        return (h + self.drop(self.fc2(self.drop(F.relu(self.fc1(h)))))) * keep


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(cfg.n_items + 1, cfg.d_model, padding_idx=0)  # row 0: padding
        self.pos = nn.Embedding(cfg.window, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.norm = nn.LayerNorm(cfg.d_model, eps=1e-8)
        nn.init.xavier_normal_(self.item.weight[1:])  # as the authors' code initialises every table

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, T) item indices + 1, left-padded with 0 -> states (B, T, d)."""
        T = seq.shape[1]
        keep = (seq > 0).unsqueeze(-1).to(self.item.weight.dtype)  # (B, T, 1)
        x = self.item(seq) * self.cfg.d_model ** 0.5 + self.pos.weight[-T:]
        x = self.drop(x) * keep
        for b in self.blocks:
            x = b(x, keep, self.barred(seq))
        return self.norm(x)

    def barred(self, seq: torch.Tensor) -> torch.Tensor:
        """(B * heads, T, T): a position sees itself and the real items before it. The authors' code lets
        positions also attend to the padding before them, so that their scores shift with the padding;
        here the padding is masked (a padded position sees only itself; its state is zeroed)."""
        T = seq.shape[1]
        eye = torch.eye(T, dtype=torch.bool, device=seq.device)  # (T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).triu(1)  # (T, T)
        pad_key = (seq == 0)[:, None, :] & ~eye  # (B, T, T)
        return (causal | pad_key).repeat_interleave(self.cfg.n_heads, dim=0)

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d) -> (..., n_items) scores of every item (index i = item i)."""
        return h @ self.item.weight[1:].T

    def loss(self, seq: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all items at every position with a target (target (B, T) item + 1, 0 = none)."""
        h = self(seq)  # (B, T, d)
        real = target > 0  # (B, T)
        return F.cross_entropy(self.item_logits(h[real]), target[real] - 1)

    @torch.inference_mode()
    def scores(self, histories) -> torch.Tensor:
        """Item-index histories -> (B, n_items) scores after the last item."""
        return self.item_logits(self(left_padded(histories, self.cfg.window))[:, -1])


def left_padded(histories, window: int) -> torch.Tensor:
    """Item-index histories -> (B, window) int64, the most recent items + 1, left-padded with 0."""
    out = np.zeros((len(histories), window), dtype=np.int64)
    for b, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-window:]
        if len(h):
            out[b, window - len(h):] = h + 1
    return torch.from_numpy(out)


def training_rows(split: Split, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Every user's training sequence as (inputs, targets), (U', window) each, left-padded: input t's
    next item is target t (users with fewer than two training items have no target and are left out)."""
    seqs = [s[-(window + 1):] for s in split.train if len(s) >= 2]
    inp = left_padded([s[:-1] for s in seqs], window).numpy()
    tgt = left_padded([s[1:] for s in seqs], window).numpy()
    return inp, tgt


def sasrec_ranker(model: SASRec, k: int = max(KS)):
    """An evaluate.Ranker: the top k items by score (history items masked when excluding seen)."""
    @torch.inference_mode()
    def rank(hists, users, exclude_seen):
        s = model.scores(hists)  # (B, n_items)
        if exclude_seen:
            rows = np.repeat(np.arange(len(hists)), [len(h) for h in hists])
            s[torch.from_numpy(rows), torch.from_numpy(np.concatenate(hists).astype(np.int64))] = float("-inf")
        return s.topk(min(k, s.shape[1]), dim=1).indices.numpy()
    return rank


def train_sasrec(data: SequenceData, out_dir: str | Path, cfg: SASRecConfig, progress: bool = True) -> SASRec:
    """Train on the training part, validate every `eval_every` epochs, keep the best weights
    (`out_dir/best`), stop on patience, the epoch cap or the time budget; returns the best model."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.jsonl").unlink(missing_ok=True)
    cfg = dataclasses.replace(cfg, n_items=data.n_items)
    split = leave_one_out(data)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = SASRec(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    inp, tgt = training_rows(split, cfg.window)
    users = np.arange(data.n_users) if not cfg.eval_users else np.sort(
        np.random.default_rng(cfg.seed + 1).permutation(data.n_users)[:cfg.eval_users])
    best, bad, t0, epoch_s, stop, steps = -1.0, 0, time.perf_counter(), 0.0, "max_epochs", 0
    deadline = t0 + 60 * cfg.max_minutes if cfg.max_minutes else float("inf")
    for epoch in range(1, cfg.max_epochs + 1):
        if epoch_s and time.perf_counter() + epoch_s > deadline:
            stop = "max_minutes"
            break
        start, model, cut = time.perf_counter(), model.train(), None
        order, losses = rng.permutation(len(inp)), []
        starts = range(0, len(order), cfg.batch_size)
        for i, s in enumerate(tqdm(starts, desc=f"sasrec epoch {epoch}", leave=False,
                                   disable=None if progress else True)):
            if i and time.perf_counter() > deadline:  # an epoch longer than the budget stops there
                cut = i
                break
            rows = order[s:s + cfg.batch_size]
            loss = model.loss(torch.from_numpy(inp[rows]), torch.from_numpy(tgt[rows]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            losses.append(loss.item())
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "elapsed_s": round(time.perf_counter() - t0, 1)}
        if cut:
            row["cut_after_steps"], stop = cut, "max_minutes"
        if epoch % cfg.eval_every == 0 or cut:  # a cut epoch is the run's last
            model.eval()
            row["valid"] = evaluate(sasrec_ranker(model), split, "valid", users, progress=False)
            if row["valid"]["NDCG@10"] > best:
                best, bad = row["valid"]["NDCG@10"], 0
                save(out / "best", model, data)
            else:
                bad += 1
        with (out / "log.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("sasrec epoch %d loss %.4f%s", epoch, row["loss"],
                 f" valid NDCG@10 {row['valid']['NDCG@10']:.4f}" if "valid" in row else "")
        epoch_s = time.perf_counter() - start
        if cut:
            log.info("sasrec epoch %d cut after %d of its %d steps: sasrec.max_minutes=%g passed", epoch, cut,
                     len(starts), cfg.max_minutes)
            break
        if bad >= cfg.patience and steps >= cfg.min_steps:
            stop = "patience"
            break
    if best < 0:  # no validation ran (a budget or cap shorter than eval_every): keep the last weights
        save(out / "best", model.eval(), data)
    summary = {"epochs": epoch, "stopped_by": stop, "train_seconds": round(time.perf_counter() - t0, 1),
               "best_valid_ndcg10": best}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return load(out / "best")


def save(path: Path, model: SASRec, data: SequenceData) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "sasrec.json").write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2))
    (path / "catalog.json").write_text(json.dumps(Catalog.from_data(data).to_dict()))
    torch.save(model.state_dict(), path / "weights.pt")


def load(path: str | Path) -> SASRec:
    path = Path(path)
    if not (path / "sasrec.json").is_file():
        raise FileNotFoundError(f"checkpoint {path}: no sasrec.json (not a SASRec checkpoint)")
    from .checkpoint import read_json
    cfg = read_json(path / "sasrec.json")
    model = SASRec(SASRecConfig(**cfg))
    model.load_state_dict(torch.load(path / "weights.pt", map_location="cpu", weights_only=True))
    return model.eval()


def report_sasrec(model: SASRec, split: Split, test: bool = True) -> dict:
    """Validation and test metrics (and test without seen items) next to popularity, as `evaluate.report`;
    test=False: validation only (exploratory runs never look at the test items)."""
    pop, rank = popularity_ranker(split, model.cfg.n_items), sasrec_ranker(model)
    parts = PARTS if test else ("valid",)
    out: dict = {part: {"popularity": evaluate(pop, split, part, progress=False)} for part in parts}
    for part in parts:
        out[part]["sasrec"] = evaluate(rank, split, part, progress=False)
    if test:
        out["test"]["sasrec+exclude_seen"] = evaluate(rank, split, "test", exclude_seen=True, progress=False)
    return out
