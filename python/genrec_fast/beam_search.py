"""Trie-constrained beam search over item token sequences (contract: docs/beam_search_spec.md).

`Trie` holds the item sequences as flat CSR arrays. `ReferenceBeamSearch` is the plain numpy
state machine; `CppBeamSearch` runs the same machine in the native `_core` module (parallel over
users, GIL released). `make_beam_search(..., backend="auto")` is the native one: a broken build raises
an ImportError instead of quietly serving with the reference.

The caller drives the search: feed log-probabilities for the current rows to `step`, reorder the
decoder cache with the returned `parent_rows`, feed the returned `tokens`, until `done()`.
"""

from __future__ import annotations

import operator

import numpy as np

from .native import core

__all__ = ["Trie", "ReferenceBeamSearch", "CppBeamSearch", "make_beam_search", "native_available"]

_BACKENDS = ("auto", "cpp", "reference")
_MAX_ID = 2**31 - 1  # node ids and tokens are int32


def _native_module():
    """The compiled `_core` module; ImportError naming the build problem when it is missing (native.py)."""
    return core()


def native_available() -> bool:
    """True when `_core` imports (the "auto" backend never falls back: it raises instead)."""
    try:
        core()
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Trie
# ---------------------------------------------------------------------------------------------


class Trie:
    """Token trie over item sequences; nodes in DFS preorder (children by token id), root 0.

    Attributes (numpy): child_ptr int64 (N+1,), child_token/child_node int32 (E,), leaf_item,
    leaf_lo, leaf_hi int32 (N,), leaf_order int32 (num_items,); plus num_nodes, num_items,
    max_depth, min_depth, eos_id and min_vocab (a vocabulary-wide logprobs row needs more columns than any
    token id on an edge); step_lo/step_hi int32 (max_depth,): the smallest / largest token on an edge out of
    a node at depth d (search step d reads only those columns: `window`).
    """

    def __init__(self, tokens, offsets, eos_id: int, backend: str = "cpp"):
        """Item i is tokens[offsets[i]:offsets[i + 1]] without EOS.

        backend "cpp": built by the C++ core (a million items in about a second), its arrays copied here;
        "reference": built in plain Python (the definition; tests compare the two)."""
        if backend not in ("cpp", "reference"):
            raise ValueError(f"backend: expected 'cpp' or 'reference', got {backend!r}")
        self.eos_id = _check_id(eos_id, "eos_id")
        self._tokens = np.ascontiguousarray(tokens, dtype=np.int64)  # kept for the native trie
        self._offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        if self._offsets.ndim != 1 or self._tokens.ndim != 1:
            raise ValueError("tokens and offsets must be 1-D")
        if len(self._offsets) == 0 or self._offsets[0] < 0 or self._offsets[-1] > len(self._tokens):
            raise ValueError("offsets must be non-empty and index into tokens")
        self._native_trie = None
        self.num_items = len(self._offsets) - 1
        lengths = np.diff(self._offsets)
        self.max_depth = int(lengths.max(initial=-1)) + 1
        self.min_depth = int(lengths.min()) + 1 if len(lengths) else 0  # == max_depth: all items have one length
        if backend == "reference":
            self._build_reference()
        else:
            self._build_native()
        self.min_vocab = int(self.child_token.max(initial=-1)) + 1

    def _sequences(self) -> list:
        return [self._tokens[a:b].tolist() for a, b in zip(self._offsets[:-1], self._offsets[1:])]

    def _build_reference(self) -> None:
        self._flatten(_nested_trie(self._sequences(), self.eos_id))
        self.step_lo, self.step_hi = _step_windows(self.child_ptr, self.child_token, self.child_node,
                                                   self.max_depth)

    def window(self, step: int) -> tuple[int, int]:
        """Tokens [lo, hi) that search step `step` may read: the columns a windowed logprobs must cover."""
        return int(self.step_lo[step]), int(self.step_hi[step]) + 1

    def _build_native(self) -> None:
        try:
            native = core().Trie(self._tokens, self._offsets, self.eos_id)
        except ValueError:
            self._build_reference()  # raises the reference's message, which names the bad sequence
            raise
        for name in ("child_ptr", "child_token", "child_node", "leaf_item", "leaf_lo", "leaf_hi", "leaf_order",
                     "step_lo", "step_hi"):
            setattr(self, name, np.asarray(getattr(native, name)))
        self.num_nodes = int(native.num_nodes)
        self._native_trie = native

    @classmethod
    def build(cls, sequences, eos_id: int, backend: str = "cpp") -> "Trie":
        """One item per sequence of piece ids (distinct, non-empty, without EOS)."""
        sequences = [[_check_id(t, f"sequences[{i}] token") for t in seq] for i, seq in enumerate(sequences)]
        offsets = np.cumsum([0] + [len(seq) for seq in sequences], dtype=np.int64)
        tokens = np.fromiter((t for seq in sequences for t in seq), np.int64, count=int(offsets[-1]))
        return cls(tokens, offsets, eos_id, backend)

    def _flatten(self, root) -> None:
        """Numbers the nested trie in DFS preorder and stores the CSR arrays."""
        edges, leaf_item, leaf_lo, leaf_hi, leaf_order = [], [], [], [], []

        def visit(node) -> int:
            n = len(leaf_item)
            edges.append([])
            leaf_item.append(node if isinstance(node, int) else -1)
            leaf_lo.append(len(leaf_order))
            leaf_hi.append(-1)
            if isinstance(node, int):  # a leaf holds its item index
                leaf_order.append(node)
            else:
                edges[n] = [(token, visit(node[token])) for token in sorted(node)]
            leaf_hi[n] = len(leaf_order)
            return n

        visit(root)
        self.num_nodes = len(leaf_item)
        self.child_ptr = np.cumsum([0] + [len(e) for e in edges], dtype=np.int64)
        flat = [edge for node_edges in edges for edge in node_edges]
        self.child_token = np.array([t for t, _ in flat], dtype=np.int32)
        self.child_node = np.array([c for _, c in flat], dtype=np.int32)
        self.leaf_item = np.array(leaf_item, dtype=np.int32)
        self.leaf_lo = np.array(leaf_lo, dtype=np.int32)
        self.leaf_hi = np.array(leaf_hi, dtype=np.int32)
        self.leaf_order = np.array(leaf_order, dtype=np.int32)

    def _native(self):
        """The `_core.Trie` for these sequences, built once."""
        if self._native_trie is None:
            self._native_trie = core().Trie(self._tokens, self._offsets, self.eos_id)
        return self._native_trie


def node_depths(child_ptr, child_node, max_depth: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR arrays of a trie -> (depth (N,) int64: edges from the root, source (E,) int64: the node each edge
    leaves), level by level."""
    n = len(child_ptr) - 1
    source = np.repeat(np.arange(n), np.diff(child_ptr))  # (E,)
    depth = np.full(n, -1, dtype=np.int64)
    depth[0] = 0
    for d in range(max_depth):
        depth[child_node[depth[source] == d]] = d + 1
    return depth, source


def _step_windows(child_ptr, child_token, child_node, max_depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(max_depth,) int32 smallest and largest token on the edges out of the nodes of each depth."""
    depth, source = node_depths(child_ptr, child_node, max_depth)
    lo = np.full(max_depth, np.iinfo(np.int32).max, dtype=np.int32)
    hi = np.full(max_depth, -1, dtype=np.int32)
    np.minimum.at(lo, depth[source], child_token)
    np.maximum.at(hi, depth[source], child_token)
    return lo, hi


def _check_id(value, name: str) -> int:
    value = operator.index(value)
    if not 0 <= value <= _MAX_ID:
        raise ValueError(f"{name} must be in [0, 2**31), got {value}")
    return value


def _nested_trie(sequences, eos_id: int) -> dict:
    """{token: child} dicts; the child behind an EOS edge is the item index (an int)."""
    root: dict = {}
    for item, seq in enumerate(sequences):
        if not seq:
            raise ValueError(f"sequences[{item}] is empty")
        if eos_id in seq:
            raise ValueError(f"sequences[{item}] contains eos_id {eos_id}")
        node = root
        for token in seq:
            node = node.setdefault(_check_id(token, f"sequences[{item}] token"), {})
        if eos_id in node:
            raise ValueError(f"sequences[{item}] duplicates sequences[{node[eos_id]}]")
        node[eos_id] = item
    return root


# ---------------------------------------------------------------------------------------------
# Argument checks shared by both backends
# ---------------------------------------------------------------------------------------------


def _check_exclude(exclude, num_users: int, num_items: int):
    """None, or a list of num_users int64 arrays of item indices in [0, num_items)."""
    if exclude is None:
        return None
    if len(exclude) != num_users:
        raise ValueError(f"exclude must hold num_users={num_users} arrays, got {len(exclude)}")
    out = []
    for u, ids in enumerate(exclude):
        ids = np.asarray(ids).reshape(-1)
        if ids.size and ids.dtype.kind not in "iu":
            raise ValueError(f"exclude[{u}] must hold integer item indices, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= num_items):
            raise ValueError(f"exclude[{u}] holds item ids outside [0, {num_items})")
        out.append(ids)
    return out


def exclude_csr(exclude):
    """Checked per-user int64 arrays (or None) -> offsets (num_users + 1,) and the concatenated items, as
    the C++ filters take them; (None, None) for None."""
    if exclude is None:
        return None, None
    return (np.cumsum([0] + [len(ids) for ids in exclude], dtype=np.int64),
            np.concatenate([np.zeros(0, np.int64), *exclude]))


def check_filters(exclude, allow, num_users: int, num_items: int):
    """Both filters checked (ValueError naming the bad one) in the C++ layout:
    -> (exclude_ptr, exclude_items) or (None, None), and allow as a C-contiguous bool array or None."""
    ptr, items = exclude_csr(_check_exclude(exclude, num_users, num_items))
    return ptr, items, _check_allow(allow, num_users, num_items)


def _check_allow(allow, num_users: int, num_items: int):
    """None, or a bool array (num_items,) shared by all users or (num_users, num_items)."""
    if allow is None:
        return None
    allow = np.asarray(allow)
    if allow.dtype != np.bool_:
        raise ValueError(f"allow must be a bool mask over items, got dtype {allow.dtype}")
    if allow.shape not in ((num_items,), (num_users, num_items)):
        raise ValueError(
            f"allow must have shape ({num_items},) or ({num_users}, {num_items}), got {allow.shape}"
        )
    return np.ascontiguousarray(allow)


def _as_logprobs(logprobs) -> np.ndarray:
    """A float32 numpy array from a numpy array or a CPU torch tensor (no copy when possible)."""
    if hasattr(logprobs, "detach"):  # torch.Tensor, without importing torch here
        if logprobs.device.type != "cpu":
            raise ValueError(f"logprobs must be a CPU tensor, got device {logprobs.device}")
        if str(logprobs.dtype) != "torch.float32":
            raise ValueError(f"logprobs must be float32, got {logprobs.dtype}")
        logprobs = np.asarray(logprobs.detach().contiguous())
    if not isinstance(logprobs, np.ndarray) or logprobs.dtype != np.float32:
        got = getattr(logprobs, "dtype", type(logprobs))
        raise ValueError(f"logprobs must be a float32 array, got {got}")
    return np.ascontiguousarray(logprobs)


class _BeamSearchBase:
    """Argument checks and the row-layout check of `step`, shared by both backends."""

    def __init__(self, trie: Trie, num_users, num_beams, k, length_penalty=0.0, exclude=None, allow=None):
        if not isinstance(trie, Trie):
            raise ValueError(f"trie must be a genrec_fast.beam_search.Trie, got {type(trie).__name__}")
        self.trie = trie
        self.num_users = operator.index(num_users)
        self.num_beams = operator.index(num_beams)
        self.k = operator.index(k)
        if self.num_users < 0:
            raise ValueError(f"num_users must be >= 0, got {self.num_users}")
        if self.num_beams < 1 or self.k < 1:
            raise ValueError(f"num_beams and k must be >= 1, got num_beams={self.num_beams}, k={self.k}")
        if self.k > self.num_beams:
            raise ValueError(f"k ({self.k}) must be <= num_beams ({self.num_beams})")
        self.length_penalty = np.float32(length_penalty)  # float32, as in the C++ core
        if not np.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be finite, got {length_penalty}")
        self._exclude = _check_exclude(exclude, self.num_users, trie.num_items)
        self._allow = _check_allow(allow, self.num_users, trie.num_items)

    def _check_step(self, logprobs, offset) -> np.ndarray:
        if self.done():
            raise ValueError("step called after done(): no active user left")
        logprobs = _as_logprobs(logprobs)
        rows = len(self.active_users()) * self.width
        if logprobs.ndim != 2 or logprobs.shape[0] != rows:
            raise ValueError(
                f"logprobs must have shape ({rows}, vocab) = active users x width {self.width}, "
                f"got {logprobs.shape}"
            )
        self._check_window(logprobs.shape[1], offset)
        return logprobs

    def _check_window(self, columns: int, offset) -> None:
        """The step's logprobs columns (tokens offset .. offset + columns - 1) cover its `Trie.window`."""
        lo, hi = self.trie.window(self.steps)
        if not 0 <= operator.index(offset) <= lo or offset + columns < hi:
            raise ValueError(f"logprobs has {columns} columns from token {offset}, but step {self.steps} reads "
                             f"tokens {lo}..{hi - 1}")


# ---------------------------------------------------------------------------------------------
# Reference backend
# ---------------------------------------------------------------------------------------------


def _rank(score, *ties) -> tuple:
    """Sort key: score descending with NaN after every number, then the tie-breakers ascending."""
    nan = bool(np.isnan(score))
    return (nan, 0.0 if nan else -float(score), *ties)


class ReferenceBeamSearch(_BeamSearchBase):
    """The spec's state machine in plain Python + numpy, one user at a time."""

    def __init__(self, trie: Trie, num_users, num_beams, k, length_penalty=0.0, exclude=None, allow=None):
        super().__init__(trie, num_users, num_beams, k, length_penalty, exclude, allow)
        self._usable = self._usable_nodes()  # (num_users, N) bool: subtree holds an allowed item
        self._beams = [[(0, np.float32(0.0))] for _ in range(self.num_users)]  # (node, score)
        self._pool = [[] for _ in range(self.num_users)]  # (score, item), best first
        self._active = [u for u in range(self.num_users) if self._usable[u, 0]]
        self._width = 1
        self._steps = 0

    def _usable_nodes(self) -> np.ndarray:
        t = self.trie
        allowed = np.ones((self.num_users, t.num_items), dtype=bool)
        if self._allow is not None:
            allowed &= self._allow
        for u, ids in enumerate(self._exclude or []):
            allowed[u, ids] = False
        prefix = np.zeros((self.num_users, t.num_items + 1), dtype=np.int64)
        np.cumsum(allowed[:, t.leaf_order], axis=1, out=prefix[:, 1:])
        return prefix[:, t.leaf_hi] > prefix[:, t.leaf_lo]

    def active_users(self) -> np.ndarray:
        return np.array(self._active, dtype=np.int64)

    @property
    def width(self) -> int:
        return self._width

    def done(self) -> bool:
        return not self._active

    @property
    def steps(self) -> int:
        return self._steps

    def step(self, logprobs, offset: int = 0):
        """logprobs (rows, W): column j is token offset + j, covering the step's `Trie.window`."""
        logprobs = self._check_step(logprobs, offset)
        # pow in double, rounded once to float32: the C++ core computes the same divisor
        divisor = np.float32(float(self._steps + 1) ** float(self.length_penalty))
        parent_rows, tokens, still_active = [], [], []
        for local, u in enumerate(self._active):
            first_row = local * self._width
            new = self._step_user(u, logprobs[first_row : first_row + self._width], offset, divisor)
            self._beams[u] = [(node, score) for score, _, _, node in new]
            if self._stays_active(u):
                still_active.append(u)
                dead = self.num_beams - len(new)
                parent_rows += [first_row + slot for _, slot, _, _ in new] + [first_row] * dead
                tokens += [token for _, _, token, _ in new] + [self.trie.eos_id] * dead
        self._active, self._width, self._steps = still_active, self.num_beams, self._steps + 1
        return np.array(parent_rows, dtype=np.int64), np.array(tokens, dtype=np.int64)

    def _step_user(self, u: int, rows: np.ndarray, offset: int, divisor: np.float32) -> list:
        """Finishes EOS candidates into the pool; returns the new beams (score, slot, token, node)."""
        t = self.trie
        candidates = []
        for slot, (node, score) in enumerate(self._beams[u]):
            for e in range(t.child_ptr[node], t.child_ptr[node + 1]):
                child, token = int(t.child_node[e]), int(t.child_token[e])
                if not self._usable[u, child]:
                    continue
                c = score + rows[slot, token - offset]  # float32 + float32
                if token == t.eos_id:
                    self._finish(u, int(t.leaf_item[child]), c if self.length_penalty == 0 else c / divisor)
                else:
                    candidates.append((c, slot, token, child))
        candidates.sort(key=lambda cand: _rank(*cand[:3]))
        return candidates[: self.num_beams]

    def _finish(self, u: int, item: int, score: np.float32) -> None:
        pool = self._pool[u]
        pool.append((score, item))
        pool.sort(key=lambda entry: _rank(*entry))
        del pool[self.k :]

    def _stays_active(self, u: int) -> bool:
        beams, pool = self._beams[u], self._pool[u]
        if not beams:
            return False
        # Without a length penalty scores only fall: a full pool as good as the best beam is final.
        return not (self.length_penalty == 0 and len(pool) == self.k and beams[0][1] <= pool[-1][0])

    def results(self):
        items = np.full((self.num_users, self.k), -1, dtype=np.int64)
        scores = np.full((self.num_users, self.k), -np.inf, dtype=np.float32)
        for u, pool in enumerate(self._pool):
            for j, (score, item) in enumerate(pool):
                items[u, j], scores[u, j] = item, score
        return items, scores


# ---------------------------------------------------------------------------------------------
# C++ backend
# ---------------------------------------------------------------------------------------------


class CppBeamSearch(_BeamSearchBase):
    """Same API and results as ReferenceBeamSearch, backed by `_core.BeamSearch` (`threads` for `step`,
    None = all cores; callers pass torch's thread count)."""

    def __init__(self, trie: Trie, num_users, num_beams, k, length_penalty=0.0, exclude=None, allow=None,
                 threads: int | None = None):
        super().__init__(trie, num_users, num_beams, k, length_penalty, exclude, allow)
        exclude_ptr, exclude_items = exclude_csr(self._exclude)
        native_trie = trie._native()  # raises when _core is not built
        self._impl = _native_module().BeamSearch(
            native_trie, self.num_users, self.num_beams, self.k, float(self.length_penalty),
            exclude_ptr, exclude_items, self._allow,
        )
        self._impl.set_threads(0 if threads is None else int(threads))

    def active_users(self) -> np.ndarray:
        return self._impl.active_users()

    @property
    def width(self) -> int:
        return self._impl.width

    def done(self) -> bool:
        return self._impl.done()

    @property
    def steps(self) -> int:
        return self._impl.steps

    def step(self, logprobs, offset: int = 0):
        """logprobs (rows, W): column j is token offset + j, covering the step's `Trie.window`."""
        return self._impl.step(self._check_step(logprobs, offset), offset)

    def results(self):
        return self._impl.results()


def make_beam_search(trie: Trie, num_users, num_beams, k, length_penalty=0.0, exclude=None, allow=None,
                     backend: str = "auto", threads: int | None = None):
    """A beam search on `backend`: "cpp" or "auto" (the C++ core; ImportError when `_core` is broken) or
    "reference" (the plain Python state machine, asked for explicitly)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "cpp"
    if backend == "reference":
        return ReferenceBeamSearch(trie, num_users, num_beams, k, length_penalty, exclude, allow)
    return CppBeamSearch(trie, num_users, num_beams, k, length_penalty, exclude, allow, threads)
