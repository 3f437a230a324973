"""Trie + trie-constrained beam search (docs/beam_search_spec.md): reference vs C++, properties,
brute force on tiny tries, and argument errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_fast.beam_search import (
    CppBeamSearch,
    ReferenceBeamSearch,
    Trie,
    make_beam_search,
    native_available,
)

needs_native = pytest.mark.skipif(not native_available(), reason="genrec_fast._core beam search not built")
BACKENDS = ["reference", pytest.param("cpp", marks=needs_native)]
TRIE_ARRAYS = ("child_ptr", "child_token", "child_node", "leaf_item", "leaf_lo", "leaf_hi", "leaf_order",
               "step_lo", "step_hi")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(axis=-1, keepdims=True)
    return (x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))).astype(np.float32)


# ---- strategies ---------------------------------------------------------------------------------


@st.composite
def item_sequences(draw, max_items: int = 10, vocab: int = 5):
    """(sequences, eos_id, vocab): distinct sequences of length 1..4; EOS anywhere in the vocab."""
    eos = draw(st.integers(0, vocab - 1))
    piece = st.integers(0, vocab - 2).map(lambda t: t if t < eos else t + 1)  # any token but EOS
    seqs = draw(st.lists(st.lists(piece, min_size=1, max_size=4).map(tuple), min_size=1,
                         max_size=max_items, unique=True))
    return [list(s) for s in seqs], eos, vocab


@dataclass
class Scenario:
    trie: Trie
    vocab: int
    num_users: int
    num_beams: int
    k: int
    length_penalty: float
    exclude: list | None
    allow: np.ndarray | None
    seed: int

    def search(self, backend: str):
        return make_beam_search(self.trie, self.num_users, self.num_beams, self.k, self.length_penalty,
                                self.exclude, self.allow, backend=backend)

    def allowed(self) -> np.ndarray:
        """(num_users, num_items) bool: allowed(u, item) of the spec."""
        out = np.ones((self.num_users, self.trie.num_items), dtype=bool)
        if self.allow is not None:
            out &= self.allow
        for u, ids in enumerate(self.exclude or []):
            out[u, ids] = False
        return out


@st.composite
def scenarios(draw, max_items: int = 10, beams_cover_items: bool = False, max_users: int = 4):
    """A random trie, search sizes and filters; beams_cover_items: num_beams >= num_items."""
    seqs, eos, vocab = draw(item_sequences(max_items))
    trie = Trie.build(seqs, eos)
    n = trie.num_items
    num_users = draw(st.integers(1, max_users))
    num_beams = n + draw(st.integers(0, 1)) if beams_cover_items else draw(st.integers(1, 4))
    k = draw(st.integers(1, num_beams))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    exclude = None
    if draw(st.booleans()):
        exclude = [rng.choice(n, size=rng.integers(0, n + 1)) for _ in range(num_users)]  # with repeats
    allow = draw(st.sampled_from([None, (n,), (num_users, n)]))
    if allow is not None:
        allow = rng.random(allow) < rng.uniform(0.2, 1.0)
    lp = draw(st.sampled_from([0.0, 0.0, 0.6, 1.0, -0.5]))
    return Scenario(trie, vocab, num_users, num_beams, k, lp, exclude, allow, seed)


# ---- driving searches -------------------------------------------------------------------------------


def check_parent_rows(old_active, old_width, new_active, num_beams, parent_rows, tokens):
    """Each new row extends a row of its own user (the previous layout)."""
    assert len(parent_rows) == len(tokens) == len(new_active) * num_beams
    local = {u: i for i, u in enumerate(old_active)}
    for r, parent in enumerate(parent_rows):
        first = local[new_active[r // num_beams]] * old_width
        assert first <= parent < first + old_width


def run_lockstep(searches, next_logprobs):
    """Steps all searches with the same logprobs until done, asserting identical row layouts and
    step outputs. next_logprobs(search, previous step output or None) -> (R, V) float32."""
    lead, out = searches[0], None
    while not lead.done():
        active, width = lead.active_users(), lead.width
        for s in searches[1:]:
            np.testing.assert_array_equal(s.active_users(), active)
            assert s.width == width and not s.done()
        logprobs = next_logprobs(lead, out)
        outs = [s.step(logprobs) for s in searches]
        for other in outs[1:]:
            np.testing.assert_array_equal(other[0], outs[0][0])
            np.testing.assert_array_equal(other[1], outs[0][1])
        out = outs[0]
        assert out[0].dtype == out[1].dtype == np.int64
        check_parent_rows(active, width, lead.active_users(), lead.num_beams, *out)
    assert all(s.done() for s in searches)


def random_logprobs(vocab: int, seed: int, quantize: bool = False, dead_nan: bool = True):
    """Fresh log_softmax rows each step; NaN in dead slots (which must be ignored)."""
    rng = np.random.default_rng(seed)

    def next_logprobs(search, out):
        rows = log_softmax(rng.standard_normal((len(search.active_users()) * search.width, vocab)))
        if quantize:  # many exact ties
            rows = np.round(rows).astype(np.float32)
        if out is not None and dead_nan:
            rows[out[1] == search.trie.eos_id] = np.nan
        return rows

    return next_logprobs


class NodeRows:
    """Feeds each row the table row of its beam's node, so a path's score is well defined."""

    def __init__(self, trie: Trie, table: np.ndarray):
        self.table, self.eos = table, trie.eos_id
        self.child = {}
        for n in range(trie.num_nodes):
            for e in range(trie.child_ptr[n], trie.child_ptr[n + 1]):
                self.child[n, int(trie.child_token[e])] = int(trie.child_node[e])
        self.nodes = None

    def __call__(self, search, out):
        if out is None:
            self.nodes = np.zeros(len(search.active_users()), dtype=np.int64)  # all at the root
        else:  # a dead slot's token is EOS (never a live beam's token): node -1, row NaN
            self.nodes = np.array([self.child[self.nodes[p], t] if t != self.eos else -1
                                   for p, t in zip(*out)], dtype=np.int64)
        rows = np.full((len(self.nodes), self.table.shape[1]), np.nan, dtype=np.float32)
        rows[self.nodes >= 0] = self.table[self.nodes[self.nodes >= 0]]
        return rows


def brute_force(sc: Scenario, table: np.ndarray):
    """Top-k allowed items per user, each scored by summing the table along its path."""
    t = sc.trie
    paths = {0: []}  # node -> [(node, token), ...] from the root
    for n in range(t.num_nodes):
        for e in range(t.child_ptr[n], t.child_ptr[n + 1]):
            paths[int(t.child_node[e])] = paths[n] + [(n, int(t.child_token[e]))]
    score = {}
    for leaf in np.flatnonzero(t.leaf_item >= 0):
        s = np.float32(0.0)
        for node, token in paths[leaf]:
            s = s + table[node, token]
        if sc.length_penalty != 0:
            s = s / np.float32(float(len(paths[leaf])) ** float(np.float32(sc.length_penalty)))
        score[int(t.leaf_item[leaf])] = s
    items = np.full((sc.num_users, sc.k), -1, dtype=np.int64)
    scores = np.full((sc.num_users, sc.k), -np.inf, dtype=np.float32)
    for u, allowed in enumerate(sc.allowed()):
        best = sorted(np.flatnonzero(allowed), key=lambda i: (-score[i], i))[: sc.k]
        items[u, : len(best)] = best
        scores[u, : len(best)] = [score[i] for i in best]
    return items, scores


def check_results(sc: Scenario, items: np.ndarray, scores: np.ndarray):
    """Valid, distinct, allowed items; min(k, #allowed) of them; sorted by (score desc, item asc)."""
    assert items.shape == scores.shape == (sc.num_users, sc.k)
    assert items.dtype == np.int64 and scores.dtype == np.float32
    for u, allowed in enumerate(sc.allowed()):
        count = min(sc.k, int(allowed.sum()))  # guaranteed since k <= num_beams
        found = items[u, :count]
        assert np.all(items[u, count:] == -1) and np.all(scores[u, count:] == -np.inf)
        assert np.all(found >= 0) and len(set(found.tolist())) == count
        assert allowed[found].all()
        keys = list(zip((-scores[u, :count]).tolist(), found.tolist()))
        assert keys == sorted(keys)


# ---- trie -------------------------------------------------------------------------------------------


def hand_trie():
    # items: 0=[1,2] 1=[1,3] 2=[2] 3=[1]; EOS 0 sorts first among a node's children
    return Trie.build([[1, 2], [1, 3], [2], [1]], eos_id=0)


def test_trie_hand_example():
    t = hand_trie()
    expected = {
        "child_ptr": [0, 2, 5, 5, 6, 6, 7, 7, 8, 8],
        "child_token": [1, 2, 0, 2, 3, 0, 0, 0],
        "child_node": [1, 7, 2, 3, 5, 4, 6, 8],
        "leaf_item": [-1, -1, 3, -1, 0, -1, 1, -1, 2],
        "leaf_lo": [0, 0, 0, 1, 1, 2, 2, 3, 3],
        "leaf_hi": [4, 3, 1, 2, 2, 3, 3, 4, 4],
        "leaf_order": [3, 0, 1, 2],
        "step_lo": [1, 0, 0],  # step 0: tokens 1, 2; step 1: EOS, 2, 3 (after 1) and EOS (after 2); step 2: EOS
        "step_hi": [2, 3, 0],
    }
    for name, values in expected.items():
        arr = getattr(t, name)
        assert arr.dtype == (np.int64 if name == "child_ptr" else np.int32), name
        np.testing.assert_array_equal(arr, values, err_msg=name)
    assert (t.num_nodes, t.num_items, t.max_depth, t.eos_id, t.min_vocab) == (9, 4, 3, 0, 4)


@needs_native
def test_native_trie_is_built_once_and_matches():
    t = Trie.build(hand_trie()._sequences(), hand_trie().eos_id, backend="reference")
    assert t._native() is t._native()
    assert t._native() is t._native()
    for name in TRIE_ARRAYS:
        np.testing.assert_array_equal(getattr(t._native(), name), getattr(t, name), err_msg=name)


@needs_native
@given(item_sequences(max_items=30, vocab=7))
@settings(max_examples=100, deadline=None)
def test_native_trie_matches_python(case):
    seqs, eos, _ = case
    t = Trie.build(seqs, eos, backend="reference")  # the plain Python construction
    native = Trie.build(seqs, eos)._native()
    for name in TRIE_ARRAYS:
        np.testing.assert_array_equal(getattr(native, name), getattr(t, name), err_msg=name)
    assert (native.num_nodes, native.num_items, native.max_depth, native.eos_id) == (
        t.num_nodes, t.num_items, t.max_depth, t.eos_id)


@pytest.mark.parametrize("seqs, eos, match", [
    ([[1], []], 0, r"sequences\[1\] is empty"),
    ([[1, 0]], 0, r"sequences\[0\] contains eos"),
    ([[1, 2], [3], [1, 2]], 0, r"sequences\[2\] duplicates sequences\[0\]"),
    ([[1, -2]], 0, "sequences"),
    ([[1]], -1, "eos_id"),
])
def test_trie_rejects_bad_sequences(seqs, eos, match):
    with pytest.raises(ValueError, match=match):
        Trie.build(seqs, eos)
    if native_available():
        from genrec_fast import _core

        offsets = np.cumsum([0] + [len(s) for s in seqs])
        tokens = np.array([t for s in seqs for t in s], dtype=np.int64)
        with pytest.raises(ValueError, match=match):
            _core.Trie(tokens, offsets, eos)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_trie_is_done_at_once(backend):
    t = Trie.build([], eos_id=0)
    assert (t.num_nodes, t.num_items, t.max_depth) == (1, 0, 0)
    search = make_beam_search(t, 2, 2, 1, backend=backend)
    assert search.done() and len(search.active_users()) == 0
    items, scores = search.results()
    np.testing.assert_array_equal(items, -1)
    assert np.all(scores == -np.inf)


# ---- search -------------------------------------------------------------------------------------------


def searches_for(sc: Scenario):
    return [sc.search("reference")] + ([sc.search("cpp")] if native_available() else [])


@given(scenarios(), st.booleans())
@settings(max_examples=300, deadline=None)
def test_results_valid_and_backends_agree(sc, quantize):
    searches = searches_for(sc)
    run_lockstep(searches, random_logprobs(sc.vocab, sc.seed, quantize))
    items, scores = searches[0].results()
    for other in searches[1:]:
        np.testing.assert_array_equal(other.results()[0], items)
        np.testing.assert_array_equal(other.results()[1], scores)  # bit for bit
    check_results(sc, items, scores)


@given(scenarios(beams_cover_items=True))
@settings(max_examples=200, deadline=None)
def test_matches_brute_force_when_beams_cover_all_items(sc):
    table = log_softmax(np.random.default_rng(sc.seed).standard_normal((sc.trie.num_nodes, sc.vocab)))
    searches = searches_for(sc)
    run_lockstep(searches, NodeRows(sc.trie, table))
    expected_items, expected_scores = brute_force(sc, table)
    for search in searches:
        items, scores = search.results()
        np.testing.assert_array_equal(items, expected_items)
        np.testing.assert_array_equal(scores, expected_scores)


@needs_native
@given(scenarios(), st.sampled_from([np.nan, -np.inf, np.inf]))
@settings(max_examples=60, deadline=None)
def test_backends_agree_on_non_finite_logprobs(sc, value):
    rng = np.random.default_rng(sc.seed)
    base = random_logprobs(sc.vocab, sc.seed, dead_nan=False)

    def next_logprobs(search, out):
        rows = base(search, out)
        rows[rng.random(rows.shape) < 0.2] = value
        return rows

    searches = searches_for(sc)
    run_lockstep(searches, next_logprobs)
    (items, scores), (cpp_items, cpp_scores) = (s.results() for s in searches)
    np.testing.assert_array_equal(cpp_items, items)
    np.testing.assert_array_equal(cpp_scores, scores)  # NaN == NaN here


@needs_native
@pytest.mark.parametrize("filtered", [False, True])
@pytest.mark.parametrize("quantize", [False, True])
def test_wide_nodes_backends_agree(filtered, quantize):
    """Nodes with far more children than beams (the C++ search then keeps only the best num_beams so far
    and skips candidates that cannot beat them): exact agreement with the reference, ties and NaN included."""
    rng = np.random.default_rng(7)
    seqs = [[a] for a in range(1, 700)] + [[a, b] for a in range(1, 40) for b in range(1, 30)]
    trie = Trie.build(seqs, eos_id=0)
    n, users = trie.num_items, 12
    exclude = [rng.choice(n, size=300) for _ in range(users)] if filtered else None
    allow = rng.random(n) < 0.7 if filtered else None
    sc = Scenario(trie, 700, users, 5, 4, 0.0, exclude, allow, seed=3)
    make_rows = random_logprobs(sc.vocab, sc.seed, quantize)

    def rows_with_nan(search, out):
        rows = make_rows(search, out)
        rows[:, 5::97] = np.nan
        return rows

    searches = searches_for(sc)
    run_lockstep(searches, rows_with_nan)
    for a, b in zip(searches[1].results(), searches[0].results()):
        np.testing.assert_array_equal(a, b)
    check_results(sc, *searches[0].results())


@needs_native
def test_many_users_threaded_backend_agrees():
    seqs = [[a, b, c] for a in range(1, 6) for b in range(1, 6) for c in range(1, 4)] + [[a] for a in range(1, 6)]
    trie = Trie.build(seqs, eos_id=0)
    rng = np.random.default_rng(0)
    n, users = trie.num_items, 200
    sc = Scenario(trie, 8, users, 4, 3, 0.0, [rng.choice(n, size=10) for _ in range(users)],
                  rng.random((users, n)) < 0.5, seed=1)
    searches = searches_for(sc)
    run_lockstep(searches, random_logprobs(sc.vocab, sc.seed))
    np.testing.assert_array_equal(searches[1].results()[0], searches[0].results()[0])
    np.testing.assert_array_equal(searches[1].results()[1], searches[0].results()[1])
    check_results(sc, *searches[1].results())


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_layout_on_hand_trie(backend):
    # user 0 excludes item 0; user 1 has nothing allowed; width 1 before the first step
    search = make_beam_search(hand_trie(), 2, 3, 2, exclude=[[0], [0, 1, 2, 3]], backend=backend)
    np.testing.assert_array_equal(search.active_users(), [0])
    assert search.width == 1
    row = np.log(np.array([[0.1, 0.6, 0.3, 0.01]], dtype=np.float32))
    parent_rows, tokens = search.step(row)
    np.testing.assert_array_equal(parent_rows, [0, 0, 0])  # two live beams, one dead slot
    np.testing.assert_array_equal(tokens, [1, 2, 0])
    assert search.width == 3
    rows = np.log(np.array([[0.5, 0.01, 0.2, 0.3], [0.9, 0.1, 0.01, 0.01], [0.25] * 4], dtype=np.float32))
    parent_rows, tokens = search.step(rows)
    # finished [1] (0.6*0.5) and [2] (0.3*0.9); the best live beam [1,3] (0.18) cannot beat 0.27
    assert search.done() and len(parent_rows) == 0
    items, scores = search.results()
    np.testing.assert_array_equal(items, [[3, 2], [-1, -1]])
    np.testing.assert_allclose(np.exp(scores[0]), [0.3, 0.27], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accepts_cpu_torch_tensors(backend):
    torch = pytest.importorskip("torch")
    sc = Scenario(hand_trie(), 5, 2, 2, 2, 0.0, None, None, seed=3)
    from_numpy, from_torch = sc.search(backend), sc.search(backend)
    numpy_rows = random_logprobs(sc.vocab, sc.seed)

    def torch_rows(search, out):
        return torch.from_numpy(numpy_rows(search, out)).t().contiguous().t()  # a strided view

    run_lockstep([from_numpy], random_logprobs(sc.vocab, sc.seed))
    run_lockstep([from_torch], torch_rows)
    np.testing.assert_array_equal(from_torch.results()[0], from_numpy.results()[0])


def test_auto_backend_is_native_and_fails_loudly_without_it(monkeypatch):
    """"auto" never falls back to the Python search: a broken build is an ImportError naming it."""
    import sys
    import genrec_fast
    from genrec_fast import native
    trie = Trie.build([[1, 2], [1, 3], [2], [1]], eos_id=0, backend="reference")
    assert isinstance(make_beam_search(trie, 1, 2, 1), CppBeamSearch)
    native.core.cache_clear()
    monkeypatch.setitem(sys.modules, "genrec_fast._core", None)  # `from genrec_fast import _core` now fails
    monkeypatch.delattr(genrec_fast, "_core", raising=False)
    try:
        with pytest.raises(ImportError, match=r"genrec_fast._core \(the C\+\+ extension\) cannot be imported.*pip install"):
            make_beam_search(Trie.build([[1, 2], [1, 3], [2], [1]], eos_id=0, backend="reference"), 1, 2, 1)
        with pytest.raises(ImportError, match="cannot be imported"):
            Trie.build([[1]], eos_id=0)  # the C++ trie construction fails loudly too
        assert not native_available()
        ref = Trie.build([[1, 2], [1, 3], [2], [1]], eos_id=0, backend="reference")
        assert isinstance(make_beam_search(ref, 1, 2, 1, backend="reference"), ReferenceBeamSearch)
    finally:
        native.core.cache_clear()


# ---- errors -------------------------------------------------------------------------------------------


def test_bad_backend_name():
    with pytest.raises(ValueError, match=r"backend.*'auto', 'cpp', 'reference'.*'gpu'"):
        make_beam_search(hand_trie(), 1, 2, 1, backend="gpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, match", [
    (dict(num_beams=2, k=3), r"k \(3\) must be <= num_beams \(2\)"),
    (dict(num_beams=0, k=0), "num_beams and k must be >= 1"),
    (dict(exclude=[[0], [4]]), r"exclude\[1\].*outside \[0, 4\)"),
    (dict(exclude=[[0], [-1]]), r"exclude\[1\]"),
    (dict(exclude=[[0]]), "exclude must hold num_users=2"),
    (dict(exclude=[[0.5], []]), r"exclude\[0\] must hold integer"),
    (dict(allow=np.ones(3, dtype=bool)), "allow must have shape"),
    (dict(allow=np.ones(4, dtype=np.int64)), "allow must be a bool mask"),
    (dict(length_penalty=float("nan")), "length_penalty"),
])
def test_bad_arguments(backend, kwargs, match):
    args = dict(num_users=2, num_beams=2, k=1) | kwargs
    with pytest.raises(ValueError, match=match):
        make_beam_search(hand_trie(), **args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_logprobs(backend):
    search = make_beam_search(hand_trie(), 2, 2, 1, backend=backend)  # 2 rows, needs >= 4 columns
    good = np.zeros((2, 4), dtype=np.float32)
    for bad, match in [
        (good.astype(np.float64), "float32"),
        (good.tolist(), "float32"),
        (np.zeros((3, 4), dtype=np.float32), r"shape \(2, vocab\)"),
        (np.zeros(8, dtype=np.float32), "shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            search.step(bad)
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="float32"):
        search.step(torch.zeros(2, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="CPU"):
        search.step(torch.zeros(2, 4, device="meta"))
    for bad, offset in [(good[:, :2], 0), (good, 2), (good, -1), (good[:, :1], 1)]:  # step 0 reads tokens 1..2
        with pytest.raises(ValueError, match="columns from token"):
            search.step(bad, offset)
    search.step(good)  # still usable after the rejected calls


@given(scenarios(), st.booleans())
@settings(max_examples=150, deadline=None)
def test_windowed_steps_equal_vocabulary_wide_steps(sc, slack):
    """Every step fed only the columns of its `Trie.window` (plus, with slack, a column either side where there
    is one) steps exactly as the vocabulary-wide rows, on both backends."""
    make_rows = random_logprobs(sc.vocab, sc.seed)
    for backend in ["reference"] + (["cpp"] if native_available() else []):
        wide, narrow = sc.search(backend), sc.search(backend)
        out = None
        while not wide.done():
            rows = make_rows(wide, out)
            lo, hi = sc.trie.window(wide.steps)
            assert narrow.steps == wide.steps
            if slack:
                lo, hi = max(lo - 1, 0), min(hi + 1, sc.vocab)
            out = wide.step(rows)
            windowed = narrow.step(np.ascontiguousarray(rows[:, lo:hi]), lo)
            np.testing.assert_array_equal(windowed[0], out[0])
            np.testing.assert_array_equal(windowed[1], out[1])
        assert narrow.done()
        for a, b in zip(narrow.results(), wide.results()):
            np.testing.assert_array_equal(a, b)


@given(item_sequences(max_items=30, vocab=7))
@settings(max_examples=50, deadline=None)
def test_step_windows_are_the_tokens_at_each_depth(case):
    """step_lo[d] / step_hi[d]: the smallest / largest token at position d of any item followed by EOS."""
    seqs, eos, _ = case
    for backend in ["reference"] + (["cpp"] if native_available() else []):
        t = Trie.build(seqs, eos, backend=backend)
        for d in range(t.max_depth):
            at_d = [(s + [eos])[d] for s in seqs if len(s) >= d]
            assert t.window(d) == (min(at_d), max(at_d) + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_after_done(backend):
    search = make_beam_search(Trie.build([[1]], eos_id=0), 1, 1, 1, backend=backend)
    search.step(np.zeros((1, 2), dtype=np.float32))  # root -> [1]
    search.step(np.zeros((1, 2), dtype=np.float32))  # [1] -> EOS: no live beam left
    assert search.done()
    with pytest.raises(ValueError, match="done"):
        search.step(np.zeros((0, 2), dtype=np.float32))


@needs_native
def test_native_module_validates_on_its_own():
    from genrec_fast import _core

    trie = hand_trie()._native()
    with pytest.raises(ValueError, match="k"):
        _core.BeamSearch(trie, 1, 1, 2)
    with pytest.raises(ValueError, match="exclude"):
        _core.BeamSearch(trie, 1, 2, 1, 0.0, np.array([0, 1]), np.array([9]))
    with pytest.raises(ValueError, match="allow"):
        _core.BeamSearch(trie, 1, 2, 1, 0.0, None, None, np.ones(2, dtype=bool))
    search = _core.BeamSearch(trie, 1, 2, 1)
    with pytest.raises(ValueError, match="float32"):
        search.step(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="rows"):
        search.step(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"reads tokens 1\.\.2"):
        search.step(np.zeros((1, 2), dtype=np.float32))  # step 0 reads tokens 1..2
    with pytest.raises(ValueError, match=r"columns from token 2"):
        search.step(np.zeros((1, 4), dtype=np.float32), 2)
    search.step(np.zeros((1, 2), dtype=np.float32), 1)  # exactly the window
    assert search.steps == 1
