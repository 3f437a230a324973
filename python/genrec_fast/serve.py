"""An HTTP endpoint for `Recommender.recommend` that batches concurrent requests (`genrec-fast serve`).

    POST /recommend  {"history": [item ids, oldest first], "user": optional id, "k": optional int (10),
                      "exclude_seen": optional bool, "allowed_items": optional list of item ids}
                 ->  {"items": [item ids, best first], "scores": [log-probabilities]}
    GET  /health     200 "ok" once the model is loaded

Item and user ids are ints or strings as in the catalog ("5" also finds the catalog's 5 and 5 its "5").
A malformed request gets a 4xx {"error": "<field>: <what is wrong>", "field": "<field>"}: 400 for a body
that is not JSON, 422 for a wrong field (missing or empty history, wrong types, k < 1 or above the
catalog size, unknown item ids); it never affects the other requests of its batch.

Engine: LitServe (lightning's `litserve`). It runs the model in its own worker process and gathers the
requests that arrive within `max_wait_ms` (up to `max_batch`) into one `predict` call, behind a uvicorn /
FastAPI front end that parses and validates the JSON in another process. That is the dynamic batching a
single-machine CPU or GPU server needs, with a pip install and no cluster. Ray Serve's `@serve.batch` does
the same across machines, but starts a Ray cluster (head process, dashboard, object store) and routes each
request through a proxy actor to a replica actor: worth it only where replicas on several machines are
wanted (not measured here). benchmarks/README.md has the throughput and where LitServe's time goes.

Requests of one batch may ask for different k / exclude_seen / allowed_items: `answer` makes one
`recommend()` call per distinct (k, exclude_seen, allowed_items) group, so each request gets exactly what a
`recommend()` call with its own arguments returns (a larger k then truncated would not be: k sets the
beam width of the trie search).
"""
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Hashable, List, NamedTuple, Optional, Sequence, Union

import litserve as ls
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from litserve.loops import BatchedLoop
from pydantic import BaseModel, ConfigDict, Field

from . import checkpoint
from .recommend import Recommendations, Recommender, load

API_PATH = "/recommend"
DEFAULT_K = 10
MAX_BATCH = 64  # requests per recommend() call at most; tuned with benchmarks/bench_serve.py
MAX_WAIT_MS = 2.0  # how long the worker gathers a batch; 5 ms gave no more users/s at concurrency 64 (bench_serve)

log = logging.getLogger(__name__)
Id = Union[int, str]
EXPECTED = {  # what each field should be, for error messages
    "history": "a non-empty list of item ids (ints or strings)",
    "user": "a user id (int or string) or null",
    "k": "a positive integer (default 10)",
    "exclude_seen": "true, false or null",
    "allowed_items": "a list of item ids (ints or strings) or null",
}


class RecommendRequest(BaseModel):
    """The JSON body of POST /recommend, checked by FastAPI before it reaches the model's worker."""

    model_config = ConfigDict(strict=True, extra="forbid")  # strict: no "5" -> 5, no true -> 1 for k
    history: List[Id] = Field(min_length=1)
    user: Optional[Id] = None
    k: Optional[int] = Field(DEFAULT_K, ge=1)  # null: the default
    exclude_seen: Optional[bool] = None
    allowed_items: Optional[List[Id]] = None


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

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "field": self.field}, status_code=self.status)


def resolve(index: dict, x: Hashable):
    """An id as the catalog spells it: x itself, else 5 <-> "5" (canonical spellings only: not "05", " 5");
    None when the catalog has neither."""
    if x in index:
        return x
    try:
        other = str(x) if isinstance(x, int) else int(x)
    except ValueError:
        return None
    return other if other in index and str(other) == str(x) else None


def to_query(rec: Recommender, req: RecommendRequest) -> Union[Query, Rejected]:
    """Check a request's ids and k against the model's catalog."""
    items = rec.catalog.item_index
    history = [resolve(items, x) for x in req.history]
    if None in history:
        bad = [x for x, i in zip(req.history, history) if i is None]
        return Rejected(422, "history", f"history: unknown item ids {bad[:5]}")
    allowed = None
    if req.allowed_items is not None:
        allowed = tuple(resolve(items, x) for x in req.allowed_items)
        if None in allowed:
            bad = [x for x, i in zip(req.allowed_items, allowed) if i is None]
            return Rejected(422, "allowed_items", f"allowed_items: unknown item ids {bad[:5]}")
    k = DEFAULT_K if req.k is None else req.k
    if k > len(items):
        return Rejected(422, "k", f"k: at most the catalog size ({len(items)}), got {k}")
    user = None if req.user is None else resolve(rec.catalog.user_index, req.user)
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


class RecommendAPI(ls.LitAPI):
    """LitServe's hooks around a `Recommender`: decode (check ids), batch, predict (`answer`), encode."""

    def __init__(self, checkpoints: Sequence[Union[str, Path]], device: str = "cpu", max_batch: int = MAX_BATCH,
                 max_wait_ms: float = MAX_WAIT_MS, threads: Optional[int] = None):
        # BatchedLoop even for max_batch 1, so that predict always receives a list
        super().__init__(max_batch_size=max_batch, batch_timeout=max_wait_ms / 1e3, api_path=API_PATH,
                         loop=BatchedLoop())
        self.checkpoints, self.model_device, self.threads = [str(p) for p in checkpoints], device, threads

    def setup(self, device) -> None:
        """Load the model in the worker process (LitServe's `device` is ignored: --device chooses)."""
        import torch
        # all cores but one, which the HTTP process needs: on 2 cores 2 threads halved the throughput
        torch.set_num_threads(self.threads or max(1, (os.cpu_count() or 1) - 1))
        paths = self.checkpoints[0] if len(self.checkpoints) == 1 else self.checkpoints
        self.rec = load(paths, self.model_device)
        self.rec.recommend([[self.rec.catalog.item_ids[0]]], k=1)  # warm-up: the first call allocates

    def decode_request(self, request: RecommendRequest) -> Union[Query, Rejected]:
        return to_query(self.rec, request)

    def batch(self, inputs: list) -> list:
        return inputs

    def predict(self, queries: list) -> list:
        return answer(self.rec, queries)

    def unbatch(self, outputs: list) -> list:
        return outputs

    def encode_response(self, output):
        if isinstance(output, Rejected):
            return output.response()  # a Response passes through LitServe to the client as it is
        return {"items": output.items, "scores": output.scores}


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a body that does not fit `RecommendRequest`, as {"error", "field"} (first problem)."""
    e = min(exc.errors(), key=lambda e: e.get("type") != "extra_forbidden")  # a misspelt field first
    loc = [x for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return Rejected(400, "body", f"body: not valid JSON ({e.get('msg')})").response()
    if not loc or not isinstance(loc[0], str):
        return Rejected(422, "body", "body: expected a JSON object with a 'history' list").response()
    field = loc[0]
    if e.get("type") == "extra_forbidden":
        return Rejected(422, field, f"{field}: unknown field (expected one of {', '.join(EXPECTED)})").response()
    return Rejected(422, field, f"{field}: expected {EXPECTED.get(field, 'something else')}; "
                                f"{e.get('msg', 'invalid')}").response()


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


def check_checkpoints(paths: Sequence[Union[str, Path]]) -> None:
    """Fail before starting any process when a checkpoint directory is incomplete."""
    if not paths:
        raise ValueError("checkpoint: expected at least one checkpoint directory")
    for p in paths:
        missing = [f for f in checkpoint.FILES if not (Path(p) / f).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {p}: missing {', '.join(missing)}")


def server(api: ls.LitAPI, timeout_s: float = 30.0) -> ls.LitServer:
    """A LitServer for `api` (a RecommendAPI, or another LitAPI taking a RecommendRequest) with our errors."""
    srv = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=timeout_s,
                       model_metadata={"api_path": api.api_path, "max_batch": api.max_batch_size,
                                       "max_wait_ms": api.batch_timeout * 1e3})
    srv.app.add_exception_handler(RequestValidationError, validation_error)
    return srv


def serve(checkpoints: Sequence[Union[str, Path]], host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS, device: str = "cpu",
          threads: Optional[int] = None, log_level: str = "warning") -> None:
    """Serve a checkpoint (several: an ensemble) until interrupted (Ctrl+C / SIGINT / SIGTERM)."""
    if max_batch < 1:
        raise ValueError(f"max_batch: expected a positive integer, got {max_batch}")
    if not max_wait_ms > 0:  # LitServe's worker spins on its queue with a timeout of 0
        raise ValueError(f"max_wait_ms: expected a positive number of milliseconds, got {max_wait_ms}")
    check_checkpoints(checkpoints)
    run(server(RecommendAPI(checkpoints, device, max_batch, max_wait_ms, threads)), host, port, log_level)


def run(srv: ls.LitServer, host: str, port: int, log_level: str = "warning") -> None:
    """Run until SIGINT or SIGTERM, then stop LitServe's worker and API processes (its graceful shutdown)."""
    main_pid = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != main_pid:  # a forked child (uvicorn, LitServe's manager) inherits the handler
            raise SystemExit(0)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # LitServe shuts down cleanly on KeyboardInterrupt only
    print(f"serving on http://{host}:{port}{srv.lit_api.api_path} (max batch {srv.lit_api.max_batch_size}, "
          f"max wait {srv.lit_api.batch_timeout * 1e3:g} ms); GET /health answers once the model is loaded",
          flush=True)
    srv.run(host=host, port=port, num_api_servers=1, log_level=log_level, generate_client_file=False,
            access_log=False)
