"""scripts/fuse_rankings.py: the rank fusion and its end-to-end run on tiny trained models."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from genrec_fast.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuse_rankings.py"


@pytest.fixture(scope="module")
def fuse():
    spec = importlib.util.spec_from_file_location("fuse_rankings", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rrf_sums_weighted_reciprocal_ranks(fuse):
    a = np.array([[5, 6, 7, -1]])
    b = np.array([[7, 8, 5, 9]])
    top = fuse.rrf([a, b], [0.5, 0.5])  # 5: 1/60 + 1/62, 7: 1/62 + 1/60 (tie: 5 first), 6: 1/61, 8: 1/61, 9
    assert top[0, :5].tolist() == [5, 7, 6, 8, 9] and (top[0, 5:] == -1).all()
    assert fuse.rrf([a, b], [1.0, 0.0])[0, :3].tolist() == [5, 6, 7]  # a weight of 0 adds nothing
    ndcg = fuse.ndcg10(np.array([[1, 2, 3], [4, 5, 6]]), np.array([2, 9]))
    np.testing.assert_allclose(ndcg, [1 / np.log2(3), 0.0])


def test_runs_on_trained_models_and_reads_no_test_item(fuse, tmp_path, monkeypatch, capsys):
    from genrec_fast.data import synthetic
    d = synthetic(n_users=120, n_items=70, seed=4)
    data = tmp_path / "sequential_data.txt"
    data.write_text("".join(f"{u} " + " ".join(str(d.item_ids[i]) for i in s) + "\n"
                            for u, s in zip(d.user_ids, d.sequences)))
    cfg = tmp_path / "whole.json"
    cfg.write_text(json.dumps({"preset": "tiny", "tokenizer": {"item_tokens": "whole"}}))
    for name in ("a", "b"):
        assert main(["train", "--data", str(data), "--config", str(cfg), "--pretrain-epochs", "1", "--set",
                     "train.finetune_epochs=1", "--set", f"train.seed={ord(name)}", "--out", str(tmp_path / name),
                     "--no-report", "--quiet"]) == 0
    assert main(["train", "--model", "sasrec", "--data", str(data), "--set", "sasrec.max_epochs=2", "--out",
                 str(tmp_path / "s"), "--no-report", "--quiet"]) == 0
    from genrec_fast import evaluate
    asked = []
    real = evaluate.histories_for
    monkeypatch.setattr(fuse, "histories_for", lambda split, part, users: asked.append(part) or real(split, part, users))
    monkeypatch.setattr(sys, "argv", ["fuse_rankings.py", "--data", str(data), "--genrec", str(tmp_path / "a" / "best"),
                                      str(tmp_path / "b" / "best"), "--sasrec", str(tmp_path / "s" / "best")])
    capsys.readouterr()
    fuse.main()
    out = capsys.readouterr().out
    assert set(asked) == {"valid"}
    assert "120 validation users" in out and out.count("RRF: weight") == 3
    for name in ("genrec0", "genrec1", "sasrec0"):
        assert f"{name}: NDCG@10 " in out
