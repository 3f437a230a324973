import os
from pathlib import Path

import pytest

DATA_DIR = Path(os.environ.get("GENREC_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
BEAUTY = DATA_DIR / "beauty" / "sequential_data.txt"


@pytest.fixture(scope="session")
def beauty_path() -> Path:
    if not BEAUTY.is_file():
        pytest.skip(f"real data not found at {BEAUTY} (set GENREC_DATA_DIR)")
    return BEAUTY


@pytest.fixture(scope="session")
def p5_file(tmp_path_factory):
    """Synthetic data (150 users, 40 items) written as a P5 file, for the commands' tests."""
    from genrec_fast.data import synthetic
    d = synthetic(n_users=150, n_items=40, seed=8)
    p = tmp_path_factory.mktemp("data") / "sequential_data.txt"
    p.write_text("".join(f"{u} " + " ".join(str(d.item_ids[i]) for i in s) + "\n"
                         for u, s in zip(d.user_ids, d.sequences)))
    return p


@pytest.fixture(scope="session")
def small_synthetic():
    from genrec_fast.data import synthetic
    return synthetic(n_users=300, n_items=60, seed=3, follow_prob=0.9)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, small_synthetic):
    """A tiny model trained for a few epochs on small synthetic data (seconds)."""
    import dataclasses
    from genrec_fast import preset, train
    p = preset("tiny")
    p.train = dataclasses.replace(p.train, pretrain_epochs=1, finetune_epochs=6, eval_users=100, lr=5e-3)
    out = tmp_path_factory.mktemp("run")
    rec = train(small_synthetic, out, p, progress=False)
    return rec, out
