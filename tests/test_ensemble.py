"""Ensembles: beam search over the members' mean log-probabilities equals the brute-force reference."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import genrec_fast
from genrec_fast import checkpoint
from genrec_fast.cli import _train_seconds, main
from genrec_fast.data import leave_one_out

from brute_force import assert_beam_search_is_exhaustive


@pytest.fixture(scope="module")
def second_member(trained, tmp_path_factory):
    """The trained checkpoint with every weight perturbed: another member with the same tokenizer."""
    _, out = trained
    model, tokenizer, catalog, train_cfg, _ = checkpoint.load_parts(out / "best")
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.std().clamp(min=1e-3) * torch.randn_like(p))
    path = tmp_path_factory.mktemp("member") / "best"
    checkpoint.save(path, model, tokenizer, catalog, train_cfg)
    return path


def test_ensemble_beam_search_equals_reference(trained, second_member, small_synthetic):
    _, out = trained
    rec = genrec_fast.load([out / "best", second_member])
    assert len(rec.model.members) == 2
    split = leave_one_out(small_synthetic)
    for u in (0, 11, 42):
        assert_beam_search_is_exhaustive(rec, split.test_history(u), u)


def test_ensemble_differs_from_its_members_and_of_copies_equals_one(trained, second_member, small_synthetic):
    _, out = trained
    d = small_synthetic
    hists = [[d.item_ids[i] for i in s[:-1]] for s in d.sequences[:24]]
    users = d.user_ids[:24]
    one = genrec_fast.load(out / "best").recommend(hists, k=10, users=users)
    copies = genrec_fast.load([out / "best", out / "best"]).recommend(hists, k=10, users=users)
    assert [r.items for r in copies] == [r.items for r in one]
    np.testing.assert_allclose([r.scores for r in copies], [r.scores for r in one], atol=1e-4)
    other = genrec_fast.load(second_member).recommend(hists, k=10, users=users)
    both = genrec_fast.load([out / "best", second_member]).recommend(hists, k=10, users=users)
    assert [r.items for r in both] != [r.items for r in one]
    assert [r.items for r in both] != [r.items for r in other]


def test_ensemble_rejects_members_of_other_data(trained, tmp_path):
    _, out = trained
    model, tokenizer, catalog, train_cfg, _ = checkpoint.load_parts(out / "best")
    catalog.user_ids = list(reversed(catalog.user_ids))
    checkpoint.save(tmp_path / "other", model, tokenizer, catalog, train_cfg)
    with pytest.raises(ValueError, match="different catalog.json"):
        genrec_fast.load([out / "best", tmp_path / "other"])
    with pytest.raises(ValueError, match="non-empty list"):
        genrec_fast.load([])
    model, tokenizer, catalog, train_cfg, _ = checkpoint.load_parts(out / "best")
    checkpoint.save(tmp_path / "window", model, tokenizer, catalog, dataclasses.replace(train_cfg, max_items=3))
    with pytest.raises(ValueError, match="encodes histories differently"):
        genrec_fast.load([out / "best", tmp_path / "window"])


def test_cli_report_and_evaluate_an_ensemble(trained, second_member, small_synthetic, tmp_path, capsys):
    _, out = trained
    d = small_synthetic
    data = tmp_path / "sequential_data.txt"
    data.write_text("".join(f"{u} " + " ".join(str(d.item_ids[i]) for i in s) + "\n"
                            for u, s in zip(d.user_ids, d.sequences)))
    metrics = tmp_path / "ens" / "metrics.json"
    args = [str(out / "best"), str(second_member), "--data", str(data)]
    assert main(["report", *args, "--out", str(metrics), "--quiet"]) == 0
    assert "genrec+exclude_seen" in capsys.readouterr().out
    rep = json.loads(metrics.read_text())
    assert {"genrec", "genrec+exclude_seen", "popularity"} <= set(rep["test"])
    assert rep["checkpoints"] == [str(out / "best"), str(second_member)]
    assert "train_seconds" not in rep  # the perturbed member has no training time to add
    assert _train_seconds(out / "best") > 0  # a trained run's time, read from its train_summary.json
    assert main(["evaluate", *args, "--users", "40", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["users"] == 40
    assert main(["report", args[0], "--data", str(tmp_path / "missing.txt"), "--out", str(metrics)]) == 2
