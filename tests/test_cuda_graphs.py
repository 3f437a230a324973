"""cuda_graphs.py: the captured decode loop equals the eager `device_beam_decode`.

On a CPU the capture is `capture_by_rerun` (replay = run the captured function again over the static inputs,
its outputs copied into the first run's tensors): every input of a call must reach the loop through the
static tensors, so one stale input (cross K/V, lengths, filters, initial beams) shows as wrong results
on the calls after the first. On a GPU the same checks run with the real `torch.cuda.CUDAGraph`.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from genrec_fast import Recommender, preset
from genrec_fast import cuda_graphs
from genrec_fast.cuda_graphs import capture_by_rerun, captured_count, graphed_search
from genrec_fast.decoding import decoder_steps
from genrec_fast.device_search import DeviceBeamSearch, DeviceTrie, device_beam_decode

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def pieces_rec():
    return Recommender.random([f"item{i}" for i in range(300)], "tiny", vocab_size=200, item_tokens="pieces")


def requests(rec, users: int, seed: int, filters: str, length: int = 8):
    rng = np.random.default_rng(seed)
    n = len(rec.catalog.item_ids)
    histories = [rng.choice(n, size=rng.integers(1, length), replace=False) for _ in range(users)]
    enc = {name: x.to(rec.device) for name, x in rec.encode_batch(histories, [None] * users).items()}
    exclude = [h.astype(np.int64) for h in histories] if filters in ("exclude", "both") else None
    allow = rng.random((users, n)) < 0.6 if filters in ("allow", "both") else None
    if allow is not None:
        allow[seed % users] = False  # a user done before the first step, a different one per seed
    return enc, exclude, allow


def graphed(rec, enc, k, beams, exclude, allow, length_penalty=0.0, capture=capture_by_rerun):
    """device_beam_decode's prefix, then `graphed_search` with the given capture."""
    model, trie = rec.model, rec.trie
    with torch.inference_mode():
        memory = model.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
        cache = model.start_decoding(memory, enc["mask"], enc["item_ids"])
        cache.capacity = trie.max_depth
        search = DeviceBeamSearch(DeviceTrie.for_device(trie, rec.device), enc["tokens"].shape[0], beams, k,
                                  length_penalty, exclude, allow)
        items, scores = graphed_search(model, trie, cache, search, decoder_steps(model, trie, "test"), capture)
    return items.cpu().numpy(), scores.cpu().numpy()


@pytest.mark.parametrize("filters", ["none", "exclude", "allow", "both"])
def test_replays_equal_eager_decodes(pieces_rec, filters):
    """Several batches of one shape through one captured loop (new histories, lengths, filters each time)."""
    rec = pieces_rec
    before = captured_count(rec.model)
    for seed in range(4):
        enc, exclude, allow = requests(rec, 5, seed, filters)
        want = device_beam_decode(rec.model, rec.trie, enc, 10, 12, exclude, allow, graphs=False)
        got = graphed(rec, enc, 10, 12, exclude, allow)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-6)
    assert captured_count(rec.model) >= before  # one graph per shape, reused across seeds


def test_one_graph_per_shape_and_lru_bound(pieces_rec, monkeypatch):
    rec = pieces_rec
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 3)
    cuda_graphs._graphs.pop(rec.model, None)
    for users in (1, 2, 3, 2, 4):  # four shapes, one repeated
        enc, exclude, allow = requests(rec, users, users, "none")
        want = device_beam_decode(rec.model, rec.trie, enc, 5, 6, graphs=False)
        got = graphed(rec, enc, 5, 6, None, None)
        np.testing.assert_array_equal(got[0], want[0])
    assert captured_count(rec.model) == 3


def test_length_penalty_and_long_encoder(pieces_rec):
    """Encoder lengths inside one 16-bucket share a graph; the padding keys beyond a batch's length are
    masked (a shorter batch after a longer one)."""
    rec = pieces_rec
    for seed, length in ((0, 12), (1, 3), (2, 12)):
        enc, exclude, allow = requests(rec, 3, seed, "both", length)
        want = device_beam_decode(rec.model, rec.trie, enc, 6, 8, exclude, allow, 0.7, graphs=False)
        got = graphed(rec, enc, 6, 8, exclude, allow, 0.7)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-6)


def test_failed_capture_warns_and_decodes_eagerly(pieces_rec):
    rec = pieces_rec
    cuda_graphs._graphs.pop(rec.model, None)

    def broken(run):
        raise RuntimeError("operation not permitted when stream is capturing")

    enc, exclude, allow = requests(rec, 2, 5, "exclude")
    want = device_beam_decode(rec.model, rec.trie, enc, 5, 6, exclude, allow, graphs=False)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        got = graphed(rec, enc, 5, 6, exclude, allow, capture=broken)
    np.testing.assert_array_equal(got[0], want[0])
    got = graphed(rec, enc, 5, 6, exclude, allow, capture=broken)  # remembered: no second try, no warning
    np.testing.assert_array_equal(got[0], want[0])
    assert captured_count(rec.model) == 0


def test_unsupported_models_and_cpu_run_eagerly():
    """graphs=True on a CPU model decodes eagerly; the leaf head (host state per step) and ensembles are never
    captured."""
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False)
    rec = Recommender.random([f"item{i}" for i in range(150)], cfg, vocab_size=200, item_tokens="whole")
    enc, exclude, allow = requests(rec, 3, 0, "both")
    want = device_beam_decode(rec.model, rec.trie, enc, 8, 8, exclude, allow, graphs=False)
    got = device_beam_decode(rec.model, rec.trie, enc, 8, 8, exclude, allow, graphs=True)
    np.testing.assert_array_equal(got[0], want[0])
    assert captured_count(rec.model) == 0
    assert cuda_graphs.graphs_supported(rec.model) == ""
    leafy = copy.copy(rec.model)
    leafy.cfg = dataclasses.replace(rec.model.cfg, leaf_head=True)
    assert "leaf head" in cuda_graphs.graphs_supported(leafy)
    assert "ensembles" in cuda_graphs.graphs_supported(object())


# ---- on a GPU: the real capture ---------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("filters", ["none", "both"])
def test_cuda_graph_replays_equal_eager(filters):
    rec = Recommender.random([f"item{i}" for i in range(300)], "tiny", vocab_size=200, item_tokens="pieces")
    rec.model.to("cuda")
    for seed in range(3):
        enc, exclude, allow = requests(rec, 4, seed, filters)
        want = device_beam_decode(rec.model, rec.trie, enc, 10, 12, exclude, allow, graphs=False)
        got = device_beam_decode(rec.model, rec.trie, enc, 10, 12, exclude, allow, graphs=True)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)
    assert captured_count(rec.model) >= 1  # captured, not fallen back (encoder lengths may span two buckets)


class _NoHostReads:
    """While active, any Python-level read of tensor data by the host, or an op whose output shape depends on
    the data, raises: the operations a CUDA graph capture cannot contain (they synchronise)."""

    METHODS = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__",
               "masked_select", "unique")
    FUNCTIONS = ("nonzero", "unique", "masked_select", "argwhere")

    def __enter__(self):
        self.saved = [(torch.Tensor, n, getattr(torch.Tensor, n)) for n in self.METHODS]
        self.saved += [(torch, n, getattr(torch, n)) for n in self.FUNCTIONS]
        self.saved.append((torch.Tensor, "__getitem__", torch.Tensor.__getitem__))
        for owner, name, _ in self.saved[:-1]:
            setattr(owner, name, self._refuse(name))
        getitem = torch.Tensor.__getitem__

        def checked_getitem(t, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                raise AssertionError("boolean-mask indexing (a data-dependent shape) inside the decode loop")
            return getitem(t, index)

        torch.Tensor.__getitem__ = checked_getitem
        return self

    def __exit__(self, *exc):
        for owner, name, fn in self.saved:
            setattr(owner, name, fn)

    @staticmethod
    def _refuse(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"{name} inside the decode loop: a host sync a CUDA graph cannot capture")
        return refuse


@pytest.mark.parametrize("filters", ["none", "both"])
def test_decode_loop_never_reads_device_data(pieces_rec, filters, monkeypatch):
    """The loop `graphed_search` captures (decoder steps + device search), run on a CPU with every host read
    of tensor data refused: on a GPU it then has nothing a capture would reject. The eager prefix (encoder,
    start_decoding, the search's filters) may read; the loop may not. (attention's key-length range check
    runs on CPU tensors only, so it is switched off here, as on a GPU; the CPU attention itself is a
    different code path than the GPU's kernel / SDPA, so this is a proxy, not the capture.)"""
    import importlib

    monkeypatch.setattr(importlib.import_module("genrec_fast.kernels.attention"), "_check_key_lengths",
                        lambda *args: None)
    rec = pieces_rec
    enc, exclude, allow = requests(rec, 4, 7, filters)
    model, trie = rec.model, rec.trie
    with torch.inference_mode():
        memory = model.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"])
        cache = model.start_decoding(memory, enc["mask"], enc["item_ids"])
        cache.capacity = trie.max_depth
        search = DeviceBeamSearch(DeviceTrie.for_device(trie, "cpu"), 4, 12, 10, 0.0, exclude, allow)
        step_fn = cuda_graphs.decode_step_fn(model, trie, cache, 4, decoder_steps(model, trie, "test"))
        with _NoHostReads():
            items, scores = cuda_graphs.run_search(search, step_fn, stop_early=False)
    want = device_beam_decode(rec.model, rec.trie, enc, 10, 12, exclude, allow, graphs=False)
    np.testing.assert_array_equal(items.numpy(), want[0])


def test_no_host_reads_guard_catches_a_sync():
    with _NoHostReads(), pytest.raises(AssertionError, match="item inside the decode loop"):
        torch.ones(2).sum().item()
    with _NoHostReads(), pytest.raises(AssertionError, match="boolean-mask"):
        torch.ones(3)[torch.tensor([True, False, True])]
    assert torch.ones(2).sum().item() == 2.0  # restored
