"""`genrec-fast serve`: a real server process, called over HTTP, answers what `recommend()` answers.

Three servers start side by side (a few seconds each): on LitServe the tiny trained multi-piece model (trie
search) and an ensemble of two one-token checkpoints (one decoder step + top-k); on aiohttp
(`--engine aiohttp`) the multi-piece model again. Each is stopped by the fixture's teardown (SIGTERM, then
SIGKILL of its whole process group).
"""
import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("litserve", reason="the serving engine is not installed: pip install '.[serve]'")
pytest.importorskip("aiohttp", reason="the one-process serving engine is not installed: pip install '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the HTTP client of the tests is not installed: pip install '.[test]'")

import genrec_fast  # noqa: E402
from genrec_fast.cli import main  # noqa: E402
from genrec_fast.data import resolve_id  # noqa: E402
from genrec_fast.serve_api import Query, Rejected, answer, wait_healthy  # noqa: E402

START_TIMEOUT_S = 90  # two servers import torch at once on a shared 2-core CPU: ~10 s; 90 leaves margin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m genrec_fast.cli serve ...` in its own process group, with its output in a log file."""

    def __init__(self, checkpoints, log: Path, *flags: str):
        self.port, self.log = free_port(), log
        env = dict(os.environ)  # the package this test imported, installed or from the source tree
        env["PYTHONPATH"] = os.pathsep.join([str(Path(genrec_fast.__file__).parents[1]), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "genrec_fast.cli", "serve", *map(str, checkpoints), "--port", str(self.port),
               "--threads", "1", *flags]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        problem = wait_healthy(self.url, self.proc, START_TIMEOUT_S)
        if problem:
            pytest.fail(f"{problem}:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # LitServe's graceful shutdown stops its worker processes
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in the group (the session we started)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def post(self, body, **kw) -> "httpx.Response":
        return httpx.post(f"{self.url}/recommend", json=body, timeout=30, **kw)


def one_token_checkpoints(root: Path) -> list:
    """Two random one-token models over the same catalog and tokenizer (an ensemble needs both equal)."""
    from genrec_fast import GenRec, Recommender, preset
    from genrec_fast.checkpoint import save
    import torch
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False)
    rec = Recommender.random([f"sku{i}" for i in range(150)], cfg, vocab_size=200, item_tokens="whole", seed=3)
    torch.manual_seed(4)
    other = GenRec(rec.model.cfg).eval()
    return [save(root / "a", rec.model, rec.tokenizer, rec.catalog),
            save(root / "b", other, rec.tokenizer, rec.catalog)]


def cascade_checkpoint(root: Path, ranker: Path) -> Path:
    """A cascade directory (cascade.py): a random codes model over the one-token checkpoints' catalog + `ranker`."""
    from genrec_fast import Recommender, load, preset
    from genrec_fast.cascade import Cascade
    from genrec_fast.checkpoint import save
    cfg = dataclasses.replace(preset("tiny").model, item_eos=False)
    codes = Recommender.random([f"sku{i}" for i in range(150)], cfg, vocab_size=200, item_tokens="codes",
                               code_levels=2, code_branches=4, code_input="first", seed=3)
    save(root / "codes", codes.model, codes.tokenizer, codes.catalog)
    return Cascade(codes, load(ranker), 12, 0.4).save(root / "cascade", root / "codes", ranker)


@pytest.fixture(scope="module")
def servers(trained, tmp_path_factory):
    """{"pieces": (server, recommender), "ensemble": (server, recommender)}, started together."""
    _, run = trained
    root = tmp_path_factory.mktemp("serve")
    ens = one_token_checkpoints(root)
    cascade = cascade_checkpoint(root, ens[0])
    started = {"pieces": Server([run / "best"], root / "pieces.log", "--engine", "litserve", "--max-wait-ms", "20"),
               "ensemble": Server(ens, root / "ensemble.log", "--engine", "litserve", "--max-wait-ms", "20",
                                  "--max-batch", "16", "--max-k", "50"),
               "aiohttp": Server([run / "best"], root / "aiohttp.log", "--engine", "aiohttp", "--max-wait-ms", "20",
                                 "--max-batch", "16"),
               "cascade": Server([cascade], root / "cascade.log", "--engine", "aiohttp", "--max-batch", "16")}
    try:
        for s in started.values():
            s.wait_ready()
        yield {"pieces": (started["pieces"], genrec_fast.load(run / "best")),
               "ensemble": (started["ensemble"], genrec_fast.load(ens)),
               "aiohttp": (started["aiohttp"], genrec_fast.load(run / "best")),
               "cascade": (started["cascade"], genrec_fast.load(cascade))}
    finally:
        for s in started.values():
            s.stop()


def expected(rec, body: dict):
    """What `recommend()` returns for one request's own arguments."""
    return rec.recommend([body["history"]], k=body.get("k") or 10, users=[body.get("user")],
                         exclude_seen=body.get("exclude_seen"), allowed_items=body.get("allowed_items"))[0]


def assert_answer(rec, body: dict, response) -> None:
    assert response.status_code == 200, (body, response.text)
    got, want = response.json(), expected(rec, body)
    assert got["items"] == want.items, body
    np.testing.assert_allclose(got["scores"], want.scores, atol=1e-5)


def good_requests(rec, n: int, seed: int) -> list:
    """Histories of 1-12 catalog items with mixed k, exclude_seen, allowed_items and users."""
    rng = np.random.default_rng(seed)
    ids, users = rec.catalog.item_ids, rec.catalog.user_ids
    out = []
    for i in range(n):
        body = {"history": [ids[j] for j in rng.choice(len(ids), int(rng.integers(1, 13)))]}
        if i % 3:
            body["k"] = int(rng.choice([1, 5, 10, 20]))
        if i % 4 == 1:
            body["exclude_seen"] = bool(rng.integers(2))
        if i % 5 == 2:
            body["allowed_items"] = [ids[j] for j in rng.choice(len(ids), 25, replace=False)]
        if i % 2 and users:
            body["user"] = users[int(rng.integers(len(users)))]
        out.append(body)
    return out


@pytest.mark.parametrize("name", ["pieces", "ensemble", "aiohttp", "cascade"])
def test_answers_equal_recommend(servers, name):
    srv, rec = servers[name]
    assert httpx.get(f"{srv.url}/health", timeout=5).text == "ok"
    for body in good_requests(rec, 8, seed=1) + [{"history": [rec.catalog.item_ids[3]], "user": "someone new"}]:
        assert_answer(rec, body, srv.post(body))


def test_ids_as_strings_or_ints(servers):
    srv, rec = servers["pieces"]  # the synthetic catalog's ids are ints
    hist = rec.catalog.item_ids[:4]
    allowed = [str(x) for x in hist[:3]] + [hist[3]]  # mixed spellings in one list
    as_text = srv.post({"history": [str(x) for x in hist], "k": 5, "allowed_items": allowed})
    assert_answer(rec, {"history": hist, "k": 5, "allowed_items": hist}, as_text)


BAD = [  # body, status, the field the error names
    ({"k": 3}, 422, "history"),
    ({"history": []}, 422, "history"),
    ({"history": "sku1"}, 422, "history"),
    ({"history": [1.5]}, 422, "history"),
    ({"history": [None]}, 422, "history"),
    ({"history": ["no such item"]}, 422, "history"),
    ({"history": [0], "k": 0}, 422, "k"),
    ({"history": [0], "k": -3}, 422, "k"),
    ({"history": [0], "k": 2.5}, 422, "k"),
    ({"history": [0], "k": "5"}, 422, "k"),
    ({"history": [0], "k": True}, 422, "k"),
    ({"history": [0], "exclude_seen": "yes"}, 422, "exclude_seen"),
    ({"history": [0], "allowed_items": "sku3"}, 422, "allowed_items"),
    ({"history": [0], "allowed_items": ["no such item"]}, 422, "allowed_items"),
    ({"history": [0], "allowed_items": [{"id": 1}]}, 422, "allowed_items"),
    ({"history": [0], "user": [1]}, 422, "user"),
    ({"histroy": [0]}, 422, "histroy"),
    ({"history": [0], "unknown_items": "drop"}, 422, "unknown_items"),
    ({"history": ["no such item"], "unknown_items": "skip"}, 422, "history"),  # nothing known is left
    ([1, 2], 422, "body"),
]


def _bad(rec, body):
    """A BAD body with the placeholder item 0 replaced by one of the catalog's items."""
    if isinstance(body, dict) and body.get("history") == [0]:
        return {**body, "history": [rec.catalog.item_ids[0]]}
    return body


@pytest.mark.parametrize("name", ["ensemble", "aiohttp"])
@pytest.mark.parametrize("body,status,field", BAD)
def test_bad_requests_name_the_field(servers, body, status, field, name):
    srv, rec = servers[name]
    r = srv.post(_bad(rec, body))
    assert r.status_code == status, r.text
    err = r.json()
    assert err["field"] == field and err["error"].startswith(f"{field}:"), err


@pytest.mark.parametrize("name", ["pieces", "aiohttp"])
def test_not_json_and_the_server_still_answers(servers, name):
    srv, rec = servers[name]
    r = httpx.post(f"{srv.url}/recommend", content=b"{not json", headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["field"] == "body"
    body = {"history": rec.catalog.item_ids[:3], "k": 4}
    assert_answer(rec, body, srv.post(body))


@pytest.mark.parametrize("name", ["pieces", "aiohttp"])
def test_unknown_items_skip_drops_them_as_recommend_does(servers, name):
    srv, rec = servers[name]
    hist = rec.catalog.item_ids[:3]
    mixed = [hist[0], "no such item", hist[1], 10 ** 9, hist[2]]
    r = srv.post({"history": mixed, "k": 5})
    assert r.status_code == 422 and '"unknown_items": "skip"' in r.json()["error"]
    assert_answer(rec, {"history": hist, "k": 5}, srv.post({"history": mixed, "k": 5, "unknown_items": "skip"}))


@pytest.mark.parametrize("name", ["pieces", "aiohttp"])
def test_k_beyond_the_catalog_returns_every_allowed_item(servers, name):
    srv, rec = servers[name]
    body = {"history": rec.catalog.item_ids[:3], "k": len(rec.catalog.item_ids) + 7}  # (within --max-k 1000)
    assert_answer(rec, body, srv.post(body))
    assert len(srv.post(body).json()["items"]) == len(rec.catalog.item_ids)


@pytest.mark.parametrize("name,limit", [("pieces", 1000), ("ensemble", 50), ("aiohttp", 1000)])
def test_a_k_above_max_k_is_a_422_naming_the_limit(servers, name, limit):
    """--max-k (default 1000) on both engines: k = 10**9 on a million items was a 28.7 MB body."""
    srv, rec = servers[name]
    r = srv.post({"history": rec.catalog.item_ids[:3], "k": 10 ** 9})
    assert r.status_code == 422 and r.json() == {
        "error": f"k: expected at most {limit} (the server's --max-k), got {10 ** 9}", "field": "k"}
    body = {"history": rec.catalog.item_ids[:3], "k": limit}
    assert_answer(rec, body, srv.post(body))


@pytest.mark.parametrize("name", ["pieces", "aiohttp"])
def test_unknown_ids_are_echoed_cut_short(servers, name):
    """A 1 MB id is not a 1 MB error: each echoed id's repr is cut to ID_CHARS characters."""
    srv, rec = servers[name]
    for field in ("history", "allowed_items"):
        body = {"history": rec.catalog.item_ids[:2], field: ["x" * 10 ** 6, "nope"]}
        r = srv.post(body)
        assert r.status_code == 422 and len(r.content) < 300, r.content[:300]
        assert r.json()["error"].startswith(f"{field}: unknown item ids ['{'x' * 36}..., 'nope']"), r.json()


def test_short_ids_lists_five_cut_reprs():
    from genrec_fast.data import ID_CHARS, short_ids
    assert short_ids([1, "a"]) == "[1, 'a']"
    long = short_ids(["y" * 100] + list(range(9)))
    assert long == "['" + "y" * (ID_CHARS - 4) + "..., 0, 1, 2, 3, ... (10 in all)]"


@pytest.mark.parametrize("name", ["pieces", "aiohttp"])
def test_a_body_not_utf8_is_a_400_naming_the_body(servers, name):
    srv, rec = servers[name]
    r = httpx.post(f"{srv.url}/recommend", content=b'{"history": ["\xff\xfe"]}',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["field"] == "body" and r.json()["error"].startswith("body: "), r.text
    assert httpx.get(f"{srv.url}/nowhere", timeout=5).status_code == 404  # other HTTP errors as FastAPI answers


def test_a_body_not_sent_as_json_is_named_on_litserve(servers):
    """curl -d sends application/x-www-form-urlencoded, which LitServe's FastAPI front end does not parse."""
    srv, rec = servers["pieces"]
    body = json.dumps({"history": rec.catalog.item_ids[:3], "k": 4}).encode()
    r = httpx.post(f"{srv.url}/recommend", content=body,
                   headers={"content-type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 415 and r.json()["field"] == "body"
    assert "Content-Type: application/json" in r.json()["error"]
    r = httpx.post(f"{srv.url}/recommend", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert_answer(rec, {"history": rec.catalog.item_ids[:3], "k": 4}, r)


@pytest.mark.parametrize("name", ["pieces", "ensemble", "aiohttp"])
def test_concurrent_mixed_requests(servers, name):
    """32 requests at once (mixed k / filters / users, 4 of them bad) share batches: every good one equals
    `recommend()` with its own arguments, every bad one gets its own 422."""
    srv, rec = servers[name]
    bodies = good_requests(rec, 32, seed=7)
    for i in (3, 11, 20, 29):
        bodies[i] = {"history": [rec.catalog.item_ids[0]], "k": 0} if i % 2 else {"history": ["no such item"]}

    async def call_all():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/recommend", json=b) for b in bodies))

    responses = asyncio.run(call_all())
    for i, (body, r) in enumerate(zip(bodies, responses)):
        if i in (3, 11, 20, 29):
            assert r.status_code == 422 and r.json()["field"] == ("k" if i % 2 else "history"), r.text
        else:
            assert_answer(rec, body, r)


def test_answer_groups_requests_and_isolates_a_failing_group(servers, monkeypatch):
    """In-process: one recommend() call per (k, exclude_seen, allowed_items); a group that raises gets 500s alone."""
    _, rec = servers["ensemble"]
    ids = rec.catalog.item_ids
    qs = [Query([ids[1], ids[2]], None, 5, False, None), Rejected(422, "k", "k: bad"),
          Query([ids[3]], None, 7, False, None), Query([ids[4]], None, 5, False, None),
          Query([ids[5]], None, 5, True, None)]
    calls = []
    recommend = rec.recommend

    def spy(histories, k, **kw):
        calls.append((len(histories), k, kw["exclude_seen"]))
        if k == 7:
            raise RuntimeError("boom")
        return recommend(histories, k=k, **kw)

    monkeypatch.setattr(rec, "recommend", spy)
    out = answer(rec, qs)
    assert sorted(calls) == [(1, 5, True), (1, 7, False), (2, 5, False)]
    assert out[1] is qs[1] and out[2].status == 500
    for n in (0, 3, 4):
        want = recommend([qs[n].history], k=5, exclude_seen=qs[n].exclude_seen)[0]
        assert out[n].items == want.items


def test_serve_cli_defaults_are_the_modules():
    from genrec_fast import serve_api as serve
    from genrec_fast.cli import build_parser
    args = build_parser().parse_args(["serve", "ckpt"])
    assert (args.max_batch, args.max_wait_ms, args.host) == (serve.MAX_BATCH, None, "127.0.0.1")
    assert args.engine == serve.ENGINES[0] and set(serve.MAX_WAIT_MS) == set(serve.ENGINES)
    assert build_parser()._subparsers._group_actions[0].choices["serve"]._option_string_actions[
        "--engine"].choices == serve.ENGINES


def test_serve_cli_reports_bad_arguments_without_starting(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "missing: no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty")]) == 2
    assert "missing config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a bad port or thread count, before anything loads
        main(["serve", str(tmp_path / "empty"), "--port", "-5"])
    assert "--port: expected a port number from 1 to 65535, got '-5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path / "empty"), "--port", "70000"])
    assert "from 1 to 65535" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path / "empty"), "--threads", "0"])
    assert "--threads: expected a positive integer" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing"), "--engine", "litserve", "--max-wait-ms", "0"]) == 2
    assert "max_wait_ms: expected a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # aiohttp: 0 is fine, < 0 is not (argparse)
        main(["serve", str(tmp_path / "missing"), "--max-wait-ms", "-1"])
    assert "--max-wait-ms: expected a number >= 0, got '-1'" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cascade.json").write_text("{}")  # a cascade directory without its checkpoints
    assert main(["serve", str(tmp_path / "c")]) == 2
    assert "c/retriever: no such directory" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "c"), str(tmp_path / "c")]) == 2
    assert "is a cascade; it is served alone" in capsys.readouterr().err


def test_resolve_ids_as_the_catalog_spells_them():
    ints, strs = {5: 0, -2: 1}, {"5": 0, "sku1": 1}
    assert [resolve_id(ints, x) for x in (5, "5", "-2", "05", " 5", "5.0", "x")] == [5, 5, -2, None, None, None, None]
    assert [resolve_id(strs, x) for x in ("5", 5, "sku1", 6)] == ["5", "5", "sku1", None]


@pytest.mark.parametrize("engine", ["aiohttp", "litserve"])
def test_a_port_in_use_is_an_error_not_a_traceback(trained, capsys, monkeypatch, engine):
    """Said before the model loads, and nothing claims to serve."""
    _, run = trained
    monkeypatch.setattr(sys.modules["genrec_fast.recommend"], "load",
                        lambda *a, **k: pytest.fail("loaded a model for a busy port"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(run / "best"), "--port", str(port), "--threads", "1", "--engine", engine]) == 2
    out, err = capsys.readouterr()
    assert f"error: --port {port}: cannot listen on 127.0.0.1:{port} (" in err
    assert "serving on" not in out and "starting on" not in out


def test_the_aiohttp_engine_says_serving_once_bound(monkeypatch, capsys):
    """The `serving on` line comes from aiohttp's own callback after its sites started, not before; the model's
    loading is said before it (a catalog of millions takes a minute)."""
    from aiohttp import web
    from genrec_fast import serve_aio
    said = []

    def run_app(app, host, port, print, **kw):
        said.append(capsys.readouterr().out)  # before binding: nothing printed yet
        print("======== Running on ... ========")
    monkeypatch.setattr(web, "run_app", run_app)
    monkeypatch.setattr(serve_aio, "make_app", lambda *a, **k: None)
    monkeypatch.setattr(sys.modules["genrec_fast.recommend"], "load", lambda *a, **k: _Stub())
    monkeypatch.setattr(serve_aio, "check_arguments", lambda *a: None)
    serve_aio.serve(["ckpt"], port=free_port(), threads=1)
    assert said[0].startswith("loading ckpt ...\nloaded 1 items in ") and "serving on" not in said[0]
    assert capsys.readouterr().out.startswith("serving on http://127.0.0.1:")


class _Stub:
    class catalog:
        item_ids = [1]

    def recommend(self, *a, **k):
        return []


def test_the_litserve_engine_stops_on_sigint_too_and_does_not_claim_to_serve(monkeypatch, capsys):
    """A background job of a non-interactive shell starts with SIGINT ignored: run() installs its handler for SIGINT
    as for SIGTERM. The model loads in LitServe's worker, after run() prints: its line says "starting", not
    "serving"."""
    from genrec_fast import serve
    seen = {}

    class FakeServer:
        lit_api = serve.RecommendAPI(["ckpt"], max_batch=8, max_k=70)

        def run(self, **kw):
            seen.update({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        serve.run(FakeServer(), "127.0.0.1", 8123)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert seen[signal.SIGINT] is seen[signal.SIGTERM] and callable(seen[signal.SIGINT])
    with pytest.raises(KeyboardInterrupt):
        seen[signal.SIGINT](signal.SIGINT, None)
    out = capsys.readouterr().out
    assert out.startswith("starting on http://127.0.0.1:8123/recommend (litserve, max batch 8") and "max k 70" in out
    assert "GET /health answers once the model is loaded" in out and "serving on" not in out


def test_max_k_must_be_positive(tmp_path, capsys):
    from genrec_fast.serve_api import check_arguments
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path), "--max-k", "0"])
    assert "--max-k: expected a positive integer, got '0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_k: expected a positive integer, got 0"):
        check_arguments([tmp_path], 4, 0)
