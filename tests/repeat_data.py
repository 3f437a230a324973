"""Synthetic data with repeats, shared by the history-bias tests."""
import numpy as np

from genrec_fast import SequenceData


def repeat_data(rng, n_users=300, n_items=40):
    """Users who return to the item two steps back (80% of steps): a pattern only a history-aware score
    can learn."""
    seqs = []
    for _ in range(n_users):
        s = list(rng.integers(0, n_items, 2))
        while len(s) < int(rng.integers(6, 10)):
            s.append(s[-2] if rng.random() < 0.8 else int(rng.integers(0, n_items)))
        seqs.append(np.array(s))
    return SequenceData(list(range(n_users)), list(range(n_items)), seqs, [str(i + 1) for i in range(n_items)])
