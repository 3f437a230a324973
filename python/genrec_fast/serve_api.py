"""The contract of `genrec-fast serve`, shared by its engines (serve.py: LitServe; serve_aio.py: aiohttp).

    POST /recommend  {"history": [item ids, oldest first], "user": optional id, "k": optional int (10),
                      "exclude_seen": optional bool, "allowed_items": optional list of item ids,
                      "unknown_items": optional "error" (default) or "skip" (history ids the catalog
                      lacks, e.g. items added after training, are dropped, as recommend()'s argument)}
                 ->  {"items": [item ids, best first], "scores": [log-probabilities]}
    GET  /health     200 "ok" once the model is loaded

Item and user ids are ints or strings as in the catalog ("5" also finds the catalog's 5 and 5 its "5").
A malformed request gets a 4xx {"error": "<field>: <what is wrong>", "field": "<field>"}: 400 for a body
that is not JSON, 415 for one not sent as JSON on the LitServe engine (its FastAPI front end reads a body
only with Content-Type: application/json; the aiohttp engine reads any), 422 for a wrong field (missing or
empty history, wrong types, k < 1 or above the server's --max-k, unknown item ids, each echoed id cut to
ID_CHARS characters); it never affects the other requests of its batch. A k beyond the catalog (within --max-k)
returns every allowed item, as `recommend()` does.

Requests of one batch may ask for different k / exclude_seen / allowed_items: `answer` makes one
`recommend()` call per distinct (k, exclude_seen, allowed_items) group, so each request gets exactly what a
`recommend()` call with its own arguments returns (a larger k then truncated would not be: k sets the
beam width of the trie search).
"""
import logging
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Hashable, List, Literal, NamedTuple, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field

from . import checkpoint
from .data import resolve_id, short_ids
from .recommend import Recommendations, Recommender

API_PATH = "/recommend"
DEFAULT_K = 10
MAX_BATCH = 64  # requests per recommend() call at most; tuned with benchmarks/bench_serve.py
MAX_K = 1000  # k of a request at most (--max-k): k = 10**9 on a million items was a 28.7 MB body and 1 s of model
ENGINES = ("aiohttp", "litserve")  # the first is the default (bench_serve: 3.2x LitServe's requests/s on 2 cores)
MAX_WAIT_MS = {  # per engine, how long a batch waits for more requests once none are queued (bench_serve)
    "aiohttp": 0.0,  # none: the requests that queued while the model ran form the next batch (c1 p50 5.4 vs 8.8 ms)
    "litserve": 2.0,  # > 0 (its worker spins with a timeout of 0); 5 ms gave no more users/s at concurrency 64
}

log = logging.getLogger(__name__)
Id = Union[int, str]
EXPECTED = {  # what each field should be, for error messages
    "history": "a non-empty list of item ids (ints or strings)",
    "user": "a user id (int or string) or null",
    "k": "a positive integer (default 10)",
    "exclude_seen": "true, false or null",
    "allowed_items": "a list of item ids (ints or strings) or null",
    "unknown_items": '"error", "skip" or null',
}


class RecommendRequest(BaseModel):
    """The JSON body of POST /recommend, checked by FastAPI before it reaches the model's worker."""

    model_config = ConfigDict(strict=True, extra="forbid")  # strict: no "5" -> 5, no true -> 1 for k
    history: List[Id] = Field(min_length=1)
    user: Optional[Id] = None
    k: Optional[int] = Field(DEFAULT_K, ge=1)  # null: the default
    exclude_seen: Optional[bool] = None
    allowed_items: Optional[List[Id]] = None
    unknown_items: Optional[Literal["error", "skip"]] = None  # null: "error"


class Query(NamedTuple):
    """A request with its ids resolved against the catalog: ready for `recommend()`."""

    history: list
    user: Optional[Hashable]
    k: int
    exclude_seen: bool
    allowed_items: Optional[tuple]

    def group(self) -> tuple:
        """Requests with equal groups are answered by one `recommend()` call."""
        return self.k, self.exclude_seen, self.allowed_items


class Rejected(NamedTuple):
    """A request that cannot be answered, carried through the batch instead of raising (which would fail
    every request of the batch)."""

    status: int
    field: Optional[str]
    message: str

    def body(self) -> dict:
        return {"error": self.message, "field": self.field}


def to_query(rec: Recommender, req: RecommendRequest, max_k: int = MAX_K) -> Union[Query, Rejected]:
    """Check a request's ids against the model's catalog and its k against `max_k`."""
    k = DEFAULT_K if req.k is None else req.k  # (beyond the catalog: every allowed item, as recommend())
    if k > max_k:
        return Rejected(422, "k", f"k: expected at most {max_k} (the server's --max-k), got {k}")
    items = rec.catalog.item_index
    history = [resolve_id(items, x) for x in req.history]
    if None in history:
        bad = [x for x, i in zip(req.history, history) if i is None]
        history = [i for i in history if i is not None] if req.unknown_items == "skip" else []
        if not history:
            return Rejected(422, "history", f"history: unknown item ids {short_ids(bad)}" + (
                "" if req.unknown_items == "skip" else ' ("unknown_items": "skip" drops them)'))
    allowed = None
    if req.allowed_items is not None:
        allowed = tuple(resolve_id(items, x) for x in req.allowed_items)
        if None in allowed:
            bad = [x for x, i in zip(req.allowed_items, allowed) if i is None]
            return Rejected(422, "allowed_items", f"allowed_items: unknown item ids {short_ids(bad)}")
    user = None if req.user is None else resolve_id(rec.catalog.user_index, req.user)
    user = req.user if user is None else user  # an unknown user is served from the history alone
    exclude_seen = rec.exclude_seen if req.exclude_seen is None else req.exclude_seen
    return Query(history, user, k, exclude_seen, allowed)


def answer(rec: Recommender, queries: Sequence[Union[Query, Rejected]]) -> List[Union[Recommendations, Rejected]]:
    """One answer per query: one `recommend()` call per group; a group that fails is rejected alone."""
    groups: Dict[tuple, List[int]] = {}
    for n, q in enumerate(queries):
        if isinstance(q, Query):
            groups.setdefault(q.group(), []).append(n)
    out = list(queries)
    for (k, exclude_seen, allowed), rows in groups.items():
        try:
            recs = rec.recommend([queries[n].history for n in rows], k=k, users=[queries[n].user for n in rows],
                                 exclude_seen=exclude_seen, allowed_items=allowed)
        except Exception as e:  # a bug, not a bad request: log it, answer 500, keep serving
            log.exception("recommend() failed for %d requests", len(rows))
            recs = [Rejected(500, None, f"internal error: {type(e).__name__}")] * len(rows)
        for n, r in zip(rows, recs):
            out[n] = r
    return out


def rejection(errors: list) -> Rejected:
    """Pydantic's errors for a body that does not fit `RecommendRequest` -> one Rejected naming the first
    problem's field (a misspelt field first); locations may start with "body" (FastAPI's)."""
    e = min(errors, key=lambda e: e.get("type") != "extra_forbidden")
    loc = [x for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return Rejected(400, "body", f"body: not valid JSON ({e.get('msg')})")
    if not loc or not isinstance(loc[0], str):
        return Rejected(422, "body", "body: expected a JSON object with a 'history' list")
    field = loc[0]
    if e.get("type") == "extra_forbidden":
        return Rejected(422, field, f"{field}: unknown field (expected one of {', '.join(EXPECTED)})")
    return Rejected(422, field, f"{field}: expected {EXPECTED.get(field, 'something else')}; "
                                f"{e.get('msg', 'invalid')}")


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> Optional[str]:
    """Polls GET `url`/health of a server started as `proc` until it answers 200 -> None, or -> why not
    (the process exited, or `timeout_s` passed). For tests and benchmarks that start a real server."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return None
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    return f"server not healthy after {timeout_s} s"


def check_port(host: str, port: int) -> None:
    """Fail before a model loads (minutes at a million items) when `host`:`port` cannot be listened on: an OSError
    naming both (another server holds the port, an address not of this machine). A check, not a reservation: the
    server binds again when it starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind (a TIME_WAIT port is free)
            s.bind(address)
    except OSError as e:
        raise OSError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); another server may hold "
                      "it: pass another --port (or --host)") from None


def check_arguments(paths: Sequence[Union[str, Path]], max_batch: int, max_k: int = MAX_K) -> None:
    """Fail before starting any process when a checkpoint directory is incomplete, max_batch < 1 or max_k < 1."""
    for name, value in (("max_batch", max_batch), ("max_k", max_k)):
        if value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    if not paths:
        raise ValueError("checkpoint: expected at least one checkpoint directory")
    for p in paths:
        if checkpoint.is_cascade(p):  # a cascade directory (cascade.py): its two checkpoints
            if len(paths) > 1:
                raise ValueError(f"checkpoint: {p} is a cascade; it is served alone, not in an ensemble")
            check_arguments([Path(p) / "retriever", Path(p) / "ranker"], max_batch, max_k)
            continue
        if checkpoint.is_hybrid(p):  # a hybrid directory (hybrid.py): a GenRec checkpoint and a SASRec one
            if len(paths) > 1:
                raise ValueError(f"checkpoint: {p} is a hybrid; it is served alone, not in an ensemble")
            check_arguments([Path(p) / "genrec"], max_batch, max_k)
            if not (Path(p) / "sasrec" / "weights.pt").is_file():
                raise ValueError(f"checkpoint: {p}/sasrec has no weights.pt (an incomplete hybrid directory)")
            continue
        checkpoint.check_checkpoint(p)


def load_warm(checkpoints: Sequence[Union[str, Path]], device: str = "cpu") -> Recommender:
    """The served model (several checkpoints: an ensemble), loaded and warmed up by one request (the first call
    builds the trie and allocates: ~1 s at a million items, ~1 min at ten million), saying so on stdout."""
    from .recommend import load
    t0 = time.perf_counter()
    names = ", ".join(str(p) for p in checkpoints)
    print(f"loading {names} ...", flush=True)
    rec = load(checkpoints[0] if len(checkpoints) == 1 else [str(p) for p in checkpoints], device)
    rec.recommend([[rec.catalog.item_ids[0]]], k=1)  # warm-up: the first call builds the trie and allocates
    print(f"loaded {len(rec.catalog.item_ids):,} items in {time.perf_counter() - t0:.1f} s", flush=True)
    return rec
