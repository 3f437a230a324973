"""Trie-constrained beam search as device tensors (PyTorch ops only): the same results as `beam_search`'s
`ReferenceBeamSearch` / `CppBeamSearch` (docs/beam_search_spec.md), without a host round-trip per step.

On a GPU the C++ search costs a (rows x vocab) copy to the host and a wait at every decoder step. Here the
trie (`DeviceTrie`: CSR of the non-EOS edges, each node's EOS child, and per user a "usable" bit per node
for the filters) and the search state (per beam: node, score, live; per user: a pool of the best k finished
items, an active flag) live on the logprobs' device, and a step is a fixed sequence of gathers, one
`topk` for the new beams and one for the pool: no data-dependent shape, no `.item()`, no sync.
Only `results()` copies (users, k) items and scores to the host.

Row layout (differs from the spec's, which compacts to the active users): rows are ALL users x `width`
slots, user-major, where `width` is static, known on the host before each step:
  width_0 = 1 (the root), width_{t+1} = min(num_beams, inner nodes of the trie at depth t + 1)
(a live beam sits on an inner node, a node with children, so no user can have more). A done user (spec
rule 4, or no allowed item from the start) keeps its rows with every slot dead. The search is exhausted
after `trie.max_depth` steps (width 0); `done()` also says whether every user stopped early, at the cost
of one host sync. Ranking, EOS, filters and the stopping rule are exactly the spec's, so per user the live
beams after each step are the C++ search's, in the same order (tests/test_device_search.py checks this).

Per step t (U users, W = width_t, B = most non-EOS children of a depth-t node, W' = width_{t+1}):
  1. EOS: each live beam's EOS child (at most one) scores `s + logprobs[row, eos]` (/ L**length_penalty);
     pool and these W candidates -> `topk` k by (score desc, item asc)                (U, k + W)
  2. children: edges ptr[node] + j, j < B, padded with invalid; drop children whose subtree holds no
     allowed item; `c = s + logprobs[row, token]`; `topk` W' by (score desc, row asc, token asc) (U, W*B)
  3. stop users (no live beam, or lp == 0 and a full pool whose k-th score >= the best new beam).
Ties and NaN follow the spec exactly: both selections rank one int64 key per candidate (`_rank_key`),
unique by its tie-breaker, so `topk` returns the stable order.

`device_beam_search(step_fn, ...)` drives a search with a logprobs callback; `device_beam_decode` is the
GenRec decoding loop (as `decoding.beam_decode`) on top of it.
"""
from __future__ import annotations

import os
import weakref
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .beam_search import Trie, _BeamSearchBase, node_depths

__all__ = ["DeviceTrie", "DeviceBeamSearch", "device_beam_search", "device_beam_decode", "top_by_score"]

# _rank_key: float32 bits made monotone span [-_INF_BITS, _INF_BITS] (-inf .. +inf); NaN and invalid after them
_INF_BITS = 0x7F800000
_NAN_KEY = 2 * _INF_BITS + 1
_INVALID_KEY = 2 * _INF_BITS + 2  # < 2**32: key * 2**31 + tie-breaker fits in int64
_TIE_LIMIT = 2**31  # tie-breakers (item index, candidate index) must stay below this


# ---------------------------------------------------------------------------------------------
# The trie on the device
# ---------------------------------------------------------------------------------------------


class DeviceTrie:
    """A `Trie` as int64 device tensors, for the steps' gathers.

    child_ptr (N+1,), child_token / child_node (E',): CSR of the non-EOS edges only, token order kept;
    eos_child (N,): the node behind the EOS edge, -1 when none; leaf_item, leaf_lo, leaf_hi (N,),
    leaf_order (num_items,) as in `Trie`. Host lists per depth d: `inner[d]` nodes with children and
    `branch[d]` the most non-EOS children of one node (the padded width of step d's candidates).
    No separate dense first level: step 0 has one beam per user, at the root, so its CSR row already is
    the root's child list (one gather of B_0 columns from the (U, V) logprobs).
    """

    _cache: "weakref.WeakKeyDictionary[Trie, dict]" = weakref.WeakKeyDictionary()

    def __init__(self, host: Trie, device, arrays: dict, inner: list, branch: list):
        self.host, self.device = host, torch.device(device)
        self.eos_id, self.num_items, self.num_nodes = host.eos_id, host.num_items, host.num_nodes
        self.max_depth = host.max_depth
        for name, array in arrays.items():
            setattr(self, name, torch.as_tensor(array, dtype=torch.int64, device=self.device))
        self.device = self.child_ptr.device  # with its index ("cuda" -> "cuda:0")
        self.inner, self.branch = inner, branch

    @classmethod
    def from_trie(cls, trie: Trie, device="cpu") -> "DeviceTrie":
        if not isinstance(trie, Trie):
            raise ValueError(f"trie must be a genrec_fast.beam_search.Trie, got {type(trie).__name__}")
        parent = np.repeat(np.arange(trie.num_nodes), np.diff(trie.child_ptr))  # (E,) each edge's node
        is_eos = trie.child_token == trie.eos_id
        eos_child = np.full(trie.num_nodes, -1, dtype=np.int64)
        eos_child[parent[is_eos]] = trie.child_node[is_eos]
        degree = np.bincount(parent[~is_eos], minlength=trie.num_nodes)  # (N,) non-EOS children
        arrays = dict(child_ptr=np.concatenate([[0], np.cumsum(degree)]), child_token=trie.child_token[~is_eos],
                      child_node=trie.child_node[~is_eos], eos_child=eos_child, leaf_item=trie.leaf_item,
                      leaf_lo=trie.leaf_lo, leaf_hi=trie.leaf_hi, leaf_order=trie.leaf_order)
        depth, _ = node_depths(trie.child_ptr, trie.child_node, trie.max_depth)
        has_children = np.diff(trie.child_ptr) > 0
        inner = [int(np.sum(has_children & (depth == d))) for d in range(trie.max_depth + 1)]
        branch = [int(degree[depth == d].max(initial=0)) for d in range(trie.max_depth + 1)]
        return cls(trie, device, arrays, inner, branch)

    @classmethod
    def for_device(cls, trie: Trie, device) -> "DeviceTrie":
        """`from_trie`, built once per (trie, device) and kept while the trie lives."""
        per_device = cls._cache.setdefault(trie, {})
        key = str(torch.device(device))
        if key not in per_device:
            per_device[key] = cls.from_trie(trie, device)
        return per_device[key]

    def widths(self, num_beams: int) -> list:
        """Rows per user fed to step t = 0, 1, ...; the last entry is 0 (exhausted)."""
        out = [1 if self.inner[0] else 0]
        out += [min(num_beams, n) for n in self.inner[1:]]
        return out[:out.index(0) + 1] if 0 in out else out + [0]


# ---------------------------------------------------------------------------------------------
# Ranking keys
# ---------------------------------------------------------------------------------------------


def _rank_key(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """float32 scores -> int64 keys in [0, 2**32), ascending = the spec's order: numbers by score descending
    (-0.0 == 0.0, -inf last among them), then NaN, then invalid entries."""
    bits = score.view(torch.int32).long()  # IEEE-754 bits, sign-extended
    monotone = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)  # increases with the score; +-0 -> 0
    key = torch.where(torch.isnan(score), _NAN_KEY, _INF_BITS - monotone)
    return torch.where(valid, key, _INVALID_KEY)


def _best(key: torch.Tensor, tie: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (rows, n) of the n smallest (key, tie) per row, in that order (tie in [-1, 2**31))."""
    return torch.topk(key * _TIE_LIMIT + tie, n, dim=1, largest=False, sorted=True).indices


def top_by_score(scores: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (rows, n) of each row's best n float32 scores (rows, W) by (score desc, id asc; -0.0 == 0.0,
    NaN last), ids in [-1, 2**31): the order of numpy's lexsort((ids, -scores)), one topk of an int64 key.
    item_topk's merges rank by it too."""
    return _best(_rank_key(scores, torch.ones_like(scores, dtype=torch.bool)), ids, n)


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


class DeviceBeamSearch(_BeamSearchBase):
    """The spec's search with state on `trie.device`; rows = all users x `width` (module docstring).

    step(logprobs (U * width, W) float32 on the device, offset=0) -> (parent_rows, tokens), int64 device
    tensors of U * next width rows: the row of `logprobs` each new row extends and its token (dead slots: the
    user's first row and eos_id). Column j of logprobs is token offset + j; the columns cover the step's
    `Trie.window` (W = V, offset 0: the whole vocabulary). Argument checks and messages are `beam_search`'s.
    """

    def __init__(self, trie: DeviceTrie, num_users, num_beams, k, length_penalty=0.0, exclude=None, allow=None):
        if not isinstance(trie, DeviceTrie):
            raise ValueError(f"trie must be a DeviceTrie (DeviceTrie.from_trie), got {type(trie).__name__}")
        super().__init__(trie.host, num_users, num_beams, k, length_penalty, exclude, allow)
        self.dtrie, self.device = trie, trie.device
        U, dev = self.num_users, self.device
        self._widths = trie.widths(self.num_beams) if U else [0]
        if self.num_beams * max(trie.branch) >= _TIE_LIMIT:
            raise ValueError(f"num_beams ({self.num_beams}) x the most children of a node must be < 2**31")
        self._t = 0
        self._usable = self._usable_nodes()  # None (all usable), (1, N) or (U, N) bool
        root = torch.zeros(U, 1, dtype=torch.long, device=dev)
        self._active = self._usable_at(root)[:, 0] & (trie.num_items > 0)  # (U,) done from the start: no item
        self._node = torch.zeros(U, 1, dtype=torch.long, device=dev)  # (U, W) beams' nodes
        self._score = torch.zeros(U, 1, dtype=torch.float32, device=dev)  # (U, W)
        self._live = self._active[:, None].clone()  # (U, W)
        self._pool_item = torch.full((U, self.k), -1, dtype=torch.long, device=dev)  # (U, k) best first
        self._pool_score = torch.full((U, self.k), -np.inf, dtype=torch.float32, device=dev)
        self._pool_valid = torch.zeros(U, self.k, dtype=torch.bool, device=dev)
        # L ** length_penalty per step L = t + 1: pow in double, rounded once to float32 (as the C++ core)
        divisors = [np.float32(float(t + 1) ** float(self.length_penalty)) for t in range(len(self._widths))]
        self._divisors = torch.tensor(divisors, dtype=torch.float32, device=dev)

    # -- filters -------------------------------------------------------------------------------

    def _usable_nodes(self) -> torch.Tensor | None:
        """(A, N) bool, A = 1 or U: node n's subtree holds an item allowed for the user (spec: usable edge)."""
        if self._allow is None and self._exclude is None:
            return None  # every node of a trie has an item below it
        t, dev = self.dtrie, self.device
        allowed = torch.ones(1, t.num_items, dtype=torch.bool, device=dev)  # (A, n_items)
        if self._allow is not None:
            allowed = allowed & torch.as_tensor(self._allow, device=dev)
        if self._exclude is not None:
            allowed = allowed.expand(self.num_users, -1).clone()
            users = np.repeat(np.arange(self.num_users), [len(ids) for ids in self._exclude])
            items = np.concatenate([np.zeros(0, np.int64), *self._exclude])
            allowed[torch.as_tensor(users, device=dev), torch.as_tensor(items, device=dev)] = False
        prefix = F.pad(allowed[:, t.leaf_order].cumsum(1, dtype=torch.int32), (1, 0))  # (A, n_items + 1)
        return prefix[:, t.leaf_hi] > prefix[:, t.leaf_lo]  # (A, N)

    def _usable_at(self, nodes: torch.Tensor) -> torch.Tensor:
        """nodes (U, ...) -> (U, ...) bool: usable for the row's user."""
        if self._usable is None:
            return torch.ones_like(nodes, dtype=torch.bool)
        if self._usable.shape[0] == 1:
            return self._usable[0][nodes]
        return self._usable.gather(1, nodes.flatten(1)).view(nodes.shape)

    # -- state ---------------------------------------------------------------------------------

    @property
    def width(self) -> int:
        """Rows per user of the next step's logprobs (host int, no sync); 0 once exhausted."""
        return self._widths[self._t]

    @property
    def exhausted(self) -> bool:
        """No step left: the trie's depth is used up (host-side, no sync)."""
        return self.width == 0

    def done(self) -> bool:
        """Exhausted, or every user stopped (one device -> host sync)."""
        return self.exhausted or not bool(self._active.any())

    def active_users(self) -> np.ndarray:
        """Users not stopped yet (one sync); their rows are still all users x width."""
        return np.flatnonzero(self._active.cpu().numpy()).astype(np.int64)

    # -- step ----------------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        return self._t

    def step(self, logprobs: torch.Tensor, offset: int = 0):
        lp = self._check_step(logprobs, offset).reshape(self.num_users, self.width, -1)  # (U, W, columns)
        self._finish_eos(lp, offset)
        out = self._extend(lp, offset)
        self._t += 1
        return out

    def _check_step(self, logprobs, offset) -> torch.Tensor:
        if self.exhausted:
            raise ValueError("step called after the search was exhausted (width 0): no step left")
        if not isinstance(logprobs, torch.Tensor):
            raise ValueError(f"logprobs must be a torch.Tensor on {self.device}, got {type(logprobs).__name__}")
        if logprobs.device != self.device:
            raise ValueError(f"logprobs must be on the search's device {self.device}, got {logprobs.device}")
        if logprobs.dtype != torch.float32:
            raise ValueError(f"logprobs must be float32, got {logprobs.dtype}")
        rows = self.num_users * self.width
        if logprobs.dim() != 2 or logprobs.shape[0] != rows:
            raise ValueError(f"logprobs must have shape ({rows}, vocab) = all {self.num_users} users x width "
                             f"{self.width}, got {tuple(logprobs.shape)}")
        self._check_window(logprobs.shape[1], offset)
        return logprobs

    def _finish_eos(self, lp: torch.Tensor, offset: int) -> None:
        """Each live beam's EOS child finishes its item; the pool keeps the best k by (score desc, item asc)."""
        t = self.dtrie
        leaf = t.eos_child[self._node]  # (U, W), -1: no EOS edge
        safe = leaf.clamp(min=0)
        ok = self._live & (leaf >= 0) & self._usable_at(safe)  # (U, W)
        # EOS's column; when EOS lies outside the window no beam has an EOS child (`ok` all False)
        eos = min(max(t.eos_id - offset, 0), lp.shape[2] - 1)
        score = self._score + lp[:, :, eos]  # (U, W) float32 + float32
        if self.length_penalty != 0:
            score = score / self._divisors[self._t]  # a device tensor: true division, as the host searches
        items = torch.cat([self._pool_item, t.leaf_item[safe]], 1)  # (U, k + W)
        scores = torch.cat([self._pool_score, score], 1)
        valid = torch.cat([self._pool_valid, ok], 1)
        keep = _best(_rank_key(scores, valid), items.clamp(min=0), self.k)  # (U, k)
        self._pool_valid = valid.gather(1, keep)
        self._pool_item = torch.where(self._pool_valid, items.gather(1, keep), -1)
        self._pool_score = torch.where(self._pool_valid, scores.gather(1, keep), -np.inf)

    def _extend(self, lp: torch.Tensor, offset: int):
        """Best non-EOS children -> the next beams; stops users; -> (parent_rows, tokens) (U * W',)."""
        U, W, B, W_next = self.num_users, self.width, self.dtrie.branch[self._t], self._widths[self._t + 1]
        if W_next == 0:  # the deepest step: only EOS edges were left
            self._active = torch.zeros_like(self._active)
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return empty, empty.clone()
        tokens, nodes, scores, valid = self._children(lp, offset, B)  # (U, W * B) each
        C = W * B
        order = _best(_rank_key(scores, valid), torch.arange(C, device=self.device), W_next)  # (U, W')
        live = valid.gather(1, order)  # (U, W') live slots first
        best = scores.gather(1, order)
        self._active = self._active & live[:, 0] & ~self._pool_covers(best[:, 0])
        live = live & self._active[:, None]
        self._live, self._score = live, best
        self._node = torch.where(live, nodes.gather(1, order), 0)
        first_row = torch.arange(U, device=self.device)[:, None] * W  # (U, 1)
        parent = first_row + torch.where(live, order // B, 0)  # (U, W')
        token = torch.where(live, tokens.gather(1, order), self.dtrie.eos_id)
        return parent.reshape(-1), token.reshape(-1)

    def _children(self, lp: torch.Tensor, offset: int, B: int):
        """Every live beam's usable non-EOS children, padded to B per beam (row asc, token asc):
        -> tokens, nodes, scores `s + lp[row, token]`, valid; each (U, W * B)."""
        t = self.dtrie
        start = t.child_ptr[self._node]  # (U, W)
        count = t.child_ptr[self._node + 1] - start
        j = torch.arange(B, device=self.device)
        valid = self._live[:, :, None] & (j < count[:, :, None])  # (U, W, B)
        edge = torch.where(valid, start[:, :, None] + j, 0)
        nodes, tokens = t.child_node[edge], t.child_token[edge]  # (U, W, B)
        valid = valid & self._usable_at(nodes)
        column = (tokens - offset).clamp(0, lp.shape[2] - 1)  # padding edges may lie outside the window
        scores = self._score[:, :, None] + lp.gather(2, column)  # (U, W, B)
        return tokens.flatten(1), nodes.flatten(1), scores.flatten(1), valid.flatten(1)

    def _pool_covers(self, best_live: torch.Tensor) -> torch.Tensor:
        """(U,) spec rule 4: no length penalty, a full pool, and its k-th score >= the best new live score."""
        if self.length_penalty != 0:
            return torch.zeros_like(self._active)
        return self._pool_valid[:, -1] & (best_live <= self._pool_score[:, -1])

    # -- results -------------------------------------------------------------------------------

    def device_results(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(items int64, scores float32), (U, k) on the device: (score desc, item asc), -1 / -inf padding."""
        return self._pool_item, self._pool_score

    def results(self) -> tuple[np.ndarray, np.ndarray]:
        """`device_results` copied to the host (the only copy of the search)."""
        return self._pool_item.cpu().numpy(), self._pool_score.cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------


StepFn = Callable[[torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def device_beam_search(step_fn: StepFn, trie: DeviceTrie, num_users, num_beams, k, exclude=None, allow=None,
                       length_penalty: float = 0.0, stop_early: bool = False):
    """Runs a `DeviceBeamSearch` to the end -> (items, scores) (U, k) device tensors.

    step_fn(parent_rows, tokens) -> (logprobs (U * width, W) float32 on the device, offset): column j is token
    offset + j, covering the step's `Trie.window` (offset 0, W = V: the whole vocabulary). First called with
    (None, None) for one row per user (the start token), then with the previous step's outputs (reorder the
    decoder cache with parent_rows, feed tokens). stop_early: check once per step whether every user
    stopped (a host sync) and skip the remaining steps; else run all `trie.max_depth` steps without one.
    """
    search = DeviceBeamSearch(trie, num_users, num_beams, k, length_penalty, exclude, allow)
    return run_search(search, step_fn, stop_early)


def run_search(search: DeviceBeamSearch, step_fn: StepFn, stop_early: bool = False):
    """Steps `search` to the end with `step_fn` (as `device_beam_search`) -> (items, scores) (U, k) device
    tensors. Without stop_early it never synchronises with the host (cuda_graphs.py captures it)."""
    parent = tokens = None
    while not (search.done() if stop_early else search.exhausted):
        parent, tokens = search.step(*step_fn(parent, tokens))
    return search.device_results()


@torch.inference_mode()
def device_beam_decode(model, trie: Trie, enc: dict, k: int, num_beams: int = 20, exclude=None, allow=None,
                       length_penalty: float = 0.0, stop_early: bool = False,
                       graphs: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`decoding.beam_decode` with the search on the model's device: enc: padded encoder batch of U users ->
    items (U, k) int64 (-1 = none), scores (U, k) float32, the same as beam_decode's (to float rounding).

    The decoder runs all U users x `width` rows each step (done users' rows are dead, never compacted),
    so no step waits for the host. For a model without EOS (item_eos=False; items of one length L) the
    logprobs of step L are zeros: EOS, the only token the trie allows after an item, counts as certain (as
    beam_decode). graphs (default `graphs_default()`): the decoder steps and the search replay as one CUDA
    graph per batch shape (cuda_graphs.py; stop_early is then moot: every step runs, inside the graph)."""
    from .decoding import decoder_steps
    model_steps = decoder_steps(model, trie, "device_beam_decode")
    device = enc["tokens"].device
    U = enc["tokens"].shape[0]
    memory = model.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])  # (U, S, C) (per member)
    cache = model.start_decoding(memory, enc["mask"], enc["item_ids"])
    cache.capacity = trie.max_depth  # the longest decode: the K/V buffers never regrow
    search = DeviceBeamSearch(DeviceTrie.for_device(trie, device), U, num_beams, k, length_penalty, exclude, allow)
    if graphs if graphs is not None else graphs_default():
        from .cuda_graphs import graphed_search
        items, scores = graphed_search(model, trie, cache, search, model_steps)
    else:
        items, scores = run_search(search, decode_step_fn(model, trie, cache, U, model_steps), stop_early)
    return items.cpu().numpy(), scores.cpu().numpy()


def graphs_default() -> bool:
    """`device_beam_decode(graphs=None)`: CUDA graphs only with GENREC_CUDA_GRAPHS=1, until they are run on a
    GPU (they are tested on CPU by re-running the captured function: tests/test_cuda_graphs.py)."""
    return os.environ.get("GENREC_CUDA_GRAPHS", "0") == "1"


def decode_step_fn(model, trie: Trie, cache, U: int, model_steps: int) -> StepFn:
    """The decoder as a `run_search` step_fn: step t feeds the chosen tokens (the start token at t = 0),
    reorders the cache by the parent rows, and returns the logprobs of the step's `Trie.window`."""
    steps = [0]
    device = cache.lengths.device

    def step_fn(parent, tokens):
        lo, hi = trie.window(steps[0])  # the only tokens this step can extend a beam by
        steps[0] += 1
        if parent is None:  # step 0: one row per user, from the start token
            tokens = torch.full((U,), model.cfg.bos_id, dtype=torch.long, device=device)
        elif steps[0] > model_steps:  # after the item's tokens only EOS is allowed
            return torch.zeros(len(tokens), hi - lo, device=device), lo
        else:
            cache.reorder(parent)
        return model.decode_logprobs(tokens, cache, lo, hi), lo  # (U * width, hi - lo)

    return step_fn
