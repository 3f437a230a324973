"""The decoder steps and the device search of `device_beam_decode` as one CUDA graph per batch shape.

At batch 1 a decode is hundreds of small kernels, each launched from Python: the GPU waits on the host.
`device_search` already keeps the whole loop free of host syncs and data-dependent shapes, so it can be
captured once and replayed. Per call only the encoder, `start_decoding` and the search's initial state run
eagerly (they synchronise: the packed encoder's `nonzero`, the filters' host-to-device copies); their
outputs are copied into the captured loop's static inputs, the graph replays, and the (U, k) results are
read back.

A graph is kept per model, trie and (users, encoder length rounded up to 16, beams, k, length penalty,
filter layout, the weights' addresses), at most `MAX_GRAPHS` per model and trie (least recently used
dropped). Models whose steps carry
per-step host logic (history or transition bias over codes, the leaf head) and ensembles run eagerly.
If a capture fails (an op that synchronises, say), that shape runs eagerly from then on, with a warning.

`capture=` lets tests replace the CUDA capture with `capture_by_rerun` (the function re-run on each
"replay", its outputs copied into the first run's tensors): on a CPU that checks every input reaches the
loop through the static tensors, and the results equal the eager decode's.
"""
from __future__ import annotations

import copy
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Callable

import torch

from .device_search import DeviceBeamSearch, decode_step_fn, run_search
from .model import DecoderCache, GenRec

__all__ = ["graphed_search", "capture_cuda", "capture_by_rerun", "captured_count", "MAX_GRAPHS"]

MAX_GRAPHS = 8  # per model: each holds its own memory pool (the loop's intermediates)
S_BUCKET = 16  # encoder lengths share a graph within multiples of 16 (the padding keys are masked)
_STATE = ("_active", "_node", "_score", "_live", "_pool_item", "_pool_score", "_pool_valid", "_usable")
_graphs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> trie -> OrderedDict(key -> graph)
_lock = threading.Lock()


def capture_cuda(run: Callable[[], tuple]):
    """-> (replay(), outputs): run() once on a side stream (lazy initialisations stay out of the graph),
    then captured into a torch.cuda.CUDAGraph; replay() re-executes its kernels on the same memory."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads' CUDA work may go on
        out = run()
    return graph.replay, out


def capture_by_rerun(run: Callable[[], tuple]):
    """A stand-in for `capture_cuda` on any device: replay() runs run() again and copies its outputs into
    the first run's tensors (which the caller holds, as it holds a graph's outputs)."""
    out = run()

    def replay():
        for dst, src in zip(out, run()):
            dst.copy_(src)

    return replay, out


def graphs_supported(model) -> str:
    """Why `model`'s decode cannot be captured ("" when it can)."""
    if not isinstance(model, GenRec):
        return f"{type(model).__name__} (ensembles run eagerly)"
    if model.cfg.leaf_head or model.history is not None or model.transition is not None:
        return "the leaf head and the biases over codes keep per-step host state"
    return ""


class _Captured:
    """One captured decode: static inputs (cross-attention K/V and lengths, the search's initial state), the
    replay function and its output tensors (items, scores) (U, k)."""

    def __init__(self, model, trie, cache: DecoderCache, search: DeviceBeamSearch, model_steps: int,
                 S: int, capture):
        self.model, self.trie, self.model_steps = model, trie, model_steps
        U, H, _, hd = cache.cross_k[0].shape
        self.cross_k = [k.new_zeros((U, H, S, hd)) for k in cache.cross_k]  # padding keys stay 0 (masked)
        self.cross_v = [v.new_zeros((U, H, S, hd)) for v in cache.cross_v]
        self.lengths = cache.lengths.clone()
        self.template = copy.copy(search)  # the search's settings; its state tensors are replaced below
        self.state = {name: None if getattr(search, name) is None else getattr(search, name).clone()
                      for name in _STATE}
        self.load(cache, search)
        self.replay, (self.items, self.scores) = capture(self._run)

    def load(self, cache: DecoderCache, search: DeviceBeamSearch) -> None:
        """Copies one call's inputs into the static tensors."""
        S = cache.cross_k[0].shape[2]
        for dst, src in zip(self.cross_k + self.cross_v, cache.cross_k + cache.cross_v):
            dst[:, :, :S].copy_(src)
        self.lengths.copy_(cache.lengths)
        for name, dst in self.state.items():
            if dst is not None:
                dst.copy_(getattr(search, name))

    def _run(self) -> tuple:
        """The loop over the static inputs (what the graph holds)."""
        n = len(self.cross_k)
        cache = DecoderCache(list(self.cross_k), list(self.cross_v), self.lengths, [None] * n, [None] * n,
                             capacity=self.trie.max_depth)
        search = copy.copy(self.template)
        for name, t in self.state.items():
            setattr(search, name, t)
        step_fn = decode_step_fn(self.model, self.trie, cache, search.num_users, self.model_steps)
        return run_search(search, step_fn, stop_early=False)


def _key(model, cache: DecoderCache, search: DeviceBeamSearch) -> tuple:
    """The batch shape, and where the model's weights live (a graph reads them at fixed addresses: moved or
    re-cast weights need a new one)."""
    U, _, S, _ = cache.cross_k[0].shape
    usable = None if search._usable is None else tuple(search._usable.shape)
    return (U, -(-S // S_BUCKET) * S_BUCKET, search.num_beams, search.k, float(search.length_penalty), usable,
            cache.cross_k[0].dtype, str(cache.cross_k[0].device), tuple(p.data_ptr() for p in model.parameters()))


def graphed_search(model, trie, cache: DecoderCache, search: DeviceBeamSearch, model_steps: int,
                   capture=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`run_search(search, decode_step_fn(...))` through a captured graph -> (items, scores) (U, k) tensors
    (copies: the next call overwrites the graph's outputs). Falls back to the eager loop where graphs
    cannot run (`graphs_supported`, a failed capture). Threads are serialised on the host only: callers must
    share one CUDA stream (recommend() and the server use the current one), or a load could overwrite the
    static inputs of a replay still running on another stream."""
    why = graphs_supported(model)
    if capture is None and cache.lengths.device.type != "cuda":
        why = why or "the model is not on a CUDA device"
    if why:
        return run_search(search, decode_step_fn(model, trie, cache, search.num_users, model_steps))
    capture = capture or capture_cuda
    key = _key(model, cache, search)
    with _lock:
        graphs = _graphs.setdefault(model, weakref.WeakKeyDictionary()).setdefault(trie, OrderedDict())
        entry = graphs.get(key)
        if entry is None:
            try:
                entry = _Captured(model, trie, cache, search, model_steps, key[1], capture)
            except Exception as err:  # noqa: BLE001 - any capture failure: this shape runs eagerly
                warnings.warn(f"CUDA graph capture failed for batch shape {key[:7]}: {err}; decoding it eagerly",
                              RuntimeWarning, stacklevel=2)
                entry = False
            graphs[key] = entry
            while len(graphs) > MAX_GRAPHS:
                graphs.popitem(last=False)
        graphs.move_to_end(key)
        if entry is False:
            return run_search(search, decode_step_fn(model, trie, cache, search.num_users, model_steps))
        entry.load(cache, search)  # (a capture records its kernels without running them: replay even then)
        entry.replay()
        return entry.items.clone(), entry.scores.clone()


def captured_count(model) -> int:
    """Graphs held for `model` (failed captures not counted): for tests and benchmarks."""
    return sum(entry is not False for graphs in _graphs.get(model, {}).values() for entry in graphs.values())
