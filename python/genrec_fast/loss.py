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


class _LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ weight.T + bias, labels, label_smoothing) for rows that all count, computed
    `chunk` rows at a time; the gradients are formed in the forward pass, so the (N, V) logits never
    exist whole and are read a few times instead of a dozen (the LM head is most of a small model's step)."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, smoothing, chunk):
        n, vocab = x.shape[0], weight.shape[0]
        grad_x = torch.empty_like(x)  # (N, C)
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None  # (V, C)
        grad_b = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None  # (V,)
        total = x.new_zeros((), dtype=torch.float64)
        for s in range(0, n, chunk):
            xs, ys = x[s:s + chunk], labels[s:s + chunk, None]  # (c, C), (c, 1)
            z = xs @ weight.t() if bias is None else torch.addmm(bias, xs, weight.t())  # (c, V) logits
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
            if grad_w is not None:
                grad_w.addmm_(g.t(), xs)
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.n = n
        return (total / n).to(x.dtype) if n else x.new_tensor(float("nan"))

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out / ctx.n
        return (grad_x * scale, None if grad_w is None else grad_w * scale,
                None if grad_b is None else grad_b * scale, None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                         smoothing: float = 0.0, ignore_index: int = -100, chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits x (N, C) @ weight (V, C).T + bias (V,) against labels (N,),
    `ignore_index` = padding: the value and gradients of
    `F.cross_entropy(F.linear(x, weight, bias), labels, ignore_index=..., label_smoothing=smoothing)`
    (the reference, tested) without materialising the (N, V) logits. `chunk` rows at a time: by default
    32 on a CPU (a 32 x V block stays in cache; measured fastest of 8-128 on Beauty's V = 13,101), 4,096 on
    a GPU (where small kernels would starve it)."""
    chunk = chunk if chunk is not None else 32 if x.device.type == "cpu" else 4096
    if x.dim() != 2 or labels.shape != x.shape[:1] or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"expected x (N, C), weight (V, C), labels (N,); got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}, labels {tuple(labels.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    keep = labels != ignore_index  # (N,)
    rows = keep.nonzero()[:, 0]  # (n,)
    return _LinearCrossEntropy.apply(x.index_select(0, rows), weight, bias, labels[rows], smoothing, chunk)
