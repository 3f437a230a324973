"""Training loss: token cross-entropy with label smoothing, optionally without the input's own items."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
