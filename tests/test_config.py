import json

import pytest

from genrec_fast.config import for_catalog, load_config, parse_override, preset, with_overrides


def test_json_config_overrides_its_preset(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"preset": "tiny", "note": "ignored", "model": {"dropout": 0.3},
                             "train": {"lr": 0.002}, "tokenizer": {"item_tokens": "whole"}}))
    p = load_config(str(f))
    base = preset("tiny")
    assert (p.model.dropout, p.train.lr, p.tokenizer.item_tokens) == (0.3, 0.002, "whole")
    assert p.model.d_model == base.model.d_model and p.train.batch_size == base.train.batch_size


def test_overrides_and_errors(tmp_path):
    p = with_overrides(preset("small"), dict([parse_override("train.label_smoothing=0.1"),
                                              parse_override("tokenizer.item_tokens=whole")]))
    assert p.train.label_smoothing == 0.1 and p.tokenizer.item_tokens == "whole"
    # fields checked together apply together, whatever their order (d_model 32 with the preset's 4 heads fails)
    q = with_overrides(preset("base"), {"model.d_model": 32, "model.n_heads": 2})
    assert (q.model.d_model, q.model.n_heads) == (32, 2)
    with pytest.raises(ValueError, match="divisible"):
        with_overrides(preset("base"), {"model.d_model": 32})
    with pytest.raises(ValueError, match="no field 'lrr'"):
        with_overrides(p, {"train.lrr": 1})
    with pytest.raises(ValueError, match="unknown section"):
        with_overrides(p, {"optim.lr": 1})
    with pytest.raises(ValueError, match="section.field=value"):
        parse_override("lr=1")
    with pytest.raises(ValueError, match="neither a preset"):
        load_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(str(tmp_path / "bad.json"))


def test_override_values_must_have_the_fields_type():
    p = preset("small")
    texts = ["train.lr=1", "train.leaf_smoothing=null", "train.softmax=sampled"]
    q = with_overrides(p, dict(map(parse_override, texts)))
    assert (q.train.lr, type(q.train.lr), q.train.leaf_smoothing, q.train.softmax) == (1.0, float, None, "sampled")
    assert with_overrides(p, {"train.leaf_smoothing": 0.2}).train.leaf_smoothing == 0.2
    for text, message in [("train.lr=abc", r"train.lr expects float, got 'abc' \(str\)"),
                          ("model.history_bias=1", r"model.history_bias expects bool, got 1 \(int\)"),
                          ("train.patience=2.5", r"train.patience expects int, got 2.5"),
                          ("train.batch_size=true", r"train.batch_size expects int, got True"),
                          ("tokenizer.item_tokens=3", r"tokenizer.item_tokens expects str, got 3"),
                          ("train.leaf_smoothing=[1]", r"train.leaf_smoothing expects float or None, got \[1\]")]:
        with pytest.raises(ValueError, match=message):
            with_overrides(p, dict([parse_override(text)]))


def test_shipped_configs_load():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.json"))
    assert files, "configs/ holds the reported configurations"
    for f in files:
        spec = json.loads(f.read_text())
        if "members" in spec:  # an ensemble: its members are shipped configs, and it is not trainable itself
            members = spec["members"]  # {"config": a shipped config, "seeds": [train.seed of each member]}
            assert (root / members["config"]).is_file() and members["seeds"], f"{f.name} names a missing member"
            with pytest.raises(ValueError, match=r"describes an ensemble of configs/.* trained with the seeds"):
                load_config(str(f))
        else:
            load_config(str(f))
        for key in ("reproduces", "command", "date"):
            assert key in spec, f"{f.name} lacks {key!r}"


def test_the_recommended_preset_is_the_recorded_recommended_config():
    from pathlib import Path
    recorded = Path(__file__).resolve().parents[1] / "configs" / "whole-history-transition-both-calibrated.json"
    assert load_config("recommended") == load_config(str(recorded))
    p = preset("recommended")
    assert (p.tokenizer.item_tokens, p.model.item_eos, p.model.transition_reverse, p.train.calibrate) == \
        ("whole", False, True, True)


def test_the_codes_preset_is_the_recorded_codes_config():
    from pathlib import Path
    recorded = (Path(__file__).resolve().parents[1] / "configs" /
                "beauty-codes-leaf-l1-history-transition-both-calibrated.json")
    assert load_config("codes") == load_config(str(recorded))
    assert load_config("codes").tokenizer.item_tokens == "codes" and load_config("codes").model.leaf_head


def test_sampled_softmax_fields():
    p = with_overrides(preset("small"), dict([parse_override("train.softmax=sampled"),
                                              parse_override("train.num_negatives=256")]))
    assert (p.train.softmax, p.train.num_negatives) == ("sampled", 256)
    assert (preset("small").train.softmax, preset("small").train.num_negatives) == ("auto", 1024)
    with pytest.raises(ValueError, match="train.softmax must be one of"):
        with_overrides(p, {"train.softmax": "sampeld"})
    with pytest.raises(ValueError, match="train.num_negatives must be >= 0"):
        with_overrides(p, {"train.num_negatives": -5})


def test_smoothing_fields():
    p = with_overrides(preset("small"), dict([parse_override("train.leaf_smoothing=0")]))
    assert p.train.leaf_smoothing == 0 and preset("small").train.leaf_smoothing is None
    with pytest.raises(ValueError, match=r"train.leaf_smoothing must be in \[0, 1\)"):
        with_overrides(p, {"train.leaf_smoothing": 1.5})
    with pytest.raises(ValueError, match=r"train.label_smoothing must be in \[0, 1\)"):
        with_overrides(p, {"train.label_smoothing": -0.1})
    with pytest.raises(ValueError, match=r"train.item_aux must be >= 0"):
        with_overrides(p, {"train.item_aux": -1})


def test_for_catalog_fixes_the_auto_settings_by_the_catalogs_size():
    small, big = for_catalog(preset("recommended"), 12_101), for_catalog(preset("recommended"), 1_000_000)
    assert (small.train.softmax, small.train.sparse_tables) == ("full", False)  # the tuned recipe as recorded
    assert (big.train.softmax, big.train.sparse_tables) == ("sampled", True)
    assert big.model == small.model == preset("recommended").model
    # the codes preset's 128 clusters on ML-100K, Beauty, Yelp; doubled until leaves hold <= 192 items above
    sizes = (1_682, 12_101, 20_033, 24_576, 24_577, 1_000_000, 10_000_000)
    assert [for_catalog(preset("codes"), n).tokenizer.code_branches for n in sizes] == [
        128, 128, 128, 128, 256, 8192, 65536]
    codes = for_catalog(preset("codes"), 1_000_000).train
    assert (codes.softmax, codes.sparse_tables) == ("full", True)  # the leaf head trains with the full softmax
    pieces = for_catalog(preset("small"), 1_000_000).train  # several pieces an item: no sampled softmax
    assert (pieces.softmax, pieces.sparse_tables) == ("full", True)
    explicit = with_overrides(preset("recommended"), {"train.softmax": "full", "train.sparse_tables": False,
                                                      "tokenizer.code_branches": 64})
    assert for_catalog(explicit, 10**6) == explicit  # (max_leaf is 0 outside the codes preset)
    aux = for_catalog(with_overrides(preset("codes"), {"train.item_aux": 0.5}), 10**6).train
    assert aux.sparse_tables is False  # item_aux's softmax over every item vector is a dense gradient
    sampled = with_overrides(preset("recommended"), {"train.softmax": "sampled", "train.sparse_tables": False})
    assert for_catalog(sampled, 12_101).train.sparse_tables is True  # what the sampled softmax trains with anyway
    assert for_catalog(with_overrides(preset("codes"), {"tokenizer.max_leaf": 0}), 10**6).tokenizer.code_branches == 128
    with pytest.raises(ValueError, match="tokenizer.max_leaf must be >= 0"):
        with_overrides(preset("codes"), {"tokenizer.max_leaf": -1})
    with pytest.raises(ValueError, match="train.softmax must be one of"):
        with_overrides(preset("codes"), {"train.softmax": "automatic"})


@pytest.mark.parametrize("key, value, match", [
    ("train.patience", 0, "train.patience must be >= 1"), ("train.max_items", 0, "train.max_items must be >= 1"),
    ("train.num_beams", 0, "train.num_beams must be >= 1"), ("model.n_heads", 0, "model.n_heads must be >= 1"),
    ("model.dropout", 2.0, r"model.dropout must be in \[0, 1\)"), ("train.warmup_steps", -1, "warmup_steps"),
    ("tokenizer.vocab_size", 0, "tokenizer.vocab_size must be >= 1")])
def test_values_that_would_fail_later_are_refused_naming_the_field(key, value, match):
    with pytest.raises(ValueError, match=match):
        with_overrides(preset("small"), {key: value})


def test_a_json_config_without_preset_overrides_the_recommended_one(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"lr": 0.002}}))
    p = load_config(str(f))
    assert p.train.lr == 0.002 and p.tokenizer == preset("recommended").tokenizer
    f.write_text(json.dumps({"trian": {"lr": 0.002}}))
    with pytest.raises(ValueError, match="did you mean 'train'"):
        load_config(str(f))
    f.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected an object"):
        load_config(str(f))
    f.write_text(json.dumps({"train": 3}))
    with pytest.raises(ValueError, match="'train' must be an object"):
        load_config(str(f))
