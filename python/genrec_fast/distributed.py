"""Multi-process training with `torch.distributed`: the process group, batch shards and gradient sums.

Launched by `torchrun` (one machine or several), which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT; with WORLD_SIZE > 1 `session` joins the group (gloo on CPU, NCCL with cuda:LOCAL_RANK
on GPUs), otherwise it is a no-op and training is one process exactly as before.

Every rank builds the same epoch from the same seeded RNG and trains on its contiguous share of each
global batch (`Group.shard`). `Group.reduce_gradients` then sums every rank's gradients weighted by its
share of the global batch's targets, so each rank holds the one-process gradient of the whole batch
(up to float summation order) whatever the shards' target counts. It is an explicit all_reduce rather
than DDP's hooks: the trainer's step calls `model.hidden` and fused losses (not `forward`, which DDP
wraps), the sampled softmax's sparse embedding gradients need an all_gather (NCCL has no sparse
all_reduce), and a rank whose shard is empty must still take part.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

METRIC_PREFIXES = ("HR@", "NDCG@")  # the per-user means of `evaluate.evaluate`, combined by user count
_SESSIONS = itertools.count()  # process groups this process has joined (every rank joins as many)


@dataclass(frozen=True)
class Group:
    """This process's place in the training group; `Group()` is a single process (every method a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and progress bars."""
        return self.rank == 0

    def shard(self, items: Sequence) -> Sequence:
        """This rank's contiguous share of `items` (sizes differ by at most one; empty if too few)."""
        lo, hi = shard_bounds(len(items), self.rank, self.world_size)
        return items[lo:hi]

    def torch_seed(self, seed: int) -> int:
        """The seed of this rank's torch generator (dropout masks): `seed` on rank 0, a distinct one on
        the others, so shards of a batch do not share masks."""
        return seed if self.rank == 0 else int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable value)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Rank 0's weights and buffers on every rank (the same seed makes them equal already; this
        guards against machines whose initialisation differs)."""
        if self.enabled:
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)

    def reduce_gradients(self, params: Sequence[torch.Tensor], n_targets: torch.Tensor,
                         loss: torch.Tensor) -> torch.Tensor:
        """Turn each rank's gradients of its mean loss over `n_targets` targets into the gradient of the
        mean loss over all ranks' targets: sum_r n_r * grad_r / sum_r n_r (a rank with an empty shard
        passes n_targets = 0). Returns that global mean loss. Dense gradients: one all_reduce of a flat
        buffer that also carries n_r and n_r * loss_r; sparse ones: an all_gather of their rows."""
        dense = [q.grad for q in params if q.grad is not None and not q.grad.is_sparse]
        sparse = [q for q in params if q.grad is not None and q.grad.is_sparse]
        n = n_targets.to(loss.dtype).reshape(1)  # (1,)
        flat = torch.cat([g.reshape(-1) for g in dense] + [torch.ones_like(n), loss.detach().reshape(1)]) * n
        dist.all_reduce(flat)
        total = flat[-2].clone()  # sum_r n_r (a copy: flat is divided by it in place)
        flat /= total
        for g, part in zip(dense, flat[:-2].split([g.numel() for g in dense])):
            g.copy_(part.view_as(g))
        share = n[0] / total  # this rank's weight of its (mean-loss) gradient
        for q in sparse:
            q.grad = self._gather_sparse(q.grad, share, keep=bool(n_targets > 0))
        return flat[-1]

    def _gather_sparse(self, grad: torch.Tensor, share: torch.Tensor, keep: bool) -> torch.Tensor:
        """sum_r share_r * grad_r of a sparse (rows) gradient, coalesced. keep=False (an empty shard)
        sends no rows, so no row is touched that one process would not touch (SparseAdam is lazy)."""
        g = grad.coalesce()
        rows, values = g.indices()[0], g.values() * share  # (nnz,), (nnz, C)
        if not keep:
            rows, values = rows[:0], values[:0]
        rows, values = self._all_gather_rows(rows), self._all_gather_rows(values)
        return torch.sparse_coo_tensor(rows[None], values, g.shape, check_invariants=True).coalesce()

    def _all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenation over ranks of x (n_r, ...), whose first dimension may differ between ranks."""
        sizes = torch.tensor([len(x)], device=x.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(self.world_size)]
        dist.all_gather(all_sizes, sizes)
        most = int(max(s.item() for s in all_sizes))
        padded = torch.cat([x, x.new_zeros((most - len(x),) + x.shape[1:])])  # all_gather wants equal shapes
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return torch.cat([o[:int(s.item())] for o, s in zip(out, all_sizes)])

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n items: the first n % world_size ranks take one more."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def combine_metrics(parts: Sequence[dict | None]) -> dict:
    """Validation metrics of several ranks' user shards (None = a rank without users) as one evaluation
    of all of them: HR/NDCG means weighted by user counts, users summed, seconds the slowest rank's."""
    parts = [p for p in parts if p is not None and p["users"] > 0]
    users = sum(p["users"] for p in parts)
    out = {k: sum(p[k] * p["users"] for p in parts) / users for k in parts[0] if k.startswith(METRIC_PREFIXES)}
    out.update(users=users, seconds=max(p["seconds"] for p in parts), exclude_seen=parts[0]["exclude_seen"])
    return out


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def current() -> Group:
    """The group of an initialised default process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Group()


def rank_device(device: str | torch.device, local_rank: int) -> torch.device:
    """A CUDA device becomes cuda:LOCAL_RANK (one GPU per process); others stay as they are."""
    device = torch.device(device)
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


@contextlib.contextmanager
def session(device: str | torch.device = "cpu") -> Iterator[tuple[Group, torch.device]]:
    """-> (group, this process's device). With WORLD_SIZE > 1 (torchrun) it joins the process group
    from the environment (NCCL for CUDA, gloo otherwise) and tears it down at the end, also on errors;
    a group the caller initialised is used and left alone. Otherwise: (Group(), device) and nothing else."""
    if dist.is_available() and dist.is_initialized():
        group = current()
        yield group, rank_device(device, group.local_rank) if group.enabled else torch.device(device)
        return
    if env_world_size() <= 1:
        yield Group(), torch.device(device)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the object collectives use the current device
    store, rank, world_size = next(dist.rendezvous("env://"))
    # a fresh key prefix per session: a second `train` in the same processes must not read the keys
    # (addresses) of the first one, which stay in torchrun's store after the group is torn down
    store = dist.PrefixStore(f"genrec_fast/{next(_SESSIONS)}", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world_size)
    group = current()
    try:
        yield group, device
        group.barrier()  # no rank leaves while another still talks to the store rank 0 hosts
    finally:
        dist.destroy_process_group()
