"""Training loss: token cross-entropy with label smoothing, optionally without the input's own items, over
all tokens (chunked: `linear_cross_entropy`) or over sampled candidate items (`sampled_cross_entropy`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .row_pairs import RowPairs


def seen_mask(seen: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool, True for the tokens in `seen` (B, S) except the first target token of each row.

    Padding in `seen` may use any token that is never a target (PAD)."""
    mask = torch.zeros(seen.shape[0], vocab_size, dtype=torch.bool, device=seen.device)
    mask.scatter_(1, seen, True)
    first = labels[:, :1]  # (B, 1)
    mask.scatter_(1, first.clamp_min(0), first < 0)  # the target itself always stays a class
    return mask


def item_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0,
                       seen: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against labels (B, T), `ignore_index` = padding.

    seen (B, S): token ids left out of the softmax at the first decoder step (the item's token), as if
    the vocabulary had no such classes; label smoothing then spreads over the remaining classes only.
    Meant for data where a user never takes an item twice: the model need not learn to rank its own
    history low, and is used with `exclude_seen` when recommending.
    """
    if seen is None:
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                               label_smoothing=smoothing)
    mask = seen_mask(seen, labels, logits.shape[-1])  # (B, V)
    z, y = logits[:, 0], labels[:, 0]  # (B, V), (B,)
    idx = y.clamp_min(0)[:, None]  # (B, 1)
    logp_y = z.masked_fill(mask, float("-inf")).log_softmax(-1).gather(1, idx)[:, 0]
    nll = -logp_y  # (B,)
    lse = z.gather(1, idx)[:, 0] - logp_y  # (B,) log-normaliser over the kept classes
    kept_mean = z.masked_fill(mask, 0.0).sum(-1) / (~mask).sum(-1)  # (B,) mean logit of the kept classes
    terms = [((1 - smoothing) * nll + smoothing * (lse - kept_mean))[y != ignore_index]]
    if logits.shape[1] > 1:  # later steps (EOS after the item) keep every class
        rest = labels[:, 1:].flatten()
        ce = F.cross_entropy(logits[:, 1:].flatten(0, 1), rest, ignore_index=ignore_index,
                             label_smoothing=smoothing, reduction="none")
        terms.append(ce[rest != ignore_index])
    return torch.cat(terms).mean()


class _LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ weight.T + bias, labels, label_smoothing) for rows that all count, computed
    `chunk` rows at a time; the gradients are formed in the forward pass, so the (N, V) logits never
    exist whole and are read a few times instead of a dozen (the LM head is most of a small model's step)."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, smoothing, chunk, tokens=None, offsets=None):
        n, vocab = x.shape[0], weight.shape[0]
        grad_o = torch.empty_like(offsets) if offsets is not None and ctx.needs_input_grad[7] else None  # (N, S)
        grad_x = torch.empty_like(x)  # (N, C)
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None  # (V, C)
        grad_b = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None  # (V,)
        total = x.new_zeros((), dtype=torch.float64)
        for s in range(0, n, chunk):
            xs, ys = x[s:s + chunk], labels[s:s + chunk, None]  # (c, C), (c, 1)
            z = xs @ weight.t() if bias is None else torch.addmm(bias, xs, weight.t())  # (c, V) logits
            if offsets is not None:  # sparse logit offsets (history_bias.py), summed over repeated tokens
                z.scatter_add_(1, tokens[s:s + chunk], offsets[s:s + chunk].to(z.dtype))
            top = z.amax(1, keepdim=True)  # (c, 1)
            zy, zmean = z.gather(1, ys), z.mean(1, keepdim=True)  # (c, 1) target and mean logit
            e = z.sub_(top).exp_()  # (c, V), in place of the logits
            total_e = e.sum(1, keepdim=True)  # (c, 1)
            lse = top + total_e.log()  # (c, 1)
            total += ((1 - smoothing) * (lse - zy) + smoothing * (lse - zmean)).sum().double()
            g = e.mul_(total_e.reciprocal_())  # (c, V) softmax
            if smoothing:
                g.sub_(smoothing / vocab)
            g.scatter_add_(1, ys, g.new_full(ys.shape, smoothing - 1))  # softmax - smoothed one-hot
            torch.mm(g, weight, out=grad_x[s:s + chunk])
            if grad_o is not None:
                grad_o[s:s + chunk] = g.gather(1, tokens[s:s + chunk])
            if grad_w is not None:
                grad_w.addmm_(g.t(), xs)
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_x, grad_w, grad_b, grad_o)
        ctx.n = n
        return (total / n).to(x.dtype) if n else x.new_tensor(float("nan"))

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, grad_b, grad_o = ctx.saved_tensors
        scale = grad_out / ctx.n
        return (grad_x * scale, None if grad_w is None else grad_w * scale,
                None if grad_b is None else grad_b * scale, None, None, None, None,
                None if grad_o is None else grad_o * scale)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                         smoothing: float = 0.0, ignore_index: int = -100, chunk: int | None = None,
                         offsets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits x (N, C) @ weight (V, C).T + bias (V,) against labels (N,),
    `ignore_index` = padding: the value and gradients of
    `F.cross_entropy(F.linear(x, weight, bias), labels, ignore_index=..., label_smoothing=smoothing)`
    (the reference, tested) without materialising the (N, V) logits. `chunk` rows at a time: by default
    32 on a CPU (a 32 x V block stays in cache; measured fastest of 8-128 on Beauty's V = 13,101), 4,096 on
    a GPU (where small kernels would starve it). offsets: (tokens (N, S), values (N, S)) added to the
    logits first, `history_bias.biased_logits`'s sparse offsets (differentiable in the values)."""
    chunk = chunk if chunk is not None else 32 if x.device.type == "cpu" else 4096
    if x.dim() != 2 or labels.shape != x.shape[:1] or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"expected x (N, C), weight (V, C), labels (N,); got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}, labels {tuple(labels.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    keep = labels != ignore_index  # (N,)
    rows = keep.nonzero()[:, 0]  # (n,)
    tokens, values = (None, None) if offsets is None else (t.index_select(0, rows) for t in offsets)
    return _LinearCrossEntropy.apply(x.index_select(0, rows), weight, bias, labels[rows], smoothing, chunk,
                                     tokens, values)


def sampled_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                          candidates: torch.Tensor, log_q: torch.Tensor | None = None, smoothing: float = 0.0,
                          ignore_index: int = -100, sparse: bool = False,
                          offsets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean cross-entropy of x (N, C) against labels (N,) over the classes `candidates` (M,) instead of all V:
    logits x @ weight[candidates].T + bias[candidates] - log_q (N, M), log_q (M,) = log of each candidate's
    expected count in the sample (the correction that makes a sampled softmax estimate the full one).

    Row n's class is the first column holding labels[n] (every label must be a candidate); the other
    columns holding it (accidental hits) leave that row's softmax, and label smoothing spreads over the
    row's remaining columns. All V classes once and no log_q: the full softmax,
    `F.cross_entropy(F.linear(x, weight, bias), labels, label_smoothing=smoothing)` (tested), as is the
    per-row reference in tests/test_loss.py. sparse=True: weight's gradient is sparse (the M candidate
    rows), for torch.optim.SparseAdam.

    offsets: (tokens (N, S), values (N, S)), the biases' sparse logit offsets (`linear_cross_entropy`'s; token
    -1 = none, values summed over a row's repeats). Each row's offset tokens are classes of that row's softmax
    always (included with probability 1: no log_q), with their offsets added; a shared candidate equal to one
    of them leaves the row (so no class counts twice), and the label's class is its offset column if it has
    one. With all V classes as candidates this is `linear_cross_entropy(..., offsets=...)` (tested).
    """
    if (x.dim() != 2 or labels.shape != x.shape[:1] or candidates.dim() != 1 or weight.dim() != 2
            or weight.shape[1] != x.shape[1]):
        raise ValueError(f"expected x (N, C), weight (V, C), labels (N,), candidates (M,); got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}, "
                         f"candidates {tuple(candidates.shape)}")
    rows = (labels != ignore_index).nonzero()[:, 0]  # (n,)
    if len(rows) == 0:
        return x.new_tensor(float("nan"))  # as the mean of no rows (linear_cross_entropy, F.cross_entropy)
    x, labels = x.index_select(0, rows), labels[rows]  # (n, C), (n,)
    hit = candidates[None, :] == labels[:, None]  # (n, M)
    extra = None if offsets is None else _row_classes(x, weight, bias, labels, rows, *offsets, sparse)
    has_label = hit.any(1) if extra is None else hit.any(1) | extra.label_col.ge(0)
    if not bool(has_label.all()):
        raise ValueError("candidates: every label must be one of the candidates")
    pos = hit.byte().argmax(1, keepdim=True)  # (n, 1) the first column holding the label
    removed = hit.scatter(1, pos, False)  # (n, M) accidental hits
    z = x @ F.embedding(candidates, weight, sparse=sparse).t()  # (n, M)
    if bias is not None:
        z = z + bias[candidates]
    if log_q is not None:
        z = z - log_q.to(z.dtype)
    if extra is not None:  # the rows' offset classes after the shared ones; duplicates of them leave the row
        removed = removed | extra.holds(candidates)  # (the label's shared columns too, if it has one)
        pos = torch.where(extra.label_col.ge(0), z.shape[1] + extra.label_col, pos[:, 0])[:, None]
        z = torch.cat([z, extra.z], 1)  # (n, M + W)
        removed = torch.cat([removed, extra.pad], 1)
    z = z.masked_fill(removed, float("-inf"))
    lse = z.logsumexp(1)  # (n,)
    kept_mean = z.masked_fill(removed, 0.0).sum(1) / (~removed).sum(1)  # (n,) mean logit of the row's classes
    loss = (1 - smoothing) * (lse - z.gather(1, pos)[:, 0]) + smoothing * (lse - kept_mean)  # (n,)
    return loss.mean()


@dataclass
class _RowClasses:
    """Each row's own offset classes, padded: logits z (n, W) (-inf at the padding), pad (n, W) bool, the label's
    column among them (n,) (-1 = none), and `holds(candidates)` -> (n, M) whether a row has that class."""

    z: torch.Tensor
    pad: torch.Tensor
    label_col: torch.Tensor
    pairs: RowPairs

    def holds(self, candidates: torch.Tensor) -> torch.Tensor:
        n, M = self.z.shape[0], len(candidates)
        rows = torch.arange(n, device=candidates.device)[:, None].expand(n, M)
        return self.pairs.find(rows, candidates[None].expand(n, M))[1]


def _row_classes(x, weight, bias, labels, rows, tokens, values, sparse: bool) -> _RowClasses:
    """`sampled_cross_entropy`'s offset classes of the kept rows (x (n, C) = the input's rows `rows`)."""
    tokens, values = tokens.index_select(0, rows), values.index_select(0, rows)  # (n, S)
    pairs = RowPairs([tokens], weight.shape[0])  # (Q,) each row's distinct tokens
    z = (x.index_select(0, pairs.row) * F.embedding(pairs.col, weight, sparse=sparse)).sum(1)  # (Q,)
    z = z + pairs.sums(tokens, values).to(x.dtype)  # the offsets, summed over a row's repeats
    if bias is not None:
        z = z + bias[pairs.col]
    at, found = pairs.find(torch.arange(len(labels), device=x.device), labels)  # (n,)
    label_col = torch.where(found, pairs.slot[at], -1) if len(pairs.keys) else torch.full_like(labels, -1)
    pad = pairs.padded(torch.zeros(len(pairs.keys), dtype=torch.bool, device=x.device), True)  # (n, W)
    return _RowClasses(pairs.padded(z, float("-inf")), pad, label_col, pairs)


@dataclass
class NegativeSampler:
    """Candidates of a batch of one-token item targets: the batch's distinct targets (in-batch negatives)
    plus `num_negatives` uniform draws (with replacement) from the item tokens, and their log-Q correction."""

    first_item: int  # token of item 0 (items are tokens first_item .. first_item + n_items - 1)
    target_share: torch.Tensor  # (n_items,) each item's share of the training targets (sums to 1), on the
    # device of the labels
    num_negatives: int

    def draw(self, labels: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """labels (B,) item tokens -> candidates (M,) = unique(labels) then the draws, and log_q (M,)."""
        n_items = len(self.target_share)
        drawn = torch.from_numpy(rng.integers(0, n_items, self.num_negatives)).to(labels.device) + self.first_item
        candidates = torch.cat([labels.unique(), drawn])  # (M,)
        return candidates, self.log_q(candidates, len(labels))

    def log_q(self, candidates: torch.Tensor, batch_rows: int) -> torch.Tensor:
        """log of each candidate's expected count: among `batch_rows` targets with probability
        1 - (1 - p)^B (p = its share of the training targets), plus num_negatives / n_items uniform draws."""
        n_items = len(self.target_share)
        p = self.target_share[candidates - self.first_item]  # (M,)
        in_batch = -torch.expm1(batch_rows * torch.log1p(-p))  # (M,) 1 - (1 - p)^B
        return torch.log(in_batch + self.num_negatives / n_items).clamp_min(-80.0)  # -80: p = 0 and no draws
