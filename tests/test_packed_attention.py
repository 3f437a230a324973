"""kernels.packed_attention (C++, sequences back to back without padding) against its PyTorch definition."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrec_fast.kernels.packed_attention import packed_attention, packed_attention_reference


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), lengths=st.lists(st.integers(0, 40), min_size=0, max_size=12),
       heads=st.integers(1, 4), head_dim=st.integers(1, 40), threads=st.sampled_from([1, 2]),
       scale=st.sampled_from([0.5, 4.0]))
def test_equals_the_reference(seed, lengths, heads, head_dim, threads, scale):
    """Sequences of 0-40 rows (key blocks of 16 and groups of 4 queries cut anywhere), head sizes below, at and
    above a block of 16 lanes, large scores (scale 4: softmaxes near one-hot)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.long)
    qkv = torch.randn(int(lengths.sum()), 3 * heads * head_dim, generator=g) * scale
    got = packed_attention(qkv, lengths, heads, threads=threads)
    want = packed_attention_reference(qkv, lengths, heads)
    assert got.shape == (len(qkv), heads * head_dim)
    torch.testing.assert_close(got, want, atol=2e-5 * scale**2, rtol=1e-4)  # float32 rounding of scores ~ scale**2


def test_each_sequence_sees_only_its_own_rows_and_nan_stays_in_its_sequence():
    torch.manual_seed(0)
    lengths = torch.tensor([3, 5, 2])
    qkv = torch.randn(10, 3 * 2 * 8)
    base = packed_attention(qkv, lengths, 2)
    changed = qkv.clone()
    changed[3:8] = torch.randn(5, 48)  # the second sequence only
    out = packed_attention(changed, lengths, 2)
    assert torch.equal(out[:3], base[:3]) and torch.equal(out[8:], base[8:])
    changed[4, 20] = float("nan")  # a key of the second sequence
    out = packed_attention(changed, lengths, 2)
    assert out[3:8].isnan().any() and not out[:3].isnan().any() and not out[8:].isnan().any()


def test_keeps_the_dtype_and_names_bad_arguments():
    qkv = torch.randn(6, 24)
    got = packed_attention(qkv.to(torch.bfloat16), torch.tensor([2, 4]), 2)
    assert got.dtype == torch.bfloat16
    np.testing.assert_allclose(got.float().numpy(), packed_attention(qkv.to(torch.bfloat16).float(),
                                                                     torch.tensor([2, 4]), 2).to(torch.bfloat16)
                               .float().numpy())
    with pytest.raises(ValueError, match="lengths: expected counts >= 0 summing to the 6 rows"):
        packed_attention(qkv, torch.tensor([2, 3]), 2)
    with pytest.raises(ValueError, match=r"qkv: expected a CPU tensor \(N, 3 \* C\) with C divisible by heads=5"):
        packed_attention(qkv, torch.tensor([6]), 5)
