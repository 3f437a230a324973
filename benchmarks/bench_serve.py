"""`genrec-fast serve` under concurrent single-user requests, next to in-process `recommend()`.

Starts the server as a subprocess on 127.0.0.1 (stopped at the end), then sends POST /recommend requests
(one random history of 5-20 items each, k=10) from an asyncio client in this process, with 1 / 16 / 64
requests in flight, --requests per level at most and --seconds per level at most. The client is aiohttp:
httpx's async client (`--client httpx`) tops out at ~130-220 requests/s at concurrency 64 on this 2-core CPU
even against an empty FastAPI endpoint, where aiohttp reaches ~5,000. Next to it:

  per-request loop     `recommend([history], k=10)` once per request, in this process (what a web handler
                       calling genrec_fast directly does)
  offline batch 256    `recommend(histories, k=10, batch_size=256)`: the throughput ceiling of the model
  engine ceiling       a no-op endpoint (same JSON parsing and validation, same engine and batching settings,
                       no model) at the highest concurrency: what the engine + HTTP + this client cost alone
                       (not a strict bound: on this CPU it measured below the model's server; the cause
                       was not isolated)

Model: --checkpoint, else `--config`'s architecture (default: the README's recommended
configs/whole-history-transition-both-calibrated.json: one token per item, d_model 64, 2+2 layers, history
and transition bias in both directions, with a full random neighbour table) with RANDOM weights over a
12,101-item catalog (Beauty's size; speed does not depend on the weights). The loop and the batch
use --threads torch threads, as the server's worker does. The last line is machine-readable:
  serve_bench users_per_s_c64=<x> per_request_loop_users_per_s=<y> p99_ms_c64=<z>

Usage (pip install aiohttp first; the serve extra for the server):
  PYTHONPATH=python python benchmarks/bench_serve.py [--checkpoint DIR ...] [--requests 2000] [--seconds 30]
      [--concurrency 1,16,64] [--max-batch N] [--max-wait-ms MS] [--threads 1] [--client aiohttp|httpx]
      [--engine litserve|aiohttp]
"""
import argparse
import asyncio
import datetime
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import litserve as ls
import numpy as np
from litserve.loops import BatchedLoop

from genrec_fast import serve_api as serve
from genrec_fast.serve import run, server
from genrec_fast.serve_api import API_PATH, RecommendRequest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "whole-history-transition-both-calibrated.json"  # the README's recommended one
N_ITEMS = 12101  # Amazon Beauty's catalog
K = 10


def random_checkpoint(out: Path, config: Path = CONFIG) -> Path:
    """`config`'s model with random weights over N_ITEMS items (a full random transition table where it has the
    bias, as bench_catalog.py's), saved to `out`."""
    from genrec_fast import Recommender
    from genrec_fast.checkpoint import save
    from genrec_fast.config import load_config
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_catalog import fill_transition
    rec = Recommender.random(list(range(N_ITEMS)), load_config(str(config)).model, item_tokens="whole")
    if rec.model.transition is not None:
        fill_transition(rec.model, N_ITEMS)
    return save(out, rec.model, rec.tokenizer, rec.catalog)


def histories(item_ids: list, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [[item_ids[i] for i in rng.choice(len(item_ids), int(rng.integers(5, 21)), replace=False)]
            for _ in range(n)]


def summary(latencies_s: list, seconds: float) -> dict:
    ms = 1e3 * np.asarray(latencies_s)
    return {"users_per_s": len(ms) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


def per_request_loop(rec, hists: list, limit_s: float) -> dict:
    lat, t0 = [], time.perf_counter()
    for h in hists:
        t = time.perf_counter()
        rec.recommend([h], k=K)
        lat.append(time.perf_counter() - t)
        if t - t0 > limit_s:
            break
    return summary(lat, time.perf_counter() - t0)


def offline_batches(rec, hists: list, batch: int = 256) -> dict:
    rec.recommend(hists[:batch], k=K)  # warm-up at this batch size
    lat, t0 = [], time.perf_counter()
    for s in range(0, len(hists), batch):
        t = time.perf_counter()
        rec.recommend(hists[s:s + batch], k=K, batch_size=batch)
        lat.append(time.perf_counter() - t)
    out = summary(lat, time.perf_counter() - t0)
    out["users_per_s"] = len(hists) / (time.perf_counter() - t0)  # users, not batches
    return out


async def load(url: str, bodies: list, concurrency: int, limit_s: float, client: str = "aiohttp") -> dict:
    """`concurrency` simulated users, each sending its next request when the previous one is answered."""
    lat, errors, todo = [], [], iter(bodies)
    t0 = time.perf_counter()

    async def user(post):
        for body in todo:
            if time.perf_counter() - t0 > limit_s:
                return
            t = time.perf_counter()
            status, text = await post(body)
            lat.append(time.perf_counter() - t)
            if status != 200:
                errors.append(text)

    if client == "aiohttp":
        import aiohttp
        async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            async def post(body):
                async with session.post("/recommend", json=body) as r:
                    return r.status, await r.text()
            await asyncio.gather(*(user(post) for _ in range(concurrency)))
    else:  # one httpx client per user: a shared AsyncClient is slower still (its connection pool)
        import httpx
        clients = [httpx.AsyncClient(base_url=url, timeout=60) for _ in range(concurrency)]

        def poster(c):
            async def post(body):
                r = await c.post("/recommend", json=body)
                return r.status_code, r.text
            return post
        await asyncio.gather(*(user(poster(c)) for c in clients))
        for c in clients:
            await c.aclose()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return summary(lat, seconds)


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class Server:
    """A server subprocess in its own process group; `stop` ends the group (and records its CPU seconds)."""

    def __init__(self, args: list, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, *args, "--port", str(self.port)], stdout=f,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url, self.log = f"http://127.0.0.1:{self.port}", log

    def wait_ready(self, timeout_s: float = 120) -> None:
        problem = serve.wait_healthy(self.url, self.proc, timeout_s)
        if problem:
            raise RuntimeError(f"{problem}:\n{self.log.read_text()[-2000:]}")

    def group_cpu_s(self) -> float:
        """CPU seconds of the live processes of the server's group."""
        total = 0.0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(f[2]) == self.proc.pid:  # process group
                total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        self.cpu_s = self.group_cpu_s()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class NoopAPI(ls.LitAPI):
    """The engine alone: the same request model and batching hooks as RecommendAPI, answering empty lists."""

    def setup(self, device):
        pass

    def decode_request(self, request: RecommendRequest):
        return request

    def batch(self, inputs):
        return inputs

    def predict(self, requests):
        return [{"items": [], "scores": []}] * len(requests)

    def unbatch(self, outputs):
        return outputs

    def encode_response(self, output):
        return output


def noop_server(args) -> None:
    if args.engine == "aiohttp":  # the same app (parsing, validation, batcher) with a model that answers nothing
        from aiohttp import web
        from genrec_fast.serve_aio import make_app
        app = make_app(None, lambda queries: [Empty()] * len(queries), args.max_batch, args.max_wait_ms,
                       check=lambda rec, request: request)
        print("serving no-op", flush=True)
        return web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)
    api = NoopAPI(max_batch_size=args.max_batch, batch_timeout=args.max_wait_ms / 1e3, api_path=API_PATH,
                  loop=BatchedLoop())
    run(server(api), "127.0.0.1", args.port)


class Empty:
    items: list = []
    scores: list = []


def serve_levels(srv: Server, bodies: list, levels: list, args) -> dict:
    srv.wait_ready()
    asyncio.run(load(srv.url, bodies[:200], max(levels), 10, args.client))  # warm-up: the first batches
    return {c: asyncio.run(load(srv.url, bodies, c, args.seconds, args.client)) for c in levels}


def check_answers(url: str, rec, hists: list) -> None:
    """The server's answers equal recommend()'s (items exactly, scores to 1e-5)."""
    import httpx
    for h in hists:
        got = httpx.post(f"{url}/recommend", json={"history": h, "k": K}, timeout=30).json()
        want = rec.recommend([h], k=K)[0]
        assert got["items"] == want.items and np.allclose(got["scores"], want.scores, atol=1e-5), (h, got, want)


def row(name: str, m: dict) -> str:
    return f"| {name} | {m['users_per_s']:.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['n']} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", nargs="+", help="checkpoint dir(s) (default: random weights, see above)")
    ap.add_argument("--config", type=Path, default=CONFIG, help="without --checkpoint: the architecture (a config "
                                                                 "JSON; default: the README's recommended one)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level at most")
    ap.add_argument("--seconds", type=float, default=30, help="time limit per level")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--max-batch", type=int, default=None, help="the server's (default: genrec-fast serve's)")
    ap.add_argument("--max-wait-ms", type=float, default=None, help="the server's (default: genrec-fast serve's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server's worker and of the loop")
    ap.add_argument("--client", default="aiohttp", choices=("aiohttp", "httpx"),
                    help="load generator (default aiohttp: httpx's async client tops out at ~200 requests/s at "
                         "concurrency 64 on this 2-core CPU, even against an empty endpoint)")
    ap.add_argument("--engine", default="aiohttp", choices=("aiohttp", "litserve"), help="genrec-fast serve --engine")
    ap.add_argument("--noop-server", action="store_true", help=argparse.SUPPRESS)  # internal: the engine ceiling
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.max_batch = serve.MAX_BATCH if args.max_batch is None else args.max_batch
    args.max_wait_ms = serve.MAX_WAIT_MS[args.engine] if args.max_wait_ms is None else args.max_wait_ms
    if args.noop_server:
        return noop_server(args)

    if args.client == "aiohttp":
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            sys.exit("bench_serve.py: pip install aiohttp (or --client httpx, which cannot load the server as much)")
    import torch
    import genrec_fast
    torch.set_num_threads(args.threads)
    busy0, own0, wall0 = busy_cpu_s(), own_cpu_s(), time.perf_counter()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or [random_checkpoint(Path(tmp) / "random", args.config)]
        rec = genrec_fast.load(ckpt[0] if len(ckpt) == 1 else ckpt)
        hists = histories(rec.catalog.item_ids, args.requests)
        bodies = [{"history": h, "k": K} for h in hists]
        rec.recommend(hists[:10], k=K)
        loop = per_request_loop(rec, hists, args.seconds)
        batch = offline_batches(rec, hists)
        flags = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--engine", args.engine]
        with Server(["-m", "genrec_fast.cli", "serve", *map(str, ckpt), "--threads", str(args.threads), *flags],
                    Path(tmp) / "serve.log") as srv:
            served = serve_levels(srv, bodies, levels, args)
            check_answers(srv.url, rec, hists[:20])
        with Server([__file__, "--noop-server", *flags], Path(tmp) / "noop.log") as noop:
            ceiling = serve_levels(noop, bodies, [max(levels)], args)[max(levels)]
    others = (busy_cpu_s() - busy0 - (own_cpu_s() - own0) - srv.cpu_s - noop.cpu_s) / (time.perf_counter() - wall0)

    model = ("checkpoint " + " ".join(map(str, args.checkpoint)) if args.checkpoint
             else "RANDOM weights (speed does not depend on training)")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, other processes used {max(others, 0):.2f} "
          f"cores on average during the run (0: the CPU was not shared); "
          f"{model}, "
          f"{len(rec.catalog.item_ids)} items, k={K}, histories of 5-20 items; server --max-batch {args.max_batch} "
          f"--max-wait-ms {args.max_wait_ms:g} --engine {args.engine}, {args.threads} torch thread(s) in the worker "
          "and the loop")
    print("| path | users/s | p50 ms | p99 ms | requests |\n|---|---|---|---|---|")
    print(row("recommend() once per request, in-process loop", loop))
    print(row("recommend() offline, batches of 256 (latency per batch)", batch))
    for c, m in served.items():
        print(row(f"genrec-fast serve --engine {args.engine}, concurrency {c}", m))
    print(row(f"engine ceiling: no-op {args.engine} endpoint, concurrency {max(levels)}", ceiling))
    top = served[max(levels)]
    print(f"concurrency {max(levels)}: {top['users_per_s'] / loop['users_per_s']:.2f}x the per-request loop, "
          f"{top['users_per_s'] / ceiling['users_per_s']:.0%} of the engine ceiling; "
          "answers checked against recommend()")
    print(f"serve_bench users_per_s_c{max(levels)}={top['users_per_s']:.1f} "
          f"per_request_loop_users_per_s={loop['users_per_s']:.1f} p99_ms_c{max(levels)}={top['p99_ms']:.1f}")


if __name__ == "__main__":
    main()
