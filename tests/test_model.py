import pytest
import torch

from genrec_fast.config import ModelConfig, preset
from genrec_fast.model import GenRec, _from_end


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=50, d_model=32, encoder_layers=2, decoder_layers=2, n_heads=4, ffn_dim=64,
                      max_positions=40, n_users=5, n_items=9, **kw)
    return GenRec(cfg).eval()


def batch(B=3, S=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, 50, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 7:] = False
    tokens[1, 7:] = 0
    users = torch.randint(0, 6, (B, S), generator=g) * mask
    items = torch.randint(0, 10, (B, S), generator=g) * mask
    return tokens, users, items, mask


def test_cached_decoding_equals_full_decoding():
    m = tiny_model()
    tokens, users, items, mask = batch()
    dec = torch.randint(5, 50, (3, 6))
    with torch.no_grad():
        full = m(tokens, users, items, mask, dec)  # (B, T, V)
        memory = m.encode(tokens, users, items, mask)
        W = 2  # two beams per user: rows user-major
        cache = m.start_decoding(memory, mask)
        rows = torch.repeat_interleave(dec, W, 0)
        steps = [m.decode_step(rows[:, t], cache) for t in range(dec.shape[1])]
    step_logits = torch.stack(steps, 1).view(3, W, 6, -1)
    for w in range(W):
        torch.testing.assert_close(step_logits[:, w], full, atol=1e-5, rtol=1e-5)


def test_outputs_do_not_depend_on_later_tokens():
    m = tiny_model()
    tokens, users, items, mask = batch()
    d1 = torch.randint(5, 50, (3, 6))
    d2 = d1.clone()
    d2[:, 4:] = torch.randint(5, 50, (3, 2))
    with torch.no_grad():
        a, b = m(tokens, users, items, mask, d1), m(tokens, users, items, mask, d2)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("positions", ["start", "end"])
def test_padding_does_not_change_real_rows(positions):
    m = tiny_model(encoder_positions=positions)
    tokens, users, items, mask = batch()
    dec = torch.randint(5, 50, (3, 4))
    with torch.no_grad():
        padded = m(tokens, users, items, mask, dec)[1]
        alone = m(tokens[1:2, :7], users[1:2, :7], items[1:2, :7], mask[1:2, :7], dec[1:2])[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_id_embeddings_change_the_output():
    m = tiny_model()
    tokens, users, items, mask = batch()
    dec = torch.randint(5, 50, (3, 4))
    with torch.no_grad():
        a = m(tokens, users, items, mask, dec)
        b = m(tokens, users, items.roll(1, 1) * mask, mask, dec)
    assert not torch.allclose(a, b)


def test_reorder_selects_beams_and_users():
    m = tiny_model()
    tokens, users, items, mask = batch()
    with torch.no_grad():
        memory = m.encode(tokens, users, items, mask)
        cache = m.start_decoding(memory, mask)
        m.decode_step(torch.tensor([2, 2, 2]), cache)
        cache.reorder(torch.tensor([2, 2, 0, 0]), torch.tensor([2, 0]))  # users 2 and 0, two beams each
        out = m.decode_step(torch.tensor([7, 8, 7, 8]), cache)
        ref = m.start_decoding(memory[[2, 0]], mask[[2, 0]])
        m.decode_step(torch.tensor([2, 2]), ref)
        ref.reorder(torch.tensor([0, 0, 1, 1]))
        want = m.decode_step(torch.tensor([7, 8, 7, 8]), ref)
    torch.testing.assert_close(out, want)


def test_positions_from_the_end():
    assert _from_end(torch.tensor([3, 5]), 5).tolist() == [[2, 1, 0, 0, 0], [4, 3, 2, 1, 0]]
    tokens, users, items, mask = batch()
    with torch.no_grad():  # same weights, only the position scheme differs
        start, end = (tiny_model(encoder_positions=p).encode(tokens, users, items, mask) for p in ("start", "end"))
    assert not torch.allclose(start, end)
    with pytest.raises(ValueError, match="encoder_positions must be 'start' or 'end'"):
        ModelConfig(encoder_positions="middle")


def test_too_long_input_is_an_error():
    m = tiny_model()
    x = torch.randint(5, 50, (1, 41))
    z = torch.zeros_like(x)
    with pytest.raises(ValueError, match="max_positions=40"):
        m.encode(x, z, z, torch.ones_like(x, dtype=torch.bool))


def test_presets_and_config_errors():
    assert preset("base").model.d_model == 768 and preset("tiny").model.d_model < preset("small").model.d_model
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ModelConfig(d_model=30, n_heads=4)


def test_hf_bart_conversion_matches_hugging_face():
    transformers = pytest.importorskip("transformers")
    from genrec_fast.convert import from_hf_bart
    torch.manual_seed(0)
    hc = transformers.BartConfig(vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=2,
                                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                 decoder_ffn_dim=64, max_position_embeddings=40, pad_token_id=0, bos_token_id=2,
                                 eos_token_id=3, decoder_start_token_id=2)
    hf = transformers.BartForConditionalGeneration(hc).eval()
    with torch.no_grad():
        hf.final_logits_bias.normal_()
        for p in hf.parameters():  # move LayerNorms off their identity init so a mix-up would show
            p.add_(0.05 * torch.randn_like(p))
    m = from_hf_bart(hf, n_users=4, n_items=6).eval()
    tokens, _, _, mask = batch(S=11)
    tokens = tokens % 60
    dec = torch.randint(4, 60, (3, 5))
    dec[:, 0] = 2
    z = torch.zeros_like(tokens)
    with torch.no_grad():
        want = hf(input_ids=tokens, attention_mask=mask.long(), decoder_input_ids=dec).logits
        got = m(tokens, z, z, mask, dec)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], want[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["cpp", "padded"])
@pytest.mark.parametrize("positions", ["start", "end"])
def test_packed_encoder_equals_the_padded_one(positions, attention, monkeypatch):
    """Inference skips the padding in the encoder layers: the real pieces get the same memory, with the packed
    self-attention in C++ (CPUs) or padded around `kernels.attention` (other devices; forced here)."""
    import genrec_fast.model as model_module
    if attention == "padded":
        monkeypatch.setattr(model_module, "_cpp_packed_attention", lambda t: False)
    m = tiny_model(encoder_positions=positions)
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([11, 3, 7, 1, 9])
    mask = torch.arange(11)[None, :] < lengths[:, None]
    tokens = torch.randint(5, 50, (5, 11), generator=g) * mask
    users = torch.randint(0, 6, (5, 11), generator=g) * mask
    items = torch.randint(0, 10, (5, 11), generator=g) * mask
    with torch.no_grad():
        packed = m.encode(tokens, users, items, mask)  # the default at inference
        padded = m.encode(tokens, users, items, mask, packed=False)
    torch.testing.assert_close(packed[mask], padded[mask], atol=1e-5, rtol=1e-5)
    assert (packed[~mask] == 0).all()
    assert not torch.allclose(padded[~mask], torch.zeros_like(padded[~mask]))  # the padded path did differ there


def test_first_step_without_cache_equals_the_cached_step():
    """`first_heads` (cross-attention without projecting the memory) = one cached step from BOS."""
    m = tiny_model()
    tokens, users, items, mask = batch(B=4, S=11)
    mask[2, 3:] = False
    with torch.no_grad():
        memory = m.encode(tokens, users, items, mask)
        cached = m.decode_step_hidden(torch.full((4,), m.cfg.bos_id), m.start_decoding(memory, mask))
        (head,) = m.first_heads(memory, mask)
    torch.testing.assert_close(head.x, cached, atol=1e-5, rtol=1e-5)
    assert head.weight is m.shared.weight
