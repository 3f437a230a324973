"""`genrec-fast serve --engine aiohttp`: the endpoint of serve_api.py in one process.

aiohttp's HTTP server parses and validates requests on an asyncio event loop; a batcher hands the requests
that queued up while the model was busy (up to `max_batch`, waiting at most `max_wait_ms` for more once the
queue is empty) to one `recommend()` call in a single model thread. torch releases the GIL while it
computes, so the loop keeps accepting requests meanwhile. No worker processes and no queues between
processes: on a CPU the HTTP work per request is what limits a server (LitServe spends ~1.6 ms of CPU per
request on a 2-core VM), and here it is a fraction of that (benchmarks/README.md). LitServe (serve.py)
remains the engine for several workers or GPUs.
"""
from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from aiohttp import web
from pydantic import ValidationError

from .serve_api import (API_PATH, MAX_BATCH, MAX_K, MAX_WAIT_MS, RecommendRequest, Rejected, check_arguments,
                        check_port, load_warm, rejection, to_query)

log = logging.getLogger(__name__)


class Batcher:
    """Queued requests -> batches for `predict(list of queries) -> list of answers` in one thread."""

    def __init__(self, predict: Callable[[list], list], max_batch: int = MAX_BATCH,
                 max_wait_ms: float = MAX_WAIT_MS["aiohttp"]):
        self.predict, self.max_batch, self.max_wait_s = predict, max_batch, max_wait_ms / 1e3
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="model")  # one model call at a time
        self.task: Optional[asyncio.Task] = None

    async def submit(self, query):
        """The answer to one query, computed in some batch."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((query, future))
        return await future

    async def _next_batch(self) -> list:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            try:
                outs = await loop.run_in_executor(self.pool, self.predict, [q for q, _ in batch])
            except Exception as e:  # a bug, not a bad request: answer 500, keep serving
                log.exception("predict failed for %d requests", len(batch))
                outs = [Rejected(500, None, f"internal error: {type(e).__name__}")] * len(batch)
            for (_, future), out in zip(batch, outs):
                if not future.done():  # the client may have gone
                    future.set_result(out)

    async def start(self, app: web.Application) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self, app: web.Application) -> None:
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=True)


def reply(out) -> web.Response:
    if isinstance(out, Rejected):
        return web.json_response(out.body(), status=out.status)
    return web.json_response({"items": out.items, "scores": out.scores})


def make_app(rec, predict: Callable[[list], list], max_batch: int = MAX_BATCH,
             max_wait_ms: float = MAX_WAIT_MS["aiohttp"], check: Optional[Callable] = None,
             max_k: int = MAX_K) -> web.Application:
    """POST API_PATH and GET /health around `predict` (serve_api.answer bound to a Recommender, or any
    function of a list of checked queries); `check(rec, request)` -> a query or a Rejected (default:
    serve_api.to_query with `max_k`)."""
    check = check or partial(to_query, max_k=max_k)
    batcher = Batcher(predict, max_batch, max_wait_ms)

    async def recommend(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            req = RecommendRequest.model_validate_json(body)
        except ValidationError as e:
            return reply(rejection(e.errors()))
        query = check(rec, req)
        return reply(query if isinstance(query, Rejected) else await batcher.submit(query))

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=16 * 2 ** 20)
    app.router.add_post(API_PATH, recommend)
    app.router.add_get("/health", health)
    app.on_startup.append(batcher.start)
    app.on_cleanup.append(batcher.stop)
    return app


def serve(checkpoints: Sequence[Union[str, Path]], host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS["aiohttp"], device: str = "cpu",
          threads: Optional[int] = None, log_level: str = "warning", max_k: int = MAX_K) -> None:
    """Serve a checkpoint (several: an ensemble) until interrupted (Ctrl+C / SIGINT / SIGTERM); a request's k
    above `max_k` is a 422."""
    import torch
    from .serve_api import answer
    if not max_wait_ms >= 0:
        raise ValueError(f"max_wait_ms: expected a number of milliseconds >= 0, got {max_wait_ms}")
    check_arguments(checkpoints, max_batch, max_k)
    check_port(host, port)
    logging.basicConfig(level=log_level.upper())
    # all cores but one, which the event loop needs: the model thread and the HTTP work share the CPU
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) - 1))
    rec = load_warm(checkpoints, device)
    app = make_app(rec, lambda queries: answer(rec, queries), max_batch, max_wait_ms, max_k=max_k)
    serving = (f"serving on http://{host}:{port}{API_PATH} (aiohttp, max batch {max_batch}, max wait "
               f"{max_wait_ms:g} ms, max k {max_k}); GET /health answers once the model is loaded")
    web.run_app(app, host=host, port=port, print=lambda _: print(serving, flush=True),  # (once bound)
                access_log=None, handle_signals=True)
