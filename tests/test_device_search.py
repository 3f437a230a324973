"""Device-resident trie beam search (device_search.py) against the C++ and reference searches
(docs/beam_search_spec.md): the same live beams after every step and the same results, bit for bit, on
random tries; the decoding loop against `beam_decode`; argument errors. CPU here; CUDA tests skip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_fast import Recommender, preset
from genrec_fast.beam_search import Trie, native_available
from genrec_fast.device_search import DeviceBeamSearch, DeviceTrie, device_beam_decode, device_beam_search

from test_beam_search import Scenario, hand_trie  # the host tests' scenario and hand example

HOST_BACKENDS = ["reference"] + (["cpp"] if native_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def device_search(sc: Scenario, device="cpu") -> DeviceBeamSearch:
    """The scenario's search on `device` (its host searches: `sc.search(backend)`)."""
    return DeviceBeamSearch(DeviceTrie.from_trie(sc.trie, device), sc.num_users, sc.num_beams, sc.k,
                            sc.length_penalty, sc.exclude, sc.allow)


@st.composite
def scenarios(draw, max_items: int = 10, max_users: int = 4):
    """Distinct items of 1..4 pieces (mixed lengths), EOS anywhere in the vocab, filters, k <= num_beams
    (often more beams and k than allowed items)."""
    vocab = draw(st.integers(4, 7))
    eos = draw(st.integers(0, vocab - 1))
    piece = st.integers(0, vocab - 2).map(lambda t: t if t < eos else t + 1)  # any token but EOS
    seqs = draw(st.lists(st.lists(piece, min_size=1, max_size=4).map(tuple), min_size=1, max_size=max_items,
                         unique=True))
    trie = Trie.build([list(s) for s in seqs], eos)
    n, num_users, num_beams = trie.num_items, draw(st.integers(1, max_users)), draw(st.integers(1, 6))
    k = draw(st.integers(1, num_beams))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    exclude = None
    if draw(st.booleans()):
        exclude = [rng.choice(n, size=rng.integers(0, n + 1)) for _ in range(num_users)]  # with repeats
    allow = draw(st.sampled_from([None, (n,), (num_users, n)]))
    if allow is not None:
        allow = rng.random(allow) < rng.uniform(0.1, 1.0)  # some users with no allowed item
    lp = draw(st.sampled_from([0.0, 0.0, 0.6, 1.0, -0.5]))
    return Scenario(trie, vocab, num_users, num_beams, k, lp, exclude, allow, seed)


# ---- the same log-probabilities whatever the row layout ------------------------------------------------


class PrefixLogprobs:
    """log_softmax row of a deterministic function of (user, prefix tokens); dead rows (prefix ends in EOS) NaN.
    quantize: rounded, so many exact ties; nonfinite: a value put in ~20% of the entries."""

    def __init__(self, vocab: int, seed: int, quantize: bool = False, nonfinite: float | None = None):
        self.vocab, self.seed, self.quantize, self.nonfinite = vocab, seed, quantize, nonfinite
        self.memo: dict = {}

    def row(self, user: int, prefix: tuple) -> np.ndarray:
        if (user, prefix) not in self.memo:
            rng = np.random.default_rng([self.seed, user, *prefix])
            x = torch.log_softmax(torch.from_numpy(rng.standard_normal(self.vocab)).float(), 0).numpy()
            if self.quantize:
                x = np.round(x).astype(np.float32)
            if self.nonfinite is not None:
                x[rng.random(self.vocab) < 0.2] = self.nonfinite
            self.memo[user, prefix] = x
        return self.memo[user, prefix]

    def rows(self, users: np.ndarray, prefixes: list, eos: int) -> np.ndarray:
        out = np.full((len(users), self.vocab), np.nan, dtype=np.float32)
        for r, (u, p) in enumerate(zip(users, prefixes)):
            if eos not in p:
                out[r] = self.row(int(u), p)
        return out


class Driver:
    """One search and its rows' users and prefixes; `users()` lists the users whose rows come next."""

    def __init__(self, search, users, logprobs: PrefixLogprobs, eos: int, to_input=lambda x: x):
        self.search, self.users, self.logprobs, self.eos, self.to_input = search, users, logprobs, eos, to_input
        self.row_users = np.repeat(users(), search.width)
        self.prefixes = [()] * len(self.row_users)

    def step(self) -> None:
        old_users = self.row_users
        parent, tokens = self.search.step(self.to_input(self.logprobs.rows(old_users, self.prefixes, self.eos)))
        parent, tokens = np.asarray(torch.as_tensor(parent).cpu()), np.asarray(torch.as_tensor(tokens).cpu())
        assert parent.dtype == tokens.dtype == np.int64
        self.row_users = np.repeat(self.users(), len(parent) // max(1, len(self.users())))
        assert len(self.row_users) == len(parent)
        assert np.all(old_users[parent] == self.row_users)  # a row extends a row of its own user
        self.prefixes = [self.prefixes[p] + (int(t),) for p, t in zip(parent, tokens)]

    def live(self) -> dict:
        """user -> live beams' prefixes in slot order."""
        out: dict = {}
        for u, p in zip(self.row_users, self.prefixes):
            if self.eos not in p:
                out.setdefault(int(u), []).append(p)
        return out


def device_driver(sc: Scenario, logprobs: PrefixLogprobs, device="cpu") -> Driver:
    search = device_search(sc, device)
    return Driver(search, lambda: np.arange(sc.num_users), logprobs, sc.trie.eos_id,
                  lambda x: torch.from_numpy(x).to(device))


def run_against_host(sc: Scenario, backend: str, logprobs: PrefixLogprobs, device="cpu"):
    """Steps both searches; after every step each user's live beams (prefixes, in order) are the same."""
    host = sc.search(backend)
    h = Driver(host, host.active_users, logprobs, sc.trie.eos_id)
    d = device_driver(sc, logprobs, device)
    assert d.search.width == (1 if sc.trie.num_items else 0)
    while not d.search.exhausted:
        if not host.done():
            h.step()
        d.step()
        assert d.live() == (h.live() if not host.done() else {})
        check_dead_slots(d)
    assert host.done() and d.search.done() and len(d.search.active_users()) == 0
    return host.results(), d.search.results()


def check_dead_slots(d: Driver) -> None:
    """Live slots come first in each user's rows; dead slots end in EOS."""
    width = d.search.width
    if width == 0:
        return
    live = np.array([d.eos not in p for p in d.prefixes]).reshape(-1, width)
    assert np.all(live[:, 1:] <= live[:, :-1])


def assert_same_results(host_results, device_results):
    (items, scores), (d_items, d_scores) = host_results, device_results
    assert d_items.dtype == np.int64 and d_scores.dtype == np.float32
    np.testing.assert_array_equal(d_items, items)
    np.testing.assert_array_equal(d_scores, scores)  # bit for bit (NaN == NaN here)


# ---- the trie -------------------------------------------------------------------------------------------


def test_device_trie_hand_example():
    d = DeviceTrie.from_trie(hand_trie())
    expected = {"child_ptr": [0, 2, 4, 4, 4, 4, 4, 4, 4, 4], "child_token": [1, 2, 2, 3],
                "child_node": [1, 7, 3, 5], "eos_child": [-1, 2, -1, 4, -1, 6, -1, 8, -1]}
    for name, values in expected.items():
        assert getattr(d, name).dtype == torch.int64
        assert getattr(d, name).tolist() == values, name
    assert (d.inner, d.branch, d.widths(3), d.widths(1)) == ([1, 2, 2, 0], [2, 2, 0, 0], [1, 2, 2, 0], [1, 1, 1, 0])
    assert DeviceTrie.for_device(d.host, "cpu") is DeviceTrie.for_device(d.host, torch.device("cpu"))


@given(scenarios(max_items=12))
@settings(max_examples=40, deadline=None)
def test_device_trie_holds_every_edge(sc):
    t, d = sc.trie, DeviceTrie.from_trie(sc.trie)
    ptr, tok, node, eos_child = (getattr(d, a).numpy() for a in ("child_ptr", "child_token", "child_node", "eos_child"))
    for n in range(t.num_nodes):
        edges = set(zip(t.child_token[t.child_ptr[n]:t.child_ptr[n + 1]].tolist(),
                        t.child_node[t.child_ptr[n]:t.child_ptr[n + 1]].tolist()))
        ours = list(zip(tok[ptr[n]:ptr[n + 1]].tolist(), node[ptr[n]:ptr[n + 1]].tolist()))
        assert ours == sorted(ours) and t.eos_id not in dict(ours)
        assert set(ours) | ({(t.eos_id, int(eos_child[n]))} if eos_child[n] >= 0 else set()) == edges


# ---- the search against the host searches ------------------------------------------------------------


@given(scenarios(), st.sampled_from(HOST_BACKENDS), st.booleans())
@settings(max_examples=120, deadline=None)
def test_same_beams_and_results_as_host_search(sc, backend, quantize):
    host, device = run_against_host(sc, backend, PrefixLogprobs(sc.vocab, sc.seed, quantize))
    assert_same_results(host, device)


@given(scenarios(), st.sampled_from([np.nan, -np.inf, np.inf]))
@settings(max_examples=40, deadline=None)
def test_non_finite_logprobs_as_host_search(sc, value):
    host, device = run_against_host(sc, HOST_BACKENDS[-1], PrefixLogprobs(sc.vocab, sc.seed, nonfinite=value))
    assert_same_results(host, device)


def test_hand_trie_layout_and_results():
    # user 0 excludes item 0; user 1 has nothing allowed: its rows stay, all dead
    search = DeviceBeamSearch(DeviceTrie.from_trie(hand_trie()), 2, 3, 2, exclude=[[0], [0, 1, 2, 3]])
    assert search.width == 1 and search.active_users().tolist() == [0]
    parent, tokens = search.step(torch.log(torch.tensor([[0.1, 0.6, 0.3, 0.01]] * 2)))
    assert search.width == 2  # only two nodes of depth 1 have children: never 3 beams
    assert parent.tolist() == [0, 0, 1, 1] and tokens.tolist() == [1, 2, 0, 0]
    rows = torch.log(torch.tensor([[0.5, 0.01, 0.2, 0.3], [0.9, 0.1, 0.01, 0.01], [0.25] * 4, [0.25] * 4]))
    parent, tokens = search.step(rows)
    # finished [1] (0.6*0.5) and [2] (0.3*0.9); the best live beam [1,3] (0.18) cannot beat 0.27: user 0 stops
    assert parent.tolist() == [0, 0, 2, 2] and tokens.tolist() == [0, 0, 0, 0]
    assert search.done() and not search.exhausted and search.width == 2
    items, scores = search.results()
    np.testing.assert_array_equal(items, [[3, 2], [-1, -1]])
    np.testing.assert_allclose(np.exp(scores[0]), [0.3, 0.27], rtol=1e-6)
    assert scores[1].tolist() == [-np.inf, -np.inf]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_empty_trie_and_users_without_items(backend):
    empty = Scenario(Trie.build([], eos_id=0), 4, 2, 2, 1, 0.0, None, None, 0)
    search = device_search(empty)
    assert search.exhausted and search.done() and len(search.active_users()) == 0
    assert_same_results(empty.search(backend).results(), search.results())
    no_users = device_search(Scenario(hand_trie(), 4, 0, 2, 1, 0.0, [], np.ones(4, bool), 0))
    assert no_users.exhausted and no_users.results()[0].shape == (0, 1)
    # k = 5 > 3 items; user 1 has none allowed, user 2 one
    t = Trie.build([[1, 2], [1, 3], [2]], eos_id=0)
    allow = np.array([[True, True, True], [False, False, False], [False, True, False]])
    sc = Scenario(t, 4, 3, 6, 5, 0.0, None, allow, 7)
    host, device = run_against_host(sc, backend, PrefixLogprobs(4, 7))
    assert_same_results(host, device)
    assert (device[0] >= 0).sum(1).tolist() == [3, 0, 1]


def test_driver_with_step_fn_and_stop_early():
    rng = np.random.default_rng(0)
    seqs = [[a, b, c][:n] for a in range(1, 6) for b in range(1, 5) for c in range(1, 4) for n in (1, 3)]
    trie = Trie.build([list(s) for s in {tuple(s) for s in seqs}], eos_id=0)
    U, n = 16, trie.num_items
    sc = Scenario(trie, 8, U, 5, 3, 0.0, [rng.choice(n, size=8) for _ in range(U)], rng.random((U, n)) < 0.5, 3)
    logprobs = PrefixLogprobs(8, 3)
    expected = run_against_host(sc, HOST_BACKENDS[-1], logprobs)[0]
    for stop_early in (False, True):
        state = {"users": np.arange(U), "prefixes": [()] * U, "calls": 0}

        def step_fn(parent, tokens):
            state["calls"] += 1
            if parent is not None:
                assert parent.device == tokens.device == torch.device("cpu")
                state["users"] = np.repeat(np.arange(U), len(parent) // U)
                state["prefixes"] = [state["prefixes"][p] + (t,) for p, t in zip(parent.tolist(), tokens.tolist())]
            return torch.from_numpy(logprobs.rows(state["users"], state["prefixes"], 0)), 0

        items, scores = device_beam_search(step_fn, DeviceTrie.from_trie(trie), U, 5, 3, sc.exclude, sc.allow,
                                           stop_early=stop_early)
        assert_same_results(expected, (items.numpy(), scores.numpy()))
        assert state["calls"] <= trie.max_depth and (stop_early or state["calls"] == trie.max_depth)


# ---- errors -----------------------------------------------------------------------------------------------


def bad_steps():
    lp = torch.zeros(2, 4)
    return [
        (np.zeros((2, 4), np.float32), "logprobs must be a torch.Tensor"),
        (lp.double(), "logprobs must be float32"),
        (torch.zeros(3, 4), r"logprobs must have shape \(2, vocab\) = all 2 users x width 1"),
        (torch.zeros(2, 2), r"2 columns from token 0, but step 0 reads tokens 1\.\.2"),
        (torch.zeros(2, 4, device="meta"), "logprobs must be on the search's device cpu"),
    ]


@pytest.mark.parametrize("logprobs, match", bad_steps())
def test_step_rejects_bad_logprobs(logprobs, match):
    search = DeviceBeamSearch(DeviceTrie.from_trie(hand_trie()), 2, 3, 2)
    with pytest.raises(ValueError, match=match):
        search.step(logprobs)


@given(scenarios(), st.booleans())
@settings(max_examples=100, deadline=None)
def test_windowed_steps_equal_vocabulary_wide_steps(sc, slack):
    """Every step fed only the columns of its `Trie.window` (with slack, a column more either side where
    there is one) steps exactly as the vocabulary-wide rows."""
    wide, narrow = device_search(sc), device_search(sc)
    rng = np.random.default_rng(sc.seed)
    while not wide.exhausted:
        rows = torch.log_softmax(torch.from_numpy(rng.standard_normal((sc.num_users * wide.width, sc.vocab))), 1)
        rows = rows.float()  # (U * width, V)
        lo, hi = sc.trie.window(wide.steps)
        if slack:
            lo, hi = max(lo - 1, 0), min(hi + 1, sc.vocab)
        assert narrow.steps == wide.steps
        for a, b in zip(narrow.step(rows[:, lo:hi].contiguous(), lo), wide.step(rows)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert narrow.exhausted
    for a, b in zip(narrow.results(), wide.results()):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments():
    d = DeviceTrie.from_trie(hand_trie())
    with pytest.raises(ValueError, match=r"k \(3\) must be <= num_beams \(2\)"):
        DeviceBeamSearch(d, 1, 2, 3)
    with pytest.raises(ValueError, match="exclude"):
        DeviceBeamSearch(d, 1, 2, 1, exclude=[[4]])
    with pytest.raises(ValueError, match="allow"):
        DeviceBeamSearch(d, 1, 2, 1, allow=np.ones(3, bool))
    with pytest.raises(ValueError, match="trie must be a DeviceTrie"):
        DeviceBeamSearch(hand_trie(), 1, 2, 1)
    with pytest.raises(ValueError, match="trie must be a genrec_fast.beam_search.Trie"):
        DeviceTrie.from_trie([[1, 2]])
    search = DeviceBeamSearch(d, 1, 1, 1)
    while not search.exhausted:
        search.step(torch.zeros(search.width, 4))
    with pytest.raises(ValueError, match="exhausted"):
        search.step(torch.zeros(1, 4))


# ---- decoding with a model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pieces_rec():
    return Recommender.random([f"item{i}" for i in range(300)], "tiny", vocab_size=200, item_tokens="pieces")


def random_requests(rec, users: int, seed: int):
    rng = np.random.default_rng(seed)
    n = len(rec.catalog.item_ids)
    histories = [rng.choice(n, size=rng.integers(1, 8), replace=False) for _ in range(users)]
    enc = rec.encode_batch(histories, [None] * users)
    allow = rng.random((users, n)) < 0.6
    allow[0] = False  # a user with nothing allowed
    return enc, [h.astype(np.int64) for h in histories], allow


@pytest.mark.parametrize("length_penalty, filters", [(0.0, False), (0.0, True), (0.7, True)])
def test_decode_equals_beam_decode(pieces_rec, length_penalty, filters):
    rec = pieces_rec
    assert rec.trie.max_depth >= 3  # items of several pieces
    enc, exclude, allow = random_requests(rec, 6, seed=1)
    if not filters:
        exclude = allow = None
    expected = rec.decode(enc, 10, 12, exclude, allow, backend=HOST_BACKENDS[-1], length_penalty=length_penalty)
    for stop_early in (False, True):
        items, scores = device_beam_decode(rec.model, rec.trie, enc, 10, 12, exclude, allow, length_penalty,
                                           stop_early=stop_early)
        np.testing.assert_array_equal(items, expected[0])
        np.testing.assert_allclose(scores, expected[1], rtol=0, atol=1e-5)


def test_recommend_equals_cpp_backend(pieces_rec):
    rec = pieces_rec
    rng = np.random.default_rng(2)
    histories = [[rec.catalog.item_ids[i] for i in rng.choice(300, 5, replace=False)] for _ in range(4)]
    expected = rec.recommend(histories, k=20, exclude_seen=True, backend=HOST_BACKENDS[-1])
    idx = [[rec.catalog.item_index[x] for x in h] for h in histories]
    enc = rec.encode_batch([np.array(h) for h in idx], [None] * 4)
    items, scores = device_beam_decode(rec.model, rec.trie, enc, 20, 20, exclude=[np.array(h) for h in idx])
    for want, got_items, got_scores in zip(expected, items, scores):
        assert [rec.catalog.item_ids[i] for i in got_items] == want.items
        np.testing.assert_allclose(got_scores, want.scores, rtol=0, atol=1e-5)


def test_decode_without_eos_step():
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False)
    rec = Recommender.random([f"item{i}" for i in range(150)], cfg, vocab_size=200, item_tokens="whole")
    assert rec.trie.max_depth == 2
    enc, exclude, allow = random_requests(rec, 5, seed=3)
    expected = rec.decode(enc, 8, 8, exclude, allow, backend=HOST_BACKENDS[-1])
    items, scores = device_beam_decode(rec.model, rec.trie, enc, 8, 8, exclude, allow)
    np.testing.assert_array_equal(items, expected[0])
    np.testing.assert_allclose(scores, expected[1], rtol=0, atol=1e-5)


# ---- CUDA (skipped without a GPU) ------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
@given(scenarios(), st.booleans())
@settings(max_examples=30, deadline=None)
def test_cuda_same_beams_and_results_as_host_search(sc, quantize):
    host, device = run_against_host(sc, HOST_BACKENDS[-1], PrefixLogprobs(sc.vocab, sc.seed, quantize), "cuda")
    assert_same_results(host, device)


@pytest.mark.cuda
@needs_cuda
def test_cuda_steps_never_sync():
    rng = np.random.default_rng(0)
    seqs = {(a, b, c) for a in range(1, 30) for b in range(1, 30) for c in range(1, 5)}
    trie = Trie.build([list(s) for s in sorted(seqs)], eos_id=0)
    U, n = 8, trie.num_items
    search = DeviceBeamSearch(DeviceTrie.from_trie(trie, "cuda"), U, 6, 4, 0.5, [rng.choice(n, 20) for _ in range(U)],
                              rng.random((U, n)) < 0.5)
    rows = [torch.randn(U * w, 32, device="cuda").log_softmax(-1) for w in (1, 6, 6, 6)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for lp in rows:
            search.step(lp)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert search.exhausted


@pytest.mark.cuda
@needs_cuda
def test_cuda_decode_equals_cpp(pieces_rec):
    rec = pieces_rec
    enc, exclude, allow = random_requests(rec, 6, seed=4)
    expected = rec.decode(enc, 10, 12, exclude, allow, backend=HOST_BACKENDS[-1])
    rec.model.cuda()
    try:
        enc = {name: x.cuda() for name, x in enc.items()}
        items, scores = device_beam_decode(rec.model, rec.trie, enc, 10, 12, exclude, allow)
    finally:
        rec.model.cpu()
    np.testing.assert_array_equal(items, expected[0])
    np.testing.assert_allclose(scores, expected[1], rtol=0, atol=1e-4)  # GPU vs CPU matmuls
