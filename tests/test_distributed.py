"""Multi-process training: 2 CPU processes under torchrun against one process with the same global batch.

The module is also the torchrun script: `torchrun --standalone --nproc_per_node 2 tests/test_distributed.py
OUT` runs `_worker` on each rank, which trains the scenarios below and records what each rank trained on.
One launch (~8 s on 2 cores) serves the tests of the `two_ranks` fixture; the CLI has its own.

Tolerance: the two processes sum each gradient in another order than one process (two shard sums, then
one across ranks) and pad their shards to other lengths, so weights differ by float32 rounding (~1e-7 per
step) carried through ~20 Adam steps: measured <= 5e-6 of each tensor's norm. The test allows 1e-4,
well below what a real difference makes (weighting the ranks' mean losses equally, not by their targets:
~2e-2). Weights whose exact gradient is zero are left out (NOISE_ONLY); losses agree to 1e-5.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genrec_fast import preset, train
from genrec_fast.data import leave_one_out, synthetic
from genrec_fast.distributed import Group, combine_metrics, shard_bounds

WORLD = 2
RTOL = 1e-4  # of each weight tensor, in norm: see the module docstring


def _data():
    return synthetic(n_users=150, n_items=30, seed=6, follow_prob=0.9)


def _batch_size() -> int:
    """An odd global batch (shards of different sizes: the loss weighting matters) after which the
    pretraining epoch's last batch holds one example (rank 1's shard of it is empty)."""
    n_examples = sum(len(s) for s in leave_one_out(_data()).train)  # one pretraining example per item
    return next(b for b in range(41, 15, -2) if n_examples % b == 1)


def _preset(finetune_epochs: int, softmax: str = "full"):
    """The tiny model with one token per item and no EOS step (one target per example), no dropout (ranks
    draw other dropout masks than one process); the sampled run with the history and transition biases (each
    row's biased items are classes of its sampled softmax)."""
    p = preset("tiny")
    biases = softmax == "sampled"
    p.model = dataclasses.replace(p.model, item_eos=False, dropout=0.0, history_bias=biases, transition_bias=biases,
                                  transition_reverse=biases)
    p.tokenizer = dataclasses.replace(p.tokenizer, item_tokens="whole")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=finetune_epochs, eval_users=61,
                                  batch_size=_batch_size(), lr=5e-3, softmax=softmax, num_negatives=8)
    return p


def _worker(out: Path) -> None:
    """Each rank: (1) full softmax, 1 epoch (rank 1 pointed at its own, unused directory), then resumed to
    2 epochs from a copy of `last` in that directory; (2) sampled softmax, 2 epochs. Records the examples
    of every step's shard and what `train` returned."""
    import importlib
    train_mod = importlib.import_module("genrec_fast.train")  # the module: the package's `train` is the function
    rank, d = int(os.environ["RANK"]), _data()
    shards, to_batch = [], train_mod.to_batch

    def recording(part, *args):
        shards.append([[e.user, e.target, len(e.items)] for e in part])
        return to_batch(part, *args)
    train_mod.to_batch = recording
    own = out / ("full" if rank == 0 else "rank1")
    returned = [train(d, own, _preset(0), progress=False)]
    if rank == 1:  # after train returns every rank has passed rank 0's last save
        shutil.copytree(out / "full" / "last", own / "last")
    returned.append(train(d, own, _preset(1), resume=True, progress=False))
    returned.append(train(d, out / "sampled", _preset(1, "sampled"), progress=False))
    cut = _preset(1)
    cut.train = dataclasses.replace(cut.train, batch_size=4, max_minutes=1e-4)  # passed at the first step
    returned.append(train(d, out / "cut", cut, progress=False))
    (out / f"rank{rank}.json").write_text(json.dumps({"shards": shards, "none": [r is None for r in returned]}))


def _torchrun(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` (a free port on this machine), run to success."""
    import genrec_fast
    package_root = str(Path(genrec_fast.__file__).resolve().parents[1])  # the workers import this copy
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",  # a crashing rank prints its stacks
               PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), *args]
    run = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The scenarios of `_worker` on 2 ranks (torchrun, gloo), and the same with one process."""
    out = tmp_path_factory.mktemp("ddp")
    _torchrun(__file__, str(out))
    ref, d = tmp_path_factory.mktemp("one"), _data()
    train(d, ref / "full", _preset(0), progress=False)
    one_epoch = torch.load(ref / "full" / "last" / "weights.pt")
    train(d, ref / "full", _preset(1), resume=True, progress=False)
    train(d, ref / "sampled", _preset(1, "sampled"), progress=False)
    return out, ref, one_epoch


def _losses(run_dir: Path) -> list:
    return [json.loads(x)["loss"] for x in (run_dir / "log.jsonl").read_text().splitlines()]


# Weights whose exact gradient is zero: a key bias adds the same score to every key of a query, and the
# decoder's self-attention over its one step (BOS) has one key. They move by rounding noise alone, which
# Adam scales up to lr-sized steps (one process and two differ there by ~100%), and change no output.
NOISE_ONLY = re.compile(r"k_proj\.bias$|^decoder\.layers\.\d+\.self_attn\.[qk]_proj\.")


def _assert_weights_close(got: dict, want: dict) -> None:
    """Every tensor but NOISE_ONLY within RTOL of one process's, in norm (measured: <= 5e-6)."""
    assert got.keys() == want.keys()
    compared = [k for k in want if not NOISE_ONLY.search(k)]
    assert len(compared) > 0.8 * len(want)
    for k in compared:
        if not want[k].is_floating_point():  # the transition bias's neighbour tables: built, not trained
            assert torch.equal(got[k], want[k]), k
            continue
        err = float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12))
        assert err <= RTOL, f"{k}: relative difference {err:.2e}"


def test_two_ranks_follow_one_process_and_resume(two_ranks):
    out, ref, one_epoch = two_ranks
    np.testing.assert_allclose(_losses(out / "full"), _losses(ref / "full"), rtol=1e-5)
    assert len(_losses(out / "full")) == 2  # epoch 1, then epoch 2 after the resume
    _assert_weights_close(torch.load(out / "rank1" / "last" / "weights.pt"), one_epoch)  # the epoch-1 copy
    _assert_weights_close(torch.load(out / "full" / "last" / "weights.pt"),
                          torch.load(ref / "full" / "last" / "weights.pt"))
    state = torch.load(out / "full" / "last" / "train_state.pt")
    assert state["epoch"] == 2 and state["step"] == torch.load(ref / "full" / "last" / "train_state.pt")["step"]


def test_sampled_softmax_on_two_ranks_follows_one_process(two_ranks):
    out, ref, _ = two_ranks
    np.testing.assert_allclose(_losses(out / "sampled"), _losses(ref / "sampled"), rtol=1e-5)
    _assert_weights_close(torch.load(out / "sampled" / "last" / "weights.pt"),
                          torch.load(ref / "sampled" / "last" / "weights.pt"))


def test_a_time_budget_cuts_every_rank_at_the_same_step(two_ranks):
    from genrec_fast.train import CUT_EVERY
    out, _, _ = two_ranks  # the ranks ask rank 0's clock every CUT_EVERY steps: both stop at its first ask
    rows = [json.loads(x) for x in (out / "cut" / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["cut_after_steps"]) for r in rows] == [(1, CUT_EVERY)] and "valid" in rows[0]
    assert json.loads((out / "cut" / "train_summary.json").read_text())["stopped_by"] == "max_minutes"


def test_only_rank_0_writes_and_returns_the_model(two_ranks):
    out, _, _ = two_ranks
    for name in ("log.jsonl", "curves.png", "train_summary.json", "best", "last"):
        assert (out / "full" / name).exists(), name
    assert [p.name for p in (out / "rank1").iterdir()] == ["last"]  # the test's own copy, nothing more
    assert torch.load(out / "rank1" / "last" / "train_state.pt")["epoch"] == 1  # not overwritten by the resume
    assert json.loads((out / "rank0.json").read_text())["none"] == [False] * 4
    assert json.loads((out / "rank1.json").read_text())["none"] == [True] * 4


def test_each_rank_trains_on_its_share_of_every_global_batch(two_ranks, tmp_path):
    """Rank 0 the first half of each batch of one process's first epoch, rank 1 the rest (a batch of one
    example: rank 1 runs it with weight 0). Training the whole batch on both ranks fails here; it would
    not change the weights, as the ranks' gradients are averaged."""
    from genrec_fast.train import Trainer
    out, _, _ = two_ranks
    batches = Trainer(_data(), tmp_path, _preset(0), progress=False).epoch_batches(pretrain=True)
    shards = [json.loads((out / f"rank{r}.json").read_text())["shards"][:len(batches)] for r in range(WORLD)]
    singles = [b for b, part in enumerate(batches) if len(part) == 1]
    assert len(singles) == 1  # the empty-shard case is exercised
    for b, part in enumerate(batches):
        keys = [[e.user, e.target, len(e.items)] for e in part]
        assert shards[0][b] + (shards[1][b] if len(part) > 1 else []) == keys, b
        assert len(shards[0][b]) - len(shards[1][b]) in (0, 1) or b in singles
    assert shards[1][singles[0]] == shards[0][singles[0]]  # the weight-0 stand-in


def test_cli_train_under_torchrun_prints_and_writes_once(tmp_path):
    d = synthetic(n_users=80, n_items=25, seed=8)
    data = tmp_path / "sequential_data.txt"
    data.write_text("".join(f"{u} " + " ".join(str(d.item_ids[i]) for i in s) + "\n"
                            for u, s in zip(d.user_ids, d.sequences)))
    run = _torchrun("-m", "genrec_fast.cli", "train", "--data", str(data), "--config", "tiny", "--pretrain-epochs",
                    "0", "--finetune-epochs", "1", "--eval-users", "30", "--out", "run", "--quiet", "--no-report",
                    cwd=tmp_path)
    assert run.stdout.count("trained in") == 1 and run.stdout.count("interactions") == 1  # rank 0's lines only
    assert (tmp_path / "run" / "best").is_dir() and (tmp_path / "run" / "train_summary.json").is_file()


def test_shard_bounds_cover_every_item_once():
    for n in (0, 1, 2, 7, 32, 33):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
    assert Group(rank=1, world_size=2).shard(list(range(5))) == [3, 4]
    assert Group().shard([1, 2]) == [1, 2] and not Group().enabled


def test_combine_metrics_weights_each_shard_by_its_users():
    a = {"HR@10": 1.0, "NDCG@10": 0.5, "users": 3, "seconds": 1.0, "exclude_seen": False}
    b = {"HR@10": 0.0, "NDCG@10": 0.1, "users": 1, "seconds": 2.5, "exclude_seen": False}
    m = combine_metrics([a, None, b])
    assert m == pytest.approx({"HR@10": 0.75, "NDCG@10": 0.4, "users": 4, "seconds": 2.5, "exclude_seen": False})


def test_one_process_ignores_a_world_size_of_one(monkeypatch):
    from genrec_fast.distributed import session
    monkeypatch.setenv("WORLD_SIZE", "1")
    with session("cpu") as (group, device):
        assert group == Group() and device == torch.device("cpu")
        assert not torch.distributed.is_initialized()


def test_session_tears_the_group_down_on_errors(monkeypatch):
    """A group joined from torchrun's variables (here of one process, on a free port) is destroyed when
    training raises, so the error is not hidden behind a hang or a second init."""
    import socket
    from genrec_fast import distributed
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "env_world_size", lambda: 2)  # take the torchrun path with one process
    with pytest.raises(RuntimeError, match="a failed epoch"), distributed.session("cpu") as (group, _):
        assert torch.distributed.is_initialized() and group.is_main
        raise RuntimeError("a failed epoch")
    assert not torch.distributed.is_initialized()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as cli.script: no interpreter teardown beside gloo's threads
