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
    first = logits[:, 0].masked_fill(seen_mask(seen, labels, logits.shape[-1]), float("-inf"))  # (B, V)
    logp = torch.cat([first[:, None], logits[:, 1:]], 1).log_softmax(-1)  # (B, T, V)
    valid = labels != ignore_index  # (B, T)
    nll = -logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]  # (B, T)
    finite = torch.isfinite(logp)
    uniform = -logp.masked_fill(~finite, 0.0).sum(-1) / finite.sum(-1)  # (B, T) mean over kept classes
    per_token = (1 - smoothing) * nll + smoothing * uniform
    return per_token[valid].mean()
