"""Masked item prediction training: pretraining masks a random item, finetuning masks the next item.

Only the training part of each sequence (all but the last two items) is ever used as context or
target. Periodic validation on a fixed sample of users selects the best checkpoint (NDCG@10) and
stops early; the loss and metrics of every epoch go to `log.jsonl` and `curves.png`.

Under `torchrun` (WORLD_SIZE > 1) every rank trains on its share of each global batch and the
gradients are summed across ranks (distributed.py); rank 0 alone writes files (docs/training.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint, distributed
from .batching import encode_padded, pad_targets
from .collab_codes import LARGE_LEAF, LEAF_ITEMS, balanced_codes, branches_for, build_codes, checkpoint_item_vectors
from .config import LARGE_CATALOG, ModelConfig, Preset, TrainConfig, checked, for_catalog, sampled_softmax_needs
from .data import Catalog, SequenceData, Split, leave_one_out
from .device import check_device
from .ema import WeightAverage
from .evaluate import evaluate, model_ranker
from .loss import NegativeSampler, item_cross_entropy, sampled_cross_entropy
from .model import GenRec
from .prefix_batch import pack, pad_packed
from .recommend import Recommender
from .tokenizer import BOS_ID, PAD_ID, GenRecTokenizer
from .transition_bias import OwnPairs, context_items, mask_positions

log = logging.getLogger(__name__)
IGNORE = -100
CUT_EVERY = 16  # steps between asking rank 0 whether train.max_minutes has passed (several ranks)


@dataclass
class Example:
    user: int | None  # user index, None = trained without the user token
    items: np.ndarray  # context item indices
    mask_at: int | None  # position of <mask> in items (pretraining) or None (mask after the history)
    target: int  # the masked item
    owner: int = -1  # the user whose sequence it comes from, even without the user token (transition_bias.OwnPairs)


@dataclass
class Window:
    """The most recent `max_items + 1` training items of a user: every item after the first is a target."""

    user: int | None
    items: np.ndarray


def make_windows(split: Split, rng: np.random.Generator, cfg: TrainConfig) -> list[Window]:
    """A shuffled epoch of windows for a causal encoder (all next-item targets of a window in one pass)."""
    out = [Window(None if rng.random() < cfg.drop_user_prob else u, seq[-(cfg.max_items + 1):])
           for u, seq in enumerate(split.train) if len(seq) >= 2]
    rng.shuffle(out)
    return out


def make_examples(split: Split, rng: np.random.Generator, pretrain: bool, cfg: TrainConfig,
                  next_items: bool = True) -> list[Example]:
    """A shuffled epoch of examples from the training sequences only.

    Finetuning: every prefix of every sequence predicts its next item (each history item dropped with
    probability `history_drop`, then a random stretch of `history_reorder` of it shuffled: data
    augmentations), plus, with `cloze_mix` > 0, about
    `cloze_mix` pretraining examples per training item. Pretraining: as many examples per user as it has
    training items, each masking one random item (the last with probability `pretrain_last_prob`).
    The user token is dropped with probability `drop_user_prob`. next_items=False leaves out the
    finetuning prefixes (a causal encoder trains them from `make_windows`) and keeps the cloze mix.
    """
    out = []
    for u, seq in enumerate(split.train):
        for items, mask_at, target in (_pretrain_examples(seq, rng, cfg) if pretrain
                                       else _finetune_examples(seq, cfg, rng, next_items)):
            user = None if rng.random() < cfg.drop_user_prob else u
            out.append(Example(user, items, mask_at, target, u))
    rng.shuffle(out)
    return out


def _pretrain_examples(seq, rng, cfg):
    for _ in range(len(seq)):
        start = int(rng.integers(0, max(1, len(seq) - cfg.max_items + 1)))  # a window of max_items
        window = seq[start:start + cfg.max_items]
        n = len(window)
        t = n - 1 if rng.random() < cfg.pretrain_last_prob else int(rng.integers(0, n))
        yield window, t, int(window[t])


def _finetune_examples(seq, cfg, rng, next_items=True):
    if next_items:
        for t in range(1, len(seq)):
            items = _drop_some(seq[max(0, t - cfg.max_items):t], cfg.history_drop, rng)
            yield _reorder_some(items, cfg.history_reorder, rng), None, int(seq[t])
    if cfg.cloze_mix > 0:
        yield from (e for e in _pretrain_examples(seq, rng, cfg) if rng.random() < cfg.cloze_mix)


def _drop_some(items: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Each item dropped with probability p, order kept; the most recent one stays if all would go."""
    if p <= 0:
        return items
    keep = rng.random(len(items)) >= p
    keep[-1] |= not keep.any()
    return items[keep]


def _reorder_some(items: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """A random contiguous stretch of floor(share * n) items shuffled, the rest in place (CL4SRec's reorder)."""
    n = int(share * len(items))
    if n < 2:
        return items
    start = int(rng.integers(0, len(items) - n + 1))
    out = items.copy()
    out[start:start + n] = rng.permutation(out[start:start + n])
    return out


def to_batch(part: list, tokenizer: GenRecTokenizer, cfg: ModelConfig, device):
    """Examples -> one padded single-target batch; windows -> one packed all-prefix batch.

    The model config sets the encoder window, the position numbering and whether targets end in EOS."""
    if isinstance(part[0], Window):
        return pad_packed([pack(tokenizer, w.items, w.user, cfg.encoder_positions) for w in part], IGNORE, device)
    enc = encode_padded(tokenizer, [e.items for e in part], [e.user for e in part], [e.mask_at for e in part],
                        cfg.max_positions, device)
    dec_in, labels = pad_targets([tokenizer.target(e.target, cfg.item_eos) for e in part], BOS_ID, IGNORE, device)
    return dict(enc, decoder_tokens=dec_in), labels


def target_tokens(part: list, tokenizer: GenRecTokenizer, cfg: ModelConfig, device) -> torch.Tensor:
    """(B,) the first target token of each example: `to_batch(part, ...)[1][:, 0]` without the encoder input."""
    return pad_targets([tokenizer.target(e.target, cfg.item_eos) for e in part], BOS_ID, IGNORE, device)[1][:, 0]


def seen_tokens(part: list, tokenizer: GenRecTokenizer, device) -> torch.Tensor:
    """(B, S) the item tokens of each example's context, padded with PAD (whole-item tokens only)."""
    rows = [[int(tokenizer.item_pieces[i][0]) for i in e.items] for e in part]
    out = np.full((len(rows), max(map(len, rows))), PAD_ID, dtype=np.int64)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return torch.from_numpy(out).to(device)


def _length_buckets(examples: list, batch_size: int, rng: np.random.Generator, chunk: int = 64):
    """Sort each run of `chunk` batches by history length, cut it into batches, shuffle all batches."""
    out = []
    for s in range(0, len(examples), batch_size * chunk):
        run = sorted(examples[s:s + batch_size * chunk], key=lambda e: len(e.items))
        out.extend(run[i:i + batch_size] for i in range(0, len(run), batch_size))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def budget_steps(step: int, remaining_s: float, s_per_step: float, epoch_steps: list[int]) -> int:
    """The step a time budget is expected to end at: `step` plus the coming epochs (their step counts,
    in order) that fit whole into remaining_s at s_per_step, as the stop rule judges them."""
    for n in epoch_steps:
        remaining_s -= n * s_per_step
        if remaining_s < 0:
            break
        step += n
    return step


class Trainer:
    """One training run. With a `group` of several processes (default: the initialised process group, if
    any) each trains on its share of every batch, and only rank 0 writes to `out_dir`."""

    def __init__(self, data: SequenceData, out_dir: str | Path, preset: Preset, device: str = "cpu",
                 progress: bool = True, group: distributed.Group | None = None):
        self.data, self.out = data, Path(out_dir)
        self.group = group if group is not None else distributed.current()
        self.split = leave_one_out(data)
        self.progress = progress and self.group.is_main
        preset = self._for_catalog(preset, data.n_items)
        self.tcfg, self.device = preset.train, check_device(device)
        self.sampled = self.tcfg.softmax == "sampled"
        if self.sampled:  # before the tokenizer: that takes seconds at a million items
            check_sampled_softmax(preset)
        self.catalog = Catalog.from_data(data)
        if (not self.sampled and preset.tokenizer.item_tokens == "whole" and data.n_items >= LARGE_CATALOG
                and self.group.is_main):
            log.warning("train.softmax='full' over %d items: every step scores the whole catalog (1.6 s a step at "
                        "1M items on 2 CPU cores); --set train.softmax=sampled trains the same model at ~40 ms a step "
                        "there (benchmarks/README.md)", data.n_items)
        elif (not self.sampled and not self.tcfg.sparse_tables and data.n_items >= LARGE_CATALOG
              and self.group.is_main):
            log.warning("%d items with dense tables: every step updates the whole item table with AdamW (the codes "
                        "preset at 1M items on 2 cores: 302-405 ms a step); --set train.sparse_tables=true updates "
                        "only the batch's rows (64-99 ms)", data.n_items)
        if self.group.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.tokenizer = self._train_tokenizer(preset)
        mcfg = dataclasses.replace(preset.model, vocab_size=self.tokenizer.vocab_size, n_users=data.n_users,
                                   n_items=data.n_items)
        for name in ("history_drop", "history_reorder"):
            if mcfg.encoder_causal and getattr(self.tcfg, name) > 0:
                raise ValueError(f"train.{name} needs model.encoder_causal=False (packed windows keep every item in order)")
        if not mcfg.item_eos and (preset.tokenizer.item_tokens == "pieces" or mcfg.encoder_causal):
            raise ValueError("model.item_eos=False: needs items of one length (tokenizer.item_tokens='whole' "
                             "or 'codes') and model.encoder_causal=False")
        if self.tcfg.mask_seen and (preset.tokenizer.item_tokens != "whole" or mcfg.encoder_causal):
            raise ValueError("train.mask_seen: needs tokenizer.item_tokens='whole' and "
                             "model.encoder_causal=False (one decoder step per item)")
        if mcfg.leaf_head and (preset.tokenizer.item_tokens != "codes" or self.sampled or self.tcfg.mask_seen):
            raise ValueError("model.leaf_head: needs tokenizer.item_tokens='codes', train.softmax='full' and "
                             "train.mask_seen=False")
        if self.tcfg.leaf_smoothing is not None and not mcfg.leaf_head:
            raise ValueError(f"train.leaf_smoothing={self.tcfg.leaf_smoothing!r} smooths the leaf head's softmax: "
                             "it needs model.leaf_head=True (else use train.label_smoothing)")
        if self.tcfg.item_aux and not mcfg.leaf_head:
            raise ValueError(f"train.item_aux={self.tcfg.item_aux!r} trains the leaf head's item vectors: it needs "
                             "model.leaf_head=True")
        tok = preset.tokenizer
        codes_ok = tok.item_tokens == "codes" and mcfg.leaf_head and tok.code_input == "first" and not self.tcfg.item_aux
        if mcfg.history_bias and (not (tok.item_tokens == "whole" or codes_ok) or mcfg.encoder_causal
                                  or self.tcfg.mask_seen):
            raise ValueError("model.history_bias: needs tokenizer.item_tokens='whole' (or 'codes' with "
                             "model.leaf_head, tokenizer.code_input='first' and train.item_aux=0), "
                             "model.encoder_causal=False and train.mask_seen=False")
        if self.tcfg.calibrate and not (mcfg.history_bias or mcfg.transition_bias):
            raise ValueError("train.calibrate: needs model.history_bias or model.transition_bias (the factors "
                             "scale those biases' weights)")
        if mcfg.transition_bias and (not (tok.item_tokens == "whole" or codes_ok) or self.tcfg.mask_seen):
            raise ValueError("model.transition_bias: needs tokenizer.item_tokens='whole' (or 'codes' with "
                             "model.leaf_head, tokenizer.code_input='first' and train.item_aux=0) and "
                             "train.mask_seen=False")
        torch.manual_seed(self.tcfg.seed)
        self.model = GenRec(mcfg).attach_leaves(self.tokenizer).to(self.device)
        self.own_pairs = None
        if self.model.transition is not None:  # from the training sequences only, as the codes
            t0 = time.perf_counter()
            self.model.transition.fit(self.split.train)
            self.own_pairs = OwnPairs(self.split.train, data.n_items, self.model.transition.window)
            self.neighbors = self.model.transition.items.cpu().numpy()  # (n + 1, W)
            if self.group.is_main:
                log.info("transition bias: neighbour table of %d x %d built in %.1f s", *self.neighbors.shape,
                         time.perf_counter() - t0)
        self.group.broadcast_parameters(self.model)
        if self.group.rank:  # dropout: other masks than rank 0's (a single process keeps its generator)
            torch.manual_seed(self.group.torch_seed(self.tcfg.seed))
        # A model trained without user tokens never reads the user table: leave it out of the optimizer.
        self.model.user_embed.weight.requires_grad_(self.tcfg.uses_user_token)
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.opt, self.sparse_opt = self._make_optimizers()
        self.sampler = self._negative_sampler() if self.sampled else None
        self.ema = WeightAverage(self.model, self.tcfg.ema_decay) if self.tcfg.ema_decay else None
        self.epoch, self.step, self.best, self.bad_epochs = 0, 0, -1.0, 0
        self.cut_of: tuple[int, int] | None = None  # (steps done, steps) of an epoch train.max_minutes cut
        self.best_finetune = -1.0  # patience counts finetuning epochs since finetuning's own best (`validate`)
        self.rng = np.random.default_rng(self.tcfg.seed)
        if self.tcfg.finetune_epochs and not any(len(s) >= 2 for s in self.split.train):
            raise ValueError("no finetuning examples: every user's training sequence (the history before its "
                             "validation and test items) holds fewer than 2 items; users need 4 or more items "
                             "(or set train.finetune_epochs=0)")
        self.total_steps = (self.tcfg.pretrain_epochs * self.steps_per_epoch(True)
                            + self.tcfg.finetune_epochs * self.steps_per_epoch(False))  # of the lr schedule
        self.decay_steps = self.total_steps  # where the cosine ends (train.budget_schedule moves it earlier)
        n_eval = self.tcfg.eval_users or data.n_users
        self.eval_users = np.sort(np.random.default_rng(self.tcfg.seed + 1).permutation(data.n_users)[:n_eval])

    def _for_catalog(self, preset: Preset, n_items: int) -> Preset:
        """The preset with its "auto" settings fixed for this catalog (config.for_catalog), logged where they
        take their catalog-scale form."""
        fixed = for_catalog(preset, n_items, LARGE_CATALOG)
        chosen = [f"{key}={now!r} ({undo})" for key, was, now, undo in (
            ("train.softmax", preset.train.softmax, fixed.train.softmax, "train.softmax='full' keeps the full one"),
            ("train.sparse_tables", preset.train.sparse_tables, fixed.train.sparse_tables,
             "as the sampled softmax needs" if fixed.train.softmax == "sampled"
             else "train.sparse_tables=false keeps dense ones"),
            ("tokenizer.code_branches", preset.tokenizer.code_branches, fixed.tokenizer.code_branches,
             f"leaves of <= tokenizer.max_leaf={preset.tokenizer.max_leaf} items; tokenizer.max_leaf=0 keeps "
             f"{preset.tokenizer.code_branches}"))
            if was != now and now not in ("full", False)]
        if chosen and self.group.is_main:
            log.info("%d items, chosen for the catalog's size: %s", n_items, "; ".join(chosen))
        if preset.train.sparse_tables is False and fixed.train.sparse_tables and self.group.is_main:
            log.warning("train.sparse_tables=false: the sampled softmax updates its tables sparsely anyway "
                        "(train.softmax='full' trains dense ones)")
        return fixed

    def _train_tokenizer(self, preset: Preset) -> GenRecTokenizer:
        """Sentencepiece trained on the training part; with several ranks, by rank 0 alone and sent to the others."""
        tok = preset.tokenizer

        def build() -> GenRecTokenizer:
            table = None
            if tok.item_tokens == "codes":  # from the training part only: validation/test items never shape codes
                t0 = time.perf_counter()
                if tok.code_vectors:  # a first-stage one-token model's item vectors
                    vectors = checkpoint_item_vectors(tok.code_vectors, self.catalog.item_ids)
                    table = balanced_codes(vectors, tok.code_levels, tok.code_branches)
                else:
                    table = build_codes(self.split.train, self.data.n_items, tok.code_levels, tok.code_branches,
                                        tok.code_dim, tok.code_window, seed=self.tcfg.seed)
                log.info("item codes: %s values per level, built in %.1f s", (table.max(0) + 1).tolist(),
                         time.perf_counter() - t0)
                warn_large_leaves(table, tok.code_levels, tok.code_branches)
            return GenRecTokenizer.train(self.split.train, self.data.item_codes, tok.vocab_size, tok.item_tokens,
                                         table, tok.code_input)
        if not self.group.enabled:
            return build()
        made = build() if self.group.is_main else None
        proto, table = self.group.broadcast((made.model_proto, getattr(made, "code_table", None)) if made else None)
        return GenRecTokenizer(proto, self.data.item_codes, tok.item_tokens, table, tok.code_input)

    def _make_optimizers(self) -> tuple:
        """AdamW over every trained parameter; with the sampled softmax, the embedding tables (token table =
        LM head, items, users) instead take sparse gradients and a lazy SparseAdam: a step then touches the
        ~1,100 rows of its batch, not a dense update of every row (~0.9 s a step at a million items); with
        train.sparse_tables the item and user tables (the full softmax's LM head stays dense)."""
        m, tables = self.model, []
        sparse = ([m.shared] if self.sampled else []) + (
            [m.item_embed, m.user_embed] if self.sampled or self.tcfg.sparse_tables else [])
        for table in sparse:
            if table.weight.requires_grad:
                table.sparse = True
                tables.append(table.weight)
        dense = [q for q in self.params if not any(q is t for t in tables)]
        opt = torch.optim.AdamW(dense, lr=self.tcfg.lr, weight_decay=self.tcfg.weight_decay,
                                fused=self.device.type in ("cpu", "cuda"))  # one kernel: 3-5x faster step
        return opt, torch.optim.SparseAdam(tables, lr=self.tcfg.lr) if tables else None

    def _negative_sampler(self) -> NegativeSampler:
        """Item shares for the log-Q correction: occurrences in the training part, where every target comes from."""
        counts = np.bincount(np.concatenate([np.zeros(0, np.int64)] + list(self.split.train)),
                             minlength=self.data.n_items)  # (n_items,)
        share = torch.from_numpy(counts / max(1, counts.sum())).to(self.device)
        return NegativeSampler(int(self.tokenizer.item_flat[0]), share, self.tcfg.num_negatives)

    @property
    def optimizers(self) -> list:
        return [self.opt] + ([self.sparse_opt] if self.sparse_opt is not None else [])

    @property
    def total_epochs(self) -> int:
        return self.tcfg.pretrain_epochs + self.tcfg.finetune_epochs

    def recommender(self) -> Recommender:
        return Recommender(self.model, self.tokenizer, self.catalog, self.tcfg.max_items,
                           use_users=self.tcfg.uses_user_token, exclude_seen=self.tcfg.mask_seen)

    def run(self) -> dict:
        t0, epoch_s = time.perf_counter(), 0.0
        # rank 0's clock decides for every rank (their clocks, hence time budgets, differ)
        deadline = t0 + 60 * self.tcfg.max_minutes if self.tcfg.max_minutes else None
        while (stop := self.group.broadcast(self._stop_reason(time.perf_counter() - t0, epoch_s))) is None:
            start, first_step = time.perf_counter(), self.step
            pretrain = self.epoch < self.tcfg.pretrain_epochs
            loss = self.train_epoch(pretrain, deadline)
            row = {"epoch": self.epoch + 1, "phase": "pretrain" if pretrain else "finetune", "loss": loss,
                   "lr": self.opt.param_groups[0]["lr"], "elapsed_s": round(time.perf_counter() - t0, 1)}
            if self.cut_of is not None:  # the budget ended the epoch (the run's last): counted as done
                row["cut_after_steps"] = self.cut_of[0]
            if self._validates_after(self.epoch + 1) or self.cut_of is not None:
                row["valid"] = self.validate()
            self.epoch += 1
            self._log(row)
            self._save("last", with_state=True)
            epoch_s = time.perf_counter() - start
            if self.tcfg.budget_schedule and self.tcfg.max_minutes:  # rank 0's plan, as its clock stops the run
                self.decay_steps = self.group.broadcast(self._budget_plan(time.perf_counter() - t0, epoch_s,
                                                                          self.step - first_step))
        if self.best < 0:  # stopped (time budget) before any validation: keep the last weights as best
            self._log({"epoch": self.epoch, "phase": "final validation", "valid": self.validate()})
        if self.cut_of is not None and self.group.is_main:
            log.info("epoch %d cut after %d of its %d steps: train.max_minutes=%g passed", self.epoch, *self.cut_of,
                     self.tcfg.max_minutes)
        elif stop == "max_minutes" and self.group.is_main:
            log.info("stopped after epoch %d: another epoch (%.0f s) would pass train.max_minutes=%g",
                     self.epoch, epoch_s, self.tcfg.max_minutes)
        return {"epochs": self.epoch, "stopped_by": stop, "train_seconds": round(time.perf_counter() - t0, 1),
                "best_valid_ndcg10": self.best}

    def _budget_plan(self, elapsed_s: float, epoch_s: float, epoch_steps: int) -> int:
        """The step train.max_minutes is expected to end the run at (at most the schedule's last step)."""
        coming = [self.steps_per_epoch(e < self.tcfg.pretrain_epochs) for e in range(self.epoch, self.total_epochs)]
        planned = budget_steps(self.step, self.tcfg.max_minutes * 60 - elapsed_s, epoch_s / max(1, epoch_steps),
                               coming)
        return min(self.total_steps, planned)

    def _validates_after(self, epoch: int) -> bool:
        every = epoch > self.tcfg.eval_from and epoch % self.tcfg.eval_every == 0
        return every or epoch == self.total_epochs

    def _stop_reason(self, elapsed_s: float, last_epoch_s: float) -> str | None:
        """Why no further epoch starts, or None. The time budget starts no epoch that the last epoch's duration
        says would end past it (the first epoch of a run always starts; `train_epoch` cuts one that overruns)."""
        if self.epoch >= self.total_epochs:
            return "schedule"
        if self.bad_epochs >= self.tcfg.patience:
            return "patience"
        if self.tcfg.max_minutes and last_epoch_s and elapsed_s + last_epoch_s > self.tcfg.max_minutes * 60:
            return "max_minutes"
        return None

    def steps_per_epoch(self, pretrain: bool) -> int:
        """Optimizer steps of one epoch (the cloze mix counted at its expected size)."""
        bs, n_items = self.tcfg.batch_size, sum(len(s) for s in self.split.train)
        if pretrain:
            return math.ceil(n_items / bs)
        cloze = math.ceil(self.tcfg.cloze_mix * n_items / bs)
        if self.model.cfg.encoder_causal:
            return math.ceil(sum(len(s) >= 2 for s in self.split.train) / bs) + cloze
        return math.ceil(sum(max(0, len(s) - 1) for s in self.split.train) / bs) + cloze

    def epoch_batches(self, pretrain: bool) -> list:
        """The epoch's batches as lists of examples or windows, in random order (turned into tensors lazily)."""
        causal = self.model.cfg.encoder_causal and not pretrain
        examples = make_examples(self.split, self.rng, pretrain, self.tcfg, next_items=not causal)
        parts = _length_buckets(examples, self.tcfg.batch_size, self.rng)
        if causal:
            parts += _length_buckets(make_windows(self.split, self.rng, self.tcfg), self.tcfg.batch_size, self.rng)
            parts = [parts[i] for i in self.rng.permutation(len(parts))]
        return parts

    def train_epoch(self, pretrain: bool, deadline: float | None = None) -> float:
        """One epoch of optimizer steps; the mean loss. `deadline` (time.perf_counter()): the epoch ends at the
        first step that starts past it (after one step at least; with several ranks, rank 0's clock, asked
        every CUT_EVERY steps), so a time budget also cuts an epoch longer than itself."""
        self.model.train()
        self.cut_of = None
        warmup = min(self.tcfg.warmup_steps, self.total_steps // 10 + 1)  # short runs still leave warm-up
        losses = []
        parts = self.epoch_batches(pretrain)
        bar = tqdm(parts, desc=f"epoch {self.epoch + 1}/{self.total_epochs}", disable=None if self.progress else True,
                   leave=False)  # None: bars only on a terminal, never carriage returns in a log file
        for i, part in enumerate(bar):
            if deadline is not None and i and self._past(deadline, i):
                self.cut_of = (i, len(parts))  # (steps done, steps of the epoch)
                break
            for opt in self.optimizers:
                for g in opt.param_groups:
                    g["lr"] = self.tcfg.lr * lr_factor(self.step, warmup, self.decay_steps)
            loss = self._backward_shard(part) if self.group.enabled else self._backward(part)
            if self.sparse_opt is None:
                torch.nn.utils.clip_grad_norm_(self.params, self.tcfg.grad_clip)
            else:
                clip_grad_norm(self.params, self.tcfg.grad_clip)
            for opt in self.optimizers:
                opt.step()
            if self.ema is not None:
                self.ema.update()
            self.step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        return float(np.mean(losses)) if losses else float("nan")

    def _past(self, deadline: float, i: int) -> bool:
        if not self.group.enabled:
            return time.perf_counter() > deadline
        return i % CUT_EVERY == 0 and self.group.broadcast(time.perf_counter() > deadline)

    def _loss(self, part: list, batch_targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mean loss over the targets of `part`, labels). batch_targets: the sampled softmax's in-batch
        candidates when `part` is one rank's shard of a larger batch (default: part's own targets)."""
        kwargs, labels = to_batch(part, self.tokenizer, self.model.cfg, self.device)
        seen = seen_tokens(part, self.tokenizer, self.device) if self.tcfg.mask_seen else None
        biased = self.model.history is not None or self.model.transition is not None
        if self.sampled:
            loss = self._sampled_loss(kwargs, labels, batch_targets, self._transition_inputs(part, kwargs))
        elif biased and self.model.cfg.leaf_head:  # the same at every code step
            loss = self.model.codes_history_loss(**kwargs, labels=labels, smoothing=self.tcfg.label_smoothing,
                                                 ignore_index=IGNORE, leaf_smoothing=self.tcfg.leaf_smoothing,
                                                 transition=self._transition_inputs(part, kwargs))
        elif biased:  # the fused head + loss with the biases' sparse offsets
            loss = self.model.history_loss(**kwargs, labels=labels, smoothing=self.tcfg.label_smoothing,
                                           ignore_index=IGNORE, first_item=self.tokenizer.sp.get_piece_size(),
                                           transition=self._transition_inputs(part, kwargs))
        elif seen is None:  # the fused head + loss: the step's largest cost on a CPU, ~1/4 less
            loss = self.model.head_loss(self.model.hidden(**kwargs), labels, self.tcfg.label_smoothing, IGNORE,
                                        self.tcfg.leaf_smoothing, self.tcfg.item_aux)
        else:
            loss = item_cross_entropy(self.model(**kwargs), labels, self.tcfg.label_smoothing, seen, IGNORE)
        return loss, labels

    def _transition_inputs(self, part: list, batch: dict) -> tuple | None:
        """The transition bias's inputs of a batch: the items before each `<mask>` (B, R) and the counts of the
        example's own user (B, R, W), which its feature must not see (transition_bias.OwnPairs)."""
        if self.model.transition is None:
            return None
        until = mask_positions(batch["tokens"], self.tokenizer.mask_id)  # (B,)
        context = context_items(batch["item_ids"], batch["mask"], self.model.transition.context, until)  # (B, R)
        ctx = context.cpu().numpy()
        nbr = self.neighbors[np.where(ctx >= 0, ctx, len(self.neighbors) - 1)]  # (B, R, W)
        owner = np.array([e.owner for e in part], dtype=np.int64)
        own = self.own_pairs.table_counts(owner, ctx, nbr, self.model.transition.neighbors)  # (B, R, W)
        own = torch.from_numpy(own).to(self.device)
        return context, own

    def _backward(self, part: list) -> torch.Tensor:
        """Gradients of the batch's mean loss (one process); returns the loss."""
        loss, _ = self._loss(part)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def _backward_shard(self, part: list) -> torch.Tensor:
        """Gradients of the global batch `part`'s mean loss, from this rank's share of it and the others'
        (`Group.reduce_gradients`); returns that loss. A rank whose share is empty (a batch with fewer
        examples than ranks) runs the first example with weight 0, so every rank has the same gradients
        to sum. The sampled softmax draws its candidates from the targets of the whole batch, as one
        process does."""
        shard = self.group.shard(part)
        batch_targets = target_tokens(part, self.tokenizer, self.model.cfg, self.device) if self.sampled else None
        loss, labels = self._loss(shard or part[:1], batch_targets)
        n_targets = (labels != IGNORE).sum() * bool(shard)  # () the rank's targets, the weight of its mean loss
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        return self.group.reduce_gradients(self.params, n_targets, loss)

    def _sampled_loss(self, kwargs: dict, labels: torch.Tensor, batch_targets: torch.Tensor | None = None,
                      transition: tuple | None = None) -> torch.Tensor:
        """Softmax over the batch's targets and `num_negatives` drawn items (one decoder step per target); with
        the history / transition bias, each row's biased items are classes of its softmax too, with their offsets
        (`sampled_cross_entropy(offsets=...)`)."""
        m = self.model
        memory = m.encode(kwargs["tokens"], kwargs["user_ids"], kwargs["item_ids"], kwargs["mask"])  # (B, S, C)
        hidden = m.decode_hidden(kwargs["decoder_tokens"], memory, kwargs["mask"])[:, 0]  # (B, C)
        offsets = None
        if m.history is not None or m.transition is not None:
            offsets = m.bias_offsets(hidden, memory, kwargs["tokens"], kwargs["item_ids"], kwargs["mask"],
                                     self.sampler.first_item, transition)
        y = labels[:, 0]  # (B,) item tokens
        candidates, log_q = self.sampler.draw(y if batch_targets is None else batch_targets, self.rng)  # (M,), (M,)
        return sampled_cross_entropy(hidden, m.shared.weight, m.final_logits_bias[0], y, candidates, log_q,
                                     self.tcfg.label_smoothing, IGNORE, sparse=True, offsets=offsets)

    def validate(self) -> dict:
        """Validation NDCG@10 of the weights the run keeps (the average with train.ema_decay); saves `best`."""
        with self._kept_weights():
            m = self._evaluate_valid(model_ranker(self.recommender(), self.tcfg.num_beams))
            if m["NDCG@10"] > self.best:  # every rank holds the same m: the same decision everywhere
                self.best = m["NDCG@10"]
                self._save("best")
            # Patience: finetuning epochs since the best finetuning one. A pretraining epoch can hold the best
            # validation (Yelp peaks in its first) and `best` keeps it, but it never stops finetuning early.
            if self.epoch >= self.tcfg.pretrain_epochs:  # the 0-based epoch just trained was a finetuning one
                if m["NDCG@10"] > self.best_finetune:
                    self.best_finetune, self.bad_epochs = m["NDCG@10"], 0
                else:
                    self.bad_epochs += 1
        return m

    def _evaluate_valid(self, ranker) -> dict:
        """Validation metrics of the sampled users; with several ranks each ranks its share of them and
        every rank receives the combined metrics."""
        if not self.group.enabled:  # a mask_seen model is only used excluding seen
            return evaluate(ranker, self.split, "valid", self.eval_users, exclude_seen=self.tcfg.mask_seen,
                            progress=self.progress, desc="validate")
        users = self.group.shard(self.eval_users)
        m = evaluate(ranker, self.split, "valid", users, exclude_seen=self.tcfg.mask_seen, progress=self.progress,
                     desc="validate") if len(users) else None
        return distributed.combine_metrics(self.group.all_gather(m))

    def _kept_weights(self):
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _save(self, name: str, with_state: bool = False) -> None:
        """Write the checkpoint `out_dir/name` (rank 0); with_state adds train_state.pt, which every rank must
        call for (the ranks' torch generator states are gathered)."""
        torch_rng = self._torch_rng_states() if with_state else None
        if not self.group.is_main:
            return
        state = None
        if with_state:
            state = {"optimizer": self.opt.state_dict(), "epoch": self.epoch, "step": self.step, "best": self.best,
                     "bad_epochs": self.bad_epochs, "best_finetune": self.best_finetune,
                     "rng": json.dumps(self.rng.bit_generator.state), "torch_rng": torch_rng}
            if self.sparse_opt is not None:
                state["sparse_optimizer"] = self.sparse_opt.state_dict()
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
        checkpoint.save(self.out / name, self.model, self.tokenizer, self.catalog, self.tcfg, state, info=self.info())

    def _torch_rng_states(self) -> list[dict]:
        """Every rank's torch generator states, [rank] -> {"cpu": ..., "cuda": ... on a CUDA device} (uint8
        tensors): the dropout masks, which differ per rank, go on from them after a resume."""
        own = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            own["cuda"] = torch.cuda.get_rng_state(self.device)
        return self.group.all_gather(own)

    def _restore_torch_rng(self, states: list[dict] | None) -> None:
        """This rank's torch generators as `_torch_rng_states` saved them. A state written before they were
        saved, or by fewer ranks than this rank's number, leaves the generator as seeded (dropout masks then
        differ from an uninterrupted run's); a CUDA state is restored on a CUDA device only."""
        if not states or self.group.rank >= len(states):
            return
        own = states[self.group.rank]
        torch.set_rng_state(own["cpu"])
        if "cuda" in own and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda"], self.device)

    def info(self) -> dict:
        """What a checkpoint records of the data it was trained on."""
        return {"data": self.data.name, "n_users": self.data.n_users, "n_items": self.data.n_items}

    def _log(self, row: dict) -> None:
        if not self.group.is_main:
            return
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        with (self.out / "log.jsonl").open("a") as f:  # (a NaN loss as null: the file stays JSON)
            f.write(json.dumps(finite) + "\n")
        v = row.get("valid", {})
        log.info("epoch %d %s%s%s", row["epoch"], row["phase"], f" loss {row['loss']:.4f}" if "loss" in row else "",
                 f" valid NDCG@10 {v['NDCG@10']:.4f} HR@10 {v['HR@10']:.4f}" if v else "")

    def resume(self) -> None:
        """Continue from `out_dir/last` (weights, optimizer, epoch, best score, numpy's and torch's generators);
        every rank reads it. The model config must be the one `last` was trained with (a ValueError names the
        fields that differ); train fields may change (a longer schedule), those that do are logged."""
        last = self.out / "last"
        model, tokenizer, catalog, train_cfg, _ = checkpoint.load_parts(last, self.device)
        if catalog.item_ids != self.catalog.item_ids or catalog.user_ids != self.catalog.user_ids:
            raise ValueError(f"resume: {last} was trained on other data (item or user ids differ)")
        changes = self._config_changes(model.cfg, tokenizer, train_cfg)
        if changes:
            raise ValueError(f"resume: {last} was trained with another configuration ({'; '.join(changes)}); "
                             f"repeat the run's --config and --set (its config is {last / 'config.json'})")
        self._log_train_changes(train_cfg)
        state = checkpoint.load_train_state(last)
        if state is None:
            raise FileNotFoundError(f"resume: {last} has no train_state.pt")
        if ("sparse_optimizer" in state) != (self.sparse_opt is not None):
            how = "with" if "sparse_optimizer" in state else "without"
            raise ValueError(f"resume: {last} was trained {how} sparse tables (train.softmax='sampled' or "
                             "train.sparse_tables=true); resume it with the same settings")
        self.model.load_state_dict(model.state_dict())
        self.tokenizer = tokenizer
        self.opt.load_state_dict(state["optimizer"])
        if self.sparse_opt is not None:
            self.sparse_opt.load_state_dict(state["sparse_optimizer"])
        self.epoch, self.step, self.best, self.bad_epochs = (state["epoch"], state["step"], state["best"],
                                                             state["bad_epochs"])
        self.best_finetune = state.get("best_finetune", self.best)  # states written before it: the old rule
        self.rng.bit_generator.state = json.loads(state["rng"])
        self._restore_torch_rng(state.get("torch_rng"))  # (absent from states written before it was saved)
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError(f"resume: {last} was trained without train.ema_decay; resume it without it")
            self.ema.load_state_dict(state["ema"])

    def _config_changes(self, model_cfg: ModelConfig, tokenizer: GenRecTokenizer,
                        train_cfg: TrainConfig | None) -> list[str]:
        """'section.field saved -> now' for each setting of a saved run that this run cannot continue with: any
        model field (the weights' shapes, or the function they were trained for), the tokenizer's item form,
        and whether the user table trains (train.drop_user_prob = 1: the optimizer's parameters differ)."""
        out = _field_changes("model", model_cfg, self.model.cfg)
        out += [f"tokenizer.{k} {getattr(tokenizer, k)!r} -> {getattr(self.tokenizer, k)!r}"
                for k in ("item_tokens", "code_input") if getattr(tokenizer, k) != getattr(self.tokenizer, k)]
        if train_cfg is not None and train_cfg.uses_user_token != self.tcfg.uses_user_token:
            out.append(f"train.drop_user_prob {train_cfg.drop_user_prob!r} -> {self.tcfg.drop_user_prob!r}")
        return out

    def _log_train_changes(self, train_cfg: TrainConfig | None) -> None:
        """Log the train fields a resume changes (a longer schedule, another learning rate: allowed)."""
        if train_cfg is None or not self.group.is_main:
            return
        changed = _field_changes("train", train_cfg, self.tcfg)
        if changed:
            log.info("resume: train settings changed since %s: %s", self.out / "last", "; ".join(changed))


def _field_changes(section: str, saved, now) -> list[str]:
    """'section.field saved -> now' for each field of the dataclass `saved` that `now` holds otherwise."""
    saved, now = dataclasses.asdict(saved), dataclasses.asdict(now)
    return [f"{section}.{k} {saved[k]!r} -> {now[k]!r}" for k in saved if saved[k] != now.get(k)]


def warn_large_leaves(table: np.ndarray, levels: int, branches: int) -> None:
    """A code table (n_items, levels + 1) whose leaves are large (the leaf head scores every item of a leaf per
    beam, so a leaf of thousands makes decoding slow) -> a warning naming the tokenizer.code_branches to use."""
    largest = int(table[:, -1].max()) + 1
    if largest >= LARGE_LEAF:
        log.warning("item codes: leaves of up to %d items (%d items, tokenizer.code_branches=%d); decoding scores "
                    "a whole leaf per beam: --set tokenizer.code_branches=%d gives leaves of ~%d", largest,
                    len(table), branches, branches_for(len(table), levels), LEAF_ITEMS)


def check_sampled_softmax(preset: Preset) -> None:
    """ValueError, naming the field, unless the configuration has one item token per target."""
    missing = sampled_softmax_needs(preset)
    if missing:
        raise ValueError(f"train.softmax='sampled' needs {' and '.join(missing)}")


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (2-norm) that also takes sparse gradients: each is coalesced first
    (its repeated rows summed), so its norm is that of the dense gradient it stands for."""
    grads = []
    for q in params:
        if q.grad is not None and q.grad.is_sparse:
            q.grad = q.grad.coalesce()
        if q.grad is not None:
            grads.append(q.grad)
    norms = [torch.linalg.vector_norm(g.values() if g.is_sparse else g) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef)
    return total


def plot_curves(out_dir: str | Path) -> Path:
    """curves.png: training loss and validation NDCG@10/HR@10 per epoch, from log.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(x) for x in (Path(out_dir) / "log.jsonl").read_text().splitlines() if x.strip()]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    trained = [r for r in rows if "loss" in r]  # not the final validation of a run cut by its time budget
    a.plot([r["epoch"] for r in trained], [math.nan if r["loss"] is None else r["loss"] for r in trained], marker="o")
    a.set(xlabel="epoch", ylabel="training loss", title="masked item prediction loss")
    ev = [r for r in rows if "valid" in r]
    for key in ("NDCG@10", "HR@10"):
        b.plot([r["epoch"] for r in ev], [r["valid"][key] for r in ev], marker="o", label=key)
    b.set(xlabel="epoch", title="validation (sampled users)")
    b.legend()
    fig.tight_layout()
    path = Path(out_dir) / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@contextlib.contextmanager
def cuda_matmul_tf32(enabled: bool):
    """CUDA float32 matmuls on TF32 tensor cores inside the block; the global flag is restored after."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def train(data: SequenceData, out_dir: str | Path, preset: Preset, device: str = "cpu", resume: bool = False,
          progress: bool = True, overwrite: bool = False) -> Recommender | None:
    """Train, keep the best checkpoint in `out_dir/best`, and return it loaded.

    An out_dir that holds a run (best/ or last/) is an error unless `resume` continues it or `overwrite` trains
    over it (its checkpoints are replaced as the new run writes). Progress bars unless `progress=False`; the
    epochs' metrics, the choices made for the catalog and calibration are `logging` INFO lines of
    "genrec_fast.train" (`logging.basicConfig(level=logging.INFO)` shows them; the CLI does).
    Under torchrun (WORLD_SIZE > 1) every process calls this with the same arguments: they train together
    (cuda becomes cuda:LOCAL_RANK), rank 0 writes every file and returns the model, the others return None."""
    preset = _check_train_args(data, out_dir, preset, device, resume, overwrite)
    if preset.train.threads:
        torch.set_num_threads(preset.train.threads)
    with distributed.session(device) as (group, device):
        trainer = Trainer(data, out_dir, preset, device, progress, group)
        if resume:
            trainer.resume()
        elif group.is_main and (Path(out_dir) / "log.jsonl").exists():
            (Path(out_dir) / "log.jsonl").unlink()
        with cuda_matmul_tf32(preset.train.tf32 and trainer.device.type == "cuda"):
            summary = trainer.run()
    if not group.is_main:
        return None
    from .recommend import load
    rec = load(Path(out_dir) / "best", device)
    if preset.train.calibrate:  # the kept model's bias weights, fitted on the validation targets (in place)
        summary["calibration"] = _calibrate_best(trainer, rec, progress)
    (Path(out_dir) / "train_summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(out_dir)
    return rec


def _check_train_args(data, out_dir, preset, device, resume: bool, overwrite: bool) -> Preset:
    """`train`'s arguments checked before any work -> the preset, re-checked as a whole (`config.checked`)."""
    if not isinstance(data, SequenceData):
        raise TypeError(f"data: expected a SequenceData (genrec_fast.load_p5, load_csv, load_parquet, load_movielens "
                        f"read one), got {type(data).__name__}")
    if not isinstance(out_dir, (str, Path)):
        raise TypeError(f"out_dir: expected a directory path, got {type(out_dir).__name__}")
    check_device(device)
    check_run_dir(out_dir, resume, overwrite)
    return checked(preset)


def check_run_dir(out_dir: str | Path, resume: bool, overwrite: bool,
                  names: tuple = ("out_dir", "resume=True", "overwrite=True")) -> None:
    """resume and overwrite not both, and an out_dir holding a run (best/ or last/) only with one of them:
    a ValueError / FileExistsError otherwise, naming the arguments as `names` spells them (the CLI's flags)."""
    out, res, over = names
    if resume and overwrite:
        raise ValueError(f"{res.split('=')[0]}, {over.split('=')[0]}: expected one of them ({res} continues the run "
                         f"in {out}, {over} replaces it)")
    held = [n + "/" for n in ("best", "last") if (Path(out_dir) / n).exists()]
    if held and not (resume or overwrite):
        raise FileExistsError(f"{out} {out_dir}: holds a run already ({', '.join(held)}); {res} continues it, "
                              f"{over} replaces it, or name another {out}")


def _calibrate_best(trainer: Trainer, rec: Recommender, progress: bool) -> dict:
    """Fit the bias factors of `best/` (loaded as `rec`, scaled in place) on the validation targets; if they are
    applied, best/ is rewritten with them, its info recording the calibration. A best/ that records one already
    holds scaled weights (a resumed run none of whose epochs beat it): it is kept as it is and its record
    returned, so the factors always come from the trained weights and never multiply over resumes."""
    recorded = calibration_of(trainer.out / "best")
    if recorded is not None:
        log.info("calibration: %s is calibrated already (factors %s), kept as it is", trainer.out / "best",
                 recorded.get("scales"))
        return dict(recorded, reused=True)
    from .calibrate import calibrate
    t0 = time.perf_counter()
    out = calibrate(rec, trainer.split, progress=progress)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    if out["applied"]:
        checkpoint.save(trainer.out / "best", rec.model, trainer.tokenizer, trainer.catalog, trainer.tcfg,
                        info=dict(trainer.info(), calibration=out))
    log.info("calibration: factors %s (%s), held-out validation NDCG@10 %.4f -> %.4f", out["scales"],
             "applied" if out["applied"] else "not applied: no held-out gain", out["heldout_ndcg10"]["before"],
             out["heldout_ndcg10"]["after"])
    return out


def calibration_of(path: str | Path) -> dict | None:
    """The calibration a checkpoint's config.json records in its info (written by `train.calibrate` or
    `genrec-fast calibrate`: its weights are the scaled ones), or None."""
    return (json.loads((Path(path) / "config.json").read_text()).get("info") or {}).get("calibration")
