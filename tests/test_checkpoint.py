import pickle

import pytest
import torch

import genrec_fast
from genrec_fast import checkpoint


class NotATensor:  # a pickled object: weights_only loading must refuse it
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_round_trip_gives_the_same_recommendations(trained, small_synthetic, tmp_path):
    rec, out = trained
    d = small_synthetic
    hists = [[d.item_ids[i] for i in s] for s in d.sequences[:8]]
    want = rec.recommend(hists, k=10, users=d.user_ids[:8])
    checkpoint.save(tmp_path / "ckpt", rec.model, rec.tokenizer, rec.catalog)
    again = genrec_fast.load(tmp_path / "ckpt")
    got = again.recommend(hists, k=10, users=d.user_ids[:8])
    assert [r.items for r in got] == [r.items for r in want]
    for a, b in zip(rec.model.state_dict().values(), again.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind


def test_overwrite_is_atomic_and_train_dir_layout(trained, tmp_path):
    rec, out = trained
    for name in ("config.json", "catalog.json", "tokenizer.model", "weights.pt"):
        assert (out / "best" / name).is_file()
    assert (out / "last" / "train_state.pt").is_file()
    checkpoint.save(tmp_path / "c", rec.model, rec.tokenizer, rec.catalog)
    checkpoint.save(tmp_path / "c", rec.model, rec.tokenizer, rec.catalog)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_loading_refuses_pickled_code(trained, tmp_path):
    rec, _ = trained
    checkpoint.save(tmp_path / "c", rec.model, rec.tokenizer, rec.catalog)
    with open(tmp_path / "c" / "weights.pt", "wb") as f:
        pickle.dump({"x": NotATensor()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights.pt cannot be read \\(UnpicklingError: Weights only load failed"):
        genrec_fast.load(tmp_path / "c")


@pytest.mark.parametrize("name", ["config.json", "catalog.json", "tokenizer.json"])
def test_a_damaged_json_file_is_named(trained, tmp_path, name):
    rec, _ = trained
    checkpoint.save(tmp_path / "c", rec.model, rec.tokenizer, rec.catalog)
    (tmp_path / "c" / name).write_text('{"item_ids": [1, \x01')
    with pytest.raises(ValueError, match=f"checkpoint .*c: {name} is not valid JSON .*; the file is damaged"):
        genrec_fast.load(tmp_path / "c")


def test_missing_files_are_named(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="missing config.json, catalog.json, tokenizer.model, weights.pt"):
        genrec_fast.load(tmp_path / "c")


def test_model_trained_without_user_tokens_ignores_users(trained, small_synthetic, tmp_path):
    from genrec_fast.config import TrainConfig
    rec, _ = trained
    checkpoint.save(tmp_path / "c", rec.model, rec.tokenizer, rec.catalog, TrainConfig(drop_user_prob=1.0))
    again = genrec_fast.load(tmp_path / "c")
    assert not again.use_users and rec.use_users
    d = small_synthetic
    hists = [[d.item_ids[i] for i in s] for s in d.sequences[:6]]
    with_users = again.recommend(hists, k=5, users=d.user_ids[:6])
    without = again.recommend(hists, k=5)
    assert [r.items for r in with_users] == [r.items for r in without]
    assert again.encode([1, 2], 3).user_ids.sum() == 0 and rec.encode([1, 2], 3).user_ids.sum() > 0


def test_whole_item_checkpoint_with_an_older_tokenizer_loads_the_same(small_synthetic, tmp_path):
    """Before issue 18 a whole-item tokenizer's BPE corpus held every item's text (as the pieces corpus still
    does), so its sentencepiece model differs from a new one; item i is still token n_sp + i, as when saved."""
    import dataclasses
    import numpy as np
    from genrec_fast import Recommender, preset
    from genrec_fast.data import Catalog, leave_one_out
    from genrec_fast.model import GenRec
    from genrec_fast.tokenizer import GenRecTokenizer
    d = small_synthetic
    train_part = leave_one_out(d).train
    older = GenRecTokenizer.train(train_part, d.item_codes, 200, "pieces").model_proto  # the older whole corpus
    tok = GenRecTokenizer(older, d.item_codes, "whole")
    n_sp = tok.sp.get_piece_size()
    assert older != GenRecTokenizer.train(train_part, d.item_codes, 200, "whole").model_proto
    cfg = dataclasses.replace(preset("tiny").model, vocab_size=tok.vocab_size, n_users=d.n_users,
                              n_items=d.n_items, item_eos=False)
    torch.manual_seed(0)
    rec = Recommender(GenRec(cfg).eval(), tok, Catalog.from_data(d))
    hists = [[d.item_ids[i] for i in s] for s in d.sequences[:8]]
    want = rec.recommend(hists, k=10, users=d.user_ids[:8])
    checkpoint.save(tmp_path / "c", rec.model, tok, rec.catalog)
    again = genrec_fast.load(tmp_path / "c")
    assert again.tokenizer.model_proto == older and again.tokenizer.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(again.tokenizer.item_flat, n_sp + np.arange(d.n_items))
    assert all(t.device.type == "cpu" for t in again.model.state_dict().values())  # built on meta, then assigned
    got = again.recommend(hists, k=10, users=d.user_ids[:8])
    assert [r.items for r in got] == [r.items for r in want] and [r.scores for r in got] == [r.scores for r in want]


def test_checkpoints_get_the_permissions_of_a_plain_mkdir(trained, tmp_path):
    """Not mkdtemp's 0700: a model trained by one account is served by another."""
    import os
    rec, _ = trained
    umask = os.umask(0o022)
    try:
        checkpoint.save(tmp_path / "c", rec.model, rec.tokenizer, rec.catalog)
    finally:
        os.umask(umask)
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o755


def test_newer_or_incomplete_checkpoints_are_named_errors(trained, tmp_path):
    import json
    rec, _ = trained
    checkpoint.save(tmp_path / "c", rec.model, rec.tokenizer, rec.catalog, train_cfg=preset_train())
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["train"]["from_the_future"] = 1
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"train section has unknown keys \['from_the_future'\]"):
        genrec_fast.load(tmp_path / "c")
    ids = [f"sku{i}" for i in range(40)]
    whole = genrec_fast.Recommender.random(ids, "tiny", vocab_size=200, item_tokens="whole")
    checkpoint.save(tmp_path / "d", whole.model, whole.tokenizer, whole.catalog)
    (tmp_path / "d" / "tokenizer.json").unlink()  # (read as the oldest checkpoints' pieces: its items are not)
    with pytest.raises(ValueError, match="it has no tokenizer.json, which every checkpoint but the oldest"):
        genrec_fast.load(tmp_path / "d")
    codes = genrec_fast.Recommender.random(ids, "tiny", vocab_size=200, item_tokens="codes", code_levels=1,
                                           code_branches=4)
    checkpoint.save(tmp_path / "e", codes.model, codes.tokenizer, codes.catalog)
    (tmp_path / "e" / "item_code_table.npy").unlink()
    with pytest.raises(FileNotFoundError, match="missing item_code_table.npy"):
        genrec_fast.load(tmp_path / "e")


def preset_train():
    from genrec_fast import preset
    return preset("tiny").train
