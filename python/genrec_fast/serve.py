"""`genrec-fast serve` on LitServe: the endpoint of serve_api.py with dynamic batching in a worker process.

LitServe (lightning's `litserve`) runs the model in its own worker process and gathers the requests that
arrive within `max_wait_ms` (up to `max_batch`) into one `predict` call, behind a uvicorn / FastAPI front
end that parses and validates the JSON in another process. That is the dynamic batching a single-machine
CPU or GPU server needs, with a pip install and no cluster, and it scales to several workers or GPUs. Its
cost is CPU per request (three processes, a manager queue): on a 2-core CPU the lighter one-process engine
(serve_aio.py, `--engine aiohttp`) serves more requests per second; benchmarks/README.md has both. Ray
Serve's `@serve.batch` does the same across machines, but starts a Ray cluster (head process, dashboard,
object store) and routes each request through a proxy actor to a replica actor: worth it only where
replicas on several machines are wanted (not measured here).
"""
import os
import signal
from pathlib import Path
from typing import Optional, Sequence, Union

import litserve as ls
from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from litserve.loops import BatchedLoop

from .serve_api import (API_PATH, MAX_BATCH, MAX_K, MAX_WAIT_MS, Query, RecommendRequest, Rejected, answer,
                        check_arguments, check_port, load_warm, rejection, to_query)


class RecommendAPI(ls.LitAPI):
    """LitServe's hooks around a `Recommender`: decode (check ids), batch, predict (`answer`), encode."""

    def __init__(self, checkpoints: Sequence[Union[str, Path]], device: str = "cpu", max_batch: int = MAX_BATCH,
                 max_wait_ms: float = MAX_WAIT_MS["litserve"], threads: Optional[int] = None, max_k: int = MAX_K):
        # BatchedLoop even for max_batch 1, so that predict always receives a list
        super().__init__(max_batch_size=max_batch, batch_timeout=max_wait_ms / 1e3, api_path=API_PATH,
                         loop=BatchedLoop())
        self.checkpoints, self.model_device, self.threads = [str(p) for p in checkpoints], device, threads
        self.max_k = max_k

    def setup(self, device) -> None:
        """Load the model in the worker process (LitServe's `device` is ignored: --device chooses)."""
        import torch
        # all cores but one, which the HTTP process needs: on 2 cores 2 threads halved the throughput
        torch.set_num_threads(self.threads or max(1, (os.cpu_count() or 1) - 1))
        self.rec = load_warm(self.checkpoints, self.model_device)

    def decode_request(self, request: RecommendRequest) -> Union[Query, Rejected]:
        return to_query(self.rec, request, self.max_k)

    def batch(self, inputs: list) -> list:
        return inputs

    def predict(self, queries: list) -> list:
        return answer(self.rec, queries)

    def unbatch(self, outputs: list) -> list:
        return outputs

    def encode_response(self, output):
        if isinstance(output, Rejected):
            return response(output)  # a Response passes through LitServe to the client as it is
        return {"items": output.items, "scores": output.scores}


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a body that does not fit `RecommendRequest`, as {"error", "field"} (first problem); a
    body not sent as JSON (FastAPI parses it only with Content-Type: application/json) -> 415 saying so."""
    if "json" not in request.headers.get("content-type", ""):
        return response(Rejected(415, "body", "body: send it as JSON, with the header Content-Type: application/json "
                                              f"(got {request.headers.get('content-type') or 'none'})"))
    return response(rejection(exc.errors()))


PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 detail for a body json.loads cannot decode


async def parse_error(request: Request, exc: HTTPException):
    """FastAPI's 400 for a JSON body it cannot read (not UTF-8: PARSE_ERROR) as {"error", "field"}; any other
    HTTP error as FastAPI answers it."""
    if exc.status_code == 400 and exc.detail == PARSE_ERROR:
        return response(Rejected(400, "body", f"body: not valid JSON ({exc.detail}; is it UTF-8?)"))
    return await http_exception_handler(request, exc)


def response(r: Rejected) -> JSONResponse:
    return JSONResponse(r.body(), status_code=r.status)


def server(api: ls.LitAPI, timeout_s: float = 30.0) -> ls.LitServer:
    """A LitServer for `api` (a RecommendAPI, or another LitAPI taking a RecommendRequest) with our errors."""
    srv = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=timeout_s,
                       model_metadata={"api_path": api.api_path, "max_batch": api.max_batch_size,
                                       "max_wait_ms": api.batch_timeout * 1e3})
    srv.app.add_exception_handler(RequestValidationError, validation_error)
    srv.app.add_exception_handler(HTTPException, parse_error)
    return srv


def serve(checkpoints: Sequence[Union[str, Path]], host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS["litserve"], device: str = "cpu",
          threads: Optional[int] = None, log_level: str = "warning", max_k: int = MAX_K) -> None:
    """Serve a checkpoint (several: an ensemble) until interrupted (Ctrl+C / SIGINT / SIGTERM); a request's k
    above `max_k` is a 422."""
    if not max_wait_ms > 0:  # LitServe's worker spins on its queue with a timeout of 0
        raise ValueError(f"max_wait_ms: expected a positive number of milliseconds, got {max_wait_ms}")
    check_arguments(checkpoints, max_batch, max_k)
    check_port(host, port)
    run(server(RecommendAPI(checkpoints, device, max_batch, max_wait_ms, threads, max_k)), host, port, log_level)


def run(srv: ls.LitServer, host: str, port: int, log_level: str = "warning") -> None:
    """Run until SIGINT or SIGTERM, then stop LitServe's worker and API processes (its graceful shutdown). Both
    signals get a handler: a background job of a non-interactive shell starts with SIGINT ignored."""
    main_pid = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != main_pid:  # a forked child (uvicorn, LitServe's manager) inherits the handler
            raise SystemExit(0)
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):  # LitServe shuts down cleanly on KeyboardInterrupt only
        signal.signal(signum, interrupt)
    api = srv.lit_api  # (the model loads in LitServe's worker process, which says "loading ..." and "loaded ...")
    print(f"starting on http://{host}:{port}{api.api_path} (litserve, max batch {api.max_batch_size}, max wait "
          f"{api.batch_timeout * 1e3:g} ms, max k {getattr(api, 'max_k', MAX_K)}); GET /health answers once the "
          "model is loaded", flush=True)
    srv.run(host=host, port=port, num_api_servers=1, log_level=log_level, generate_client_file=False,
            access_log=False)
