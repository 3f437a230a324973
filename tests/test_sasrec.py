"""The SASRec peer: its input layout, its loss against a per-position reference, its ranker, training
that learns (beats popularity on planted structure), checkpoints that reload, and the CLI's settings."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genrec_fast.cli import main
from genrec_fast.data import leave_one_out
from genrec_fast.evaluate import evaluate, popularity_ranker
from genrec_fast.sasrec import (SASRec, SASRecConfig, left_padded, load, sasrec_ranker, train_sasrec,
                                training_rows)


def test_left_padded_keeps_the_most_recent_items():
    out = left_padded([np.array([4, 5, 6]), np.array([], dtype=np.int64), np.arange(10)], 4).numpy()
    assert out.tolist() == [[0, 5, 6, 7], [0, 0, 0, 0], [7, 8, 9, 10]]


def test_training_rows_pair_each_input_with_its_next_item(small_synthetic):
    split = leave_one_out(small_synthetic)
    inp, tgt = training_rows(split, 5)
    seqs = [s for s in split.train if len(s) >= 2]
    assert inp.shape == tgt.shape == (len(seqs), 5)
    for row, s in zip(range(len(seqs)), seqs):
        s = s[-6:]
        n = len(s) - 1
        assert inp[row, 5 - n:].tolist() == (s[:-1] + 1).tolist() and (inp[row, :5 - n] == 0).all()
        assert tgt[row, 5 - n:].tolist() == (s[1:] + 1).tolist() and (tgt[row, :5 - n] == 0).all()


def test_loss_is_the_mean_cross_entropy_of_every_position():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=30, d_model=16, window=6, dropout=0.0)).eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    tgt = torch.tensor([[0, 0, 4, 5, 6, 7], [2, 3, 4, 5, 6, 30]])
    h = model(seq)
    ref = [F.cross_entropy(h[b, t] @ model.item.weight[1:].T, tgt[b, t] - 1)
           for b in range(2) for t in range(6) if tgt[b, t] > 0]
    torch.testing.assert_close(model.loss(seq, tgt), torch.stack(ref).mean())


def test_padding_never_changes_the_last_state():
    """Left padding is masked: the same history in a longer window scores alike."""
    torch.manual_seed(0)
    cfg = SASRecConfig(n_items=30, d_model=16, window=8, dropout=0.0)
    model = SASRec(cfg).eval()
    hist = [np.array([3, 7, 1])]
    short = SASRec(SASRecConfig(**{**cfg.__dict__, "window": 3})).eval()
    short.load_state_dict({k: (v[-3:] if k == "pos.weight" else v) for k, v in model.state_dict().items()})
    torch.testing.assert_close(model.scores(hist), short.scores(hist), atol=1e-5, rtol=1e-5)


def test_ranker_orders_by_score_and_excludes_seen():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=40, d_model=16, window=5, dropout=0.0)).eval()
    hists = [np.array([1, 2, 3]), np.array([7])]
    scores = model.scores(hists).clone()
    top = sasrec_ranker(model)(hists, [0, 1], False)
    assert top.tolist() == scores.argsort(1, descending=True)[:, :20].tolist()
    for b, h in enumerate(hists):
        scores[b, torch.as_tensor(h)] = float("-inf")
    top = sasrec_ranker(model)(hists, [0, 1], True)
    assert top.tolist() == scores.argsort(1, descending=True)[:, :20].tolist()
    assert not any(set(t) & set(h.tolist()) for t, h in zip(top.tolist(), hists))


def test_training_learns_and_the_best_checkpoint_reloads(tmp_path, small_synthetic):
    cfg = SASRecConfig(max_epochs=12, eval_every=3, window=20, d_model=32, lr=5e-3, seed=0)
    model = train_sasrec(small_synthetic, tmp_path, cfg, progress=False)
    split = leave_one_out(small_synthetic)
    ours = evaluate(sasrec_ranker(model), split, "valid", progress=False)
    pop = evaluate(popularity_ranker(split, small_synthetic.n_items), split, "valid", progress=False)
    assert ours["NDCG@10"] > 2 * pop["NDCG@10"]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["best_valid_ndcg10"] == pytest.approx(ours["NDCG@10"])  # the kept weights are the best
    again = load(tmp_path / "best")
    torch.testing.assert_close(again.scores(split.train[:5]), model.scores(split.train[:5]))
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "valid" in r] == [3, 6, 9, 12][:len([r for r in rows if "valid" in r])]


def test_cli_trains_sasrec_and_names_bad_settings(tmp_path, capsys):
    assert main(["train", "--model", "sasrec", "--out", str(tmp_path / "run"), "--set", "sasrec.max_epochs=2",
                 "--set", "sasrec.eval_every=1", "--quiet"]) == 0
    rep = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"sasrec", "sasrec+exclude_seen", "popularity"} <= set(rep["test"])
    assert main(["train", "--model", "sasrec", "--out", str(tmp_path / "explore"), "--set", "sasrec.max_epochs=2",
                 "--no-report", "--quiet"]) == 0
    rep = json.loads((tmp_path / "explore" / "metrics.json").read_text())
    assert "test" not in rep and "sasrec" in rep["valid"]  # --no-report: the test items stay unseen
    # its test afterwards, once, by `report` (the same numbers a reporting run prints)
    assert main(["report", str(tmp_path / "explore" / "best"), "--out", str(tmp_path / "later.json"), "--quiet"]) == 0
    later = json.loads((tmp_path / "later.json").read_text())
    assert later["valid"]["sasrec"] == rep["valid"]["sasrec"] | {"seconds": later["valid"]["sasrec"]["seconds"]}
    assert {"sasrec", "sasrec+exclude_seen"} <= set(later["test"])
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "explore" / "best"), "--part", "valid", "--quiet"]) == 0  # as report
    assert json.loads(capsys.readouterr().out)["NDCG@10"] == pytest.approx(later["valid"]["sasrec"]["NDCG@10"])
    assert main(["recommend", str(tmp_path / "explore" / "best")]) == 2
    assert "a SASRec model" in capsys.readouterr().err
    assert main(["train", "--model", "sasrec", "--set", "train.lr=0.1"]) == 2
    assert "sasrec.FIELD=VALUE" in capsys.readouterr().err
    assert main(["train", "--model", "sasrec", "--set", "sasrec.depth=3"]) == 2
    assert "no field 'depth'" in capsys.readouterr().err
    assert main(["train", "--model", "sasrec", "--set", "sasrec.dropout=1.5"]) == 2
    assert "sasrec.dropout" in capsys.readouterr().err


def test_patience_waits_for_min_steps(tmp_path, small_synthetic):
    """With lr 0 validation never improves after the first epoch: patience 1 stops at epoch 2, unless
    min_steps is not yet reached (then the epoch cap ends the run)."""
    def run(min_steps):
        cfg = SASRecConfig(d_model=16, window=8, lr=0.0, max_epochs=4, eval_every=1, patience=1,
                           min_steps=min_steps)
        train_sasrec(small_synthetic, tmp_path / str(min_steps), cfg, progress=False)
        return json.loads((tmp_path / str(min_steps) / "train_summary.json").read_text())
    assert (run(0)["epochs"], run(0)["stopped_by"]) == (2, "patience")
    assert (run(10**6)["epochs"], run(10**6)["stopped_by"]) == (4, "max_epochs")


def test_max_minutes_cuts_an_epoch_longer_than_the_budget(tmp_path, small_synthetic):
    cfg = SASRecConfig(d_model=16, window=8, batch_size=4, max_epochs=5, eval_every=3, max_minutes=1e-4)
    n = -(-len(training_rows(leave_one_out(small_synthetic), cfg.window)[0]) // cfg.batch_size)
    assert n > 10
    train_sasrec(small_synthetic, tmp_path, cfg, progress=False)  # 6 ms: passed after the first step
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and 1 <= rows[0]["cut_after_steps"] < n and "valid" in rows[0]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["stopped_by"] == "max_minutes" and summary["best_valid_ndcg10"] == rows[0]["valid"]["NDCG@10"]
    whole = dataclasses.replace(cfg, max_minutes=0.0, max_epochs=1)
    train_sasrec(small_synthetic, tmp_path / "whole", whole, progress=False)
    assert "cut_after_steps" not in json.loads((tmp_path / "whole" / "log.jsonl").read_text())


def test_cli_refuses_what_sasrec_would_ignore(tmp_path, capsys, monkeypatch):
    """GenRec's flags, --resume, a GPU and mistyped settings are errors before any data is read or trained."""
    monkeypatch.setattr("genrec_fast.cli.check_device", lambda device, name="": torch.device(device))  # a GPU here
    never = ["--data", str(tmp_path / "never read.txt"), "--out", str(tmp_path / "run")]
    for extra, said in ((["--resume"], "--resume is not supported with --model sasrec"),
                        (["--pretrain-epochs", "2"], "--pretrain-epochs is not supported with --model sasrec"),
                        (["--finetune-epochs", "2"], "--finetune-epochs is not supported"),
                        (["--drop-user-prob", "0.1"], "--drop-user-prob is not supported"),
                        (["--device", "cuda"], "--device cuda: SASRec trains on the CPU here"),
                        (["--set", "sasrec.max_minutes=abc"], "sasrec.max_minutes expects float, got 'abc'"),
                        (["--set", "sasrec.blocks=true"], "sasrec.blocks expects int, got True"),
                        (["--set", "sasrec.max_minutes=-1"], "sasrec.max_minutes must be >= 0")):
        assert main(["train", "--model", "sasrec", *never, *extra]) == 2, extra
        assert said in capsys.readouterr().err, extra
    (tmp_path / "list.json").write_text("[1]")
    assert main(["train", "--model", "sasrec", *never, "--config", str(tmp_path / "list.json")]) == 2
    assert "expected a JSON object with a \"sasrec\" object" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    from genrec_fast.sasrec import config_from
    assert config_from({"lr": 1, "max_minutes": 2}).max_minutes == 2.0  # an int for a float: as config.py takes it
