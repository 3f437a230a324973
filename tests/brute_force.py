"""The brute-force reference of the beam search: every catalog item scored by teacher forcing."""
import numpy as np
import torch
import torch.nn.functional as F

from genrec_fast.batching import pad_encoder, pad_targets
from genrec_fast.ensemble import Ensemble


def exhaustive_scores(rec, items, user) -> np.ndarray:
    """log P(item | history) for every catalog item: the sum over its tokens of the log-softmax of the
    members' mean token log-probabilities (one member for a plain model, where this is its log-softmax)."""
    members = list(rec.model.members) if isinstance(rec.model, Ensemble) else [rec.model]
    cfg = members[0].cfg
    enc = pad_encoder([rec.encode(items, user)])
    targets = [rec.tokenizer.target(i, cfg.item_eos) for i in range(len(rec.catalog.item_ids))]
    dec_in, labels = pad_targets(targets, cfg.bos_id)
    n = len(targets)
    with torch.no_grad():
        logps = []
        for m in members:
            memory = m.encode(enc["tokens"], enc["user_ids"], enc["item_ids"], enc["mask"]).expand(n, -1, -1)
            logps.append(F.log_softmax(m.decode(dec_in, memory, enc["mask"].expand(n, -1)), -1))  # (n, T, V)
        logp = F.log_softmax(torch.stack(logps).mean(0), -1)
    tok = logp.gather(2, labels.clamp(min=0)[..., None])[..., 0] * (labels >= 0)  # (n, T)
    return tok.sum(1).numpy()


def assert_beam_search_is_exhaustive(rec, items, user, k: int = 10) -> None:
    """With a beam per catalog item, the beam search returns the brute-force top k, with its scores."""
    brute = exhaustive_scores(rec, items, user)
    got, scores = rec.decode_batch([rec.encode(items, user)], k=k, num_beams=len(rec.catalog.item_ids))
    want = np.argsort(-brute, kind="stable")[:k]
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_allclose(scores[0], brute[want], atol=1e-4)
