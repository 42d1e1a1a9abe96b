"""attnstats.masks against plain dense references: every mask built entry by entry in Python loops."""
import itertools
import warnings

import numpy as np
import pytest
import torch

import attnstats
from attnstats import masks
from attnstats.capture.record import valid_tokens as capture_valid_tokens
from attnstats.stats.online import prepare_qk
from attnstats.stats.spectral import spectral_gap_from_qk
from helpers import gaussian_qk, softmax_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_reference(mask, causal, shape):
    """The effective mask ``[*batch, Nq, Nk]`` entry by entry: ``mask[idx] and (j <= i if causal)``."""
    out = np.zeros(shape, dtype=bool)
    m = None if mask is None else np.broadcast_to(mask.numpy(), shape)
    for idx in itertools.product(*(range(s) for s in shape)):
        i, j = idx[-2], idx[-1]
        out[idx] = (True if m is None else bool(m[idx])) and (j <= i or not causal)
    return out


def random_key_padding(batch, n, seed):
    """``[*batch, 1, n]``: each matrix keeps a random prefix of at least one token."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, n + 1, batch, generator=g)
    return (torch.arange(n) < lengths[..., None])[..., None, :]


def random_mask(shape, seed, p=0.6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


# ----------------------------------------------------------------------------------------------
# entries


def test_check_and_broadcast_name_the_argument():
    assert masks.broadcast_mask(None, (2, 3, 3)) is None
    with pytest.raises(TypeError, match="bias: expected a bool torch.Tensor or None, got list"):
        masks.broadcast_mask([[True]], (3, 3), "bias")
    with pytest.raises(TypeError, match=r"mask: expected dtype torch.bool \(True = attend\), got torch.float32"):
        masks.broadcast_mask(torch.ones(3, 3), (3, 3))
    with pytest.raises(ValueError, match=r"mask: shape \(4, 3\) does not broadcast to the attention shape \(2, 3, 3\)"):
        masks.broadcast_mask(torch.ones(4, 3, dtype=torch.bool), (2, 3, 3))
    with pytest.raises(ValueError, match=r"mask: shape \(1, 2, 3, 3\) does not broadcast"):
        masks.broadcast_mask(torch.ones(1, 2, 3, 3, dtype=torch.bool), (2, 3, 3))  # more dims than the attention


def test_broadcast_matches_numpy_and_keeps_key_padding_one_row():
    m = random_mask((2, 1, 1, 5), 0)
    full = masks.broadcast_mask(m, (2, 3, 4, 5))
    np.testing.assert_array_equal(full.numpy(), np.broadcast_to(m.numpy(), (2, 3, 4, 5)))
    kept = masks.broadcast_mask(m, (2, 3, 4, 5), keep_key_padding=True)
    assert kept.shape == (2, 3, 1, 5)
    np.testing.assert_array_equal(kept.expand(2, 3, 4, 5).numpy(), full.numpy())
    # a key-padding mask already expanded along the queries (stride 0) is key padding too
    expanded = m.expand(2, 1, 4, 5)
    assert masks.is_key_padding(expanded) and masks.is_key_padding(m[0, 0, 0])
    assert masks.broadcast_mask(expanded, (2, 3, 4, 5), keep_key_padding=True).shape == (2, 3, 1, 5)
    dense = random_mask((4, 5), 1)
    assert not masks.is_key_padding(dense)
    assert masks.broadcast_mask(dense, (2, 3, 4, 5), keep_key_padding=True).shape == (2, 3, 4, 5)
    # a mask whose query rows do not match the attention is refused before it is cut to one row
    with pytest.raises(ValueError, match=r"mask: shape \(2, 1, 3, 5\) does not broadcast"):
        masks.broadcast_mask(m.expand(2, 1, 3, 5), (2, 3, 4, 5), keep_key_padding=True)


def test_from_padding_is_key_padding():
    pad = torch.tensor([[True, True, False], [True, False, False]])
    kp = masks.from_padding(pad)
    assert kp.shape == (2, 1, 3) and masks.is_key_padding(kp)
    want = np.array([[[pad[b, j].item() for j in range(3)] for _ in range(3)] for b in range(2)])
    np.testing.assert_array_equal(masks.full_mask(kp, (2, 3, 3)).numpy(), want)
    with pytest.raises(TypeError, match="padding_mask: expected dtype torch.bool"):
        masks.from_padding(torch.ones(3))
    with pytest.raises(TypeError, match=r"padding_mask: expected a bool torch.Tensor \[..., N\]"):
        masks.from_padding(torch.tensor(True))


def test_causal_mask_rows_start_anywhere():
    for nq, nk, row0 in [(4, 4, 0), (3, 6, 2), (5, 2, 0), (2, 7, 4)]:
        want = np.array([[j <= row0 + i for j in range(nk)] for i in range(nq)])
        np.testing.assert_array_equal(masks.causal_mask(nq, nk, row0=row0).numpy(), want)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["none", "key_padding", "dense", "vector"])
def test_combine_and_full_mask_match_the_dense_reference(causal, kind):
    shape = (2, 3, 5, 6)
    mask = {
        "none": None,
        "key_padding": random_key_padding((2, 1), 6, 2),
        "dense": random_mask((3, 5, 6), 3),
        "vector": random_mask((6,), 4),
    }[kind]
    want = dense_reference(mask, causal, shape)
    got = masks.full_mask(mask, shape, causal)
    if mask is None and not causal:
        assert got is None and masks.combine(mask, causal, 5, 6) is None
        return
    assert got.shape == shape
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(masks.combine(mask, causal, 5, 6).expand(shape).numpy(), want)


# ----------------------------------------------------------------------------------------------
# tokens


def reference_parts(mask, causal, shape):
    eff = dense_reference(mask, causal, shape)
    return eff.any(-1), eff.any(-2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(6, 6), (4, 7), (7, 4)])
@pytest.mark.parametrize("kind", ["none", "key_padding", "dense"])
def test_valid_parts_match_the_dense_reference(causal, nq, nk, kind):
    shape = (3, 2, nq, nk)
    mask = {
        "none": None,
        "key_padding": random_key_padding((3, 1), nk, 5) & random_mask((3, 1, 1, nk), 6),  # holes, some empty
        "dense": random_mask((3, 2, nq, nk), 7, p=0.3),
    }[kind]
    qv, kv = masks.valid_parts(mask, causal, shape)
    want_q, want_k = reference_parts(mask, causal, shape)
    np.testing.assert_array_equal(qv.numpy(), want_q)
    np.testing.assert_array_equal(kv.numpy(), want_k)
    if nq == nk:
        np.testing.assert_array_equal(masks.valid_tokens(mask, causal, shape).numpy(), want_q & want_k)


def test_capture_rule_drops_padded_queries_of_self_attention():
    # BERT-style key padding: pad tokens attend, but are no queries of interest in self-attention
    kp = torch.tensor([True, True, True, False, False])[None, None, None, :]
    qv, kv = capture_valid_tokens(kp, False, (1, 2, 5, 5))
    np.testing.assert_array_equal(qv.numpy(), np.broadcast_to([True, True, True, False, False], (1, 2, 5)))
    np.testing.assert_array_equal(kv.numpy(), qv.numpy())
    # cross-attention keeps every query with a valid key
    qv, kv = capture_valid_tokens(kp, False, (1, 2, 3, 5))
    assert bool(qv.all()) and kv.shape == (1, 2, 5)
    # left padding under causality: the first real token is the first valid query
    left = torch.tensor([False, False, True, True])[None, None, None, :]
    qv, kv = capture_valid_tokens(left, True, (1, 1, 4, 4))
    np.testing.assert_array_equal(qv[0, 0].numpy(), [False, False, True, True])


def test_block_tokens_key_padding_and_equivalent_masks():
    shape = (2, 3, 6, 6)
    kp = random_key_padding((2, 1), 6, 8)
    for causal in (False, True):
        tokens = masks.block_tokens(kp, causal, shape)
        np.testing.assert_array_equal(tokens.numpy(), np.broadcast_to(kp[..., 0, :].numpy(), (2, 3, 6)))
        # the same key padding with the rows of padded queries cleared (a record's statistics mask)
        cleared = masks.full_mask(kp, shape, causal) & kp[..., 0, :, None]
        np.testing.assert_array_equal(masks.block_tokens(cleared, causal, shape).numpy(), tokens.numpy())
    assert masks.block_tokens(None, True, shape) is None


def test_block_tokens_refuses_what_is_not_key_padding():
    n = 6
    band = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= 1
    with pytest.raises(ValueError, match=r"mask: spectral_gap_from_qk takes key padding \[..., 1, N\].*entry \(0, 2\) is False, expected True"):
        masks.block_tokens(band, False, (n, n), user="spectral_gap_from_qk")
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match=r"causal=True for a causal pattern.*entry \(0, 1\) is False, expected True"):
        masks.block_tokens(tril, False, (n, n))
    assert bool(masks.block_tokens(tril, True, (n, n)).all())  # with causal=True it is no mask at all
    # query padding that keeps a key no valid query is: rows of T attend outside T
    rows = torch.tensor([True] * 5 + [False])
    with pytest.raises(ValueError, match=r"entry \(0, 5\) is True, expected False"):
        masks.block_tokens(rows[:, None] & torch.ones(n, dtype=torch.bool), False, (n, n))
    empty = torch.zeros(2, 1, n, dtype=torch.bool)
    empty[0] = True
    with pytest.raises(ValueError, match=r"pad: no valid entry in the matrix at batch index \(1,\)"):
        masks.block_tokens(empty, False, (2, n, n), name="pad")
    with pytest.raises(ValueError, match=r"mask: no valid entry in the matrix at batch index \(1,\)"):
        masks.block_tokens(empty.expand(2, n, n).clone(), False, (2, n, n))
    crossed = torch.zeros(n, n, dtype=torch.bool)
    crossed[0, 1] = True  # query 0 is valid, key 1 is valid, but no token is both
    with pytest.raises(ValueError, match=r"mask: the matrix at batch index \(\) has no token that is both"):
        masks.block_tokens(crossed, False, (n, n))


# ----------------------------------------------------------------------------------------------
# padding parts


@pytest.mark.parametrize("causal", [False, True])
def test_padding_parts_round_trip(causal):
    shape = (2, 2, 5, 5)
    kp = random_key_padding((2, 1), 5, 9)
    qpad = torch.tensor([True, False, True, True, True])
    for mask, query_all in ((kp, True), (qpad[:, None] & kp, False)):
        qv, kv = masks.padding_parts(mask, shape, causal)
        assert (qv is None) == query_all
        want = dense_reference(mask, causal, shape)
        np.testing.assert_array_equal(masks.from_parts(qv, kv, causal, shape).numpy(), want)
        tokens = masks.tokens_of_parts(qv, kv)
        want_q, want_k = want.any(-1), want.any(-2)
        np.testing.assert_array_equal(tokens.numpy(), (want_q & want_k) if qv is not None else want_k)
    assert masks.padding_parts(None, shape, causal) == (None, None)
    assert masks.from_parts(None, None, False, shape) is None


def test_padding_parts_names_the_first_bad_entry():
    band = (torch.arange(5)[:, None] - torch.arange(5)[None, :]).abs() <= 2
    with pytest.raises(ValueError, match=r"mask: kernel 'x' is linearised and supports only padding masks.*entry \(0, 3\)"):
        masks.padding_parts(band, (5, 5), False, user="kernel 'x' is linearised and")


def test_check_parts():
    kv = torch.tensor([[True, True, False], [False, False, False]])
    with pytest.raises(ValueError, match=r"mask: no valid entry in the matrix at batch index \(1,\)"):
        masks.check_parts(None, kv, False)
    qv = torch.tensor([[True, False, False], [True, True, True]])
    kv2 = torch.tensor([[False, True, True], [True, True, True]])
    with pytest.raises(ValueError, match=r"batch index \(0,\) has no token that is both a valid query and a valid key"):
        masks.check_parts(qv, kv2, False)
    with pytest.raises(ValueError, match=r"mask: no valid entry in the matrix at batch index \(0,\)"):
        masks.check_parts(qv, kv2, True)  # query 0 sees only key 0, which is padding
    masks.check_parts(None, None, True)


# ----------------------------------------------------------------------------------------------
# the q, k paths take the same masks


def test_prepare_qk_reads_expanded_key_padding_as_one_row():
    q, k = gaussian_qk((2, 3), 16, 4, seed=10)
    kp = random_key_padding((2, 1), 16, 11)
    *_, m, _ = prepare_qk(q, k, None, kp.expand(2, 1, 16, 16))
    assert m.shape == (2, 3, 1, 16)
    a = attnstats.streaming_stats(q, k, mask=kp.expand(2, 1, 16, 16), causal=True)
    b = attnstats.streaming_stats(q, k, mask=kp, causal=True)
    assert torch.equal(a.entropy, b.entropy) and torch.equal(a.row_count, b.row_count)


def numpy_gap(p: np.ndarray) -> float:
    ev = np.linalg.eigvals(p)
    return 1 - np.sort(np.abs(ev))[-2]


def test_spectral_gap_from_qk_takes_key_padding():
    n = 60
    q, k = gaussian_qk((2, 2), n, 8, 1.4, 1.4, seed=12)
    lengths = [60, 41]
    kp = (torch.arange(n) < torch.tensor(lengths)[:, None])[:, None, None, :]  # [2, 1, 1, N]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the mask= spelling warns about nothing
        r = spectral_gap_from_qk(q, k, mask=kp)
        rc = spectral_gap_from_qk(q, k, mask=kp, causal=True)
    for b, h in itertools.product(range(2), range(2)):
        m = lengths[b]
        p = softmax_attention(q[b, h, :m], k[b, h, :m]).numpy()
        # both sides solve the same float64 60×60 matrix with LAPACK: rounding only
        assert abs(float(r.gap[b, h]) - numpy_gap(p)) < 1e-9
        pc = softmax_attention(q[b, h, :m], k[b, h, :m], mask=torch.ones(m, m, dtype=torch.bool).tril()).numpy()
        # the causal gap is exact from the diagonal: 1 - max_{i>=1} P_ii, float64 rounding
        assert abs(float(rc.gap[b, h]) - (1 - np.diag(pc)[1:].max())) < 1e-12
    # a full mask that is key padding in effect (padded query rows cleared) gives the same gaps
    cleared = masks.full_mask(kp, (2, 2, n, n), True) & kp[..., 0, :, None]
    assert torch.equal(spectral_gap_from_qk(q, k, mask=cleared, causal=True).gap, rc.gap)


def test_spectral_gap_from_qk_refuses_other_masks():
    q, k = gaussian_qk((2,), 20, 4, seed=13)
    band = (torch.arange(20)[:, None] - torch.arange(20)[None, :]).abs() <= 3
    with pytest.raises(ValueError, match=r"mask: spectral_gap_from_qk takes key padding \[..., 1, N\]"):
        spectral_gap_from_qk(q, k, mask=band)
    tril = torch.ones(20, 20, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match=r"mask: .*causal=True for a causal pattern"):
        spectral_gap_from_qk(q, k, mask=tril)
    with pytest.raises(ValueError, match=r"mask: no valid entry in the matrix at batch index \(1,\)"):
        spectral_gap_from_qk(q, k, mask=torch.tensor([[True] * 20, [False] * 20])[:, None, :])
    with pytest.raises(TypeError, match="mask: expected dtype torch.bool"):
        spectral_gap_from_qk(q, k, mask=torch.ones(2, 1, 20))
    with pytest.raises(ValueError, match=r"mask: shape \(3, 1, 20\) does not broadcast"):
        spectral_gap_from_qk(q, k, mask=torch.ones(3, 1, 20, dtype=torch.bool))


def test_padding_mask_is_deprecated_but_still_works():
    n = 40
    q, k = gaussian_qk((2,), n, 8, 1.3, 1.3, seed=14)
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[1, 30:] = False
    for causal in (False, True):
        with pytest.warns(DeprecationWarning, match=r"padding_mask= is deprecated.*mask=padding_mask\[..., None, :\]"):
            old = spectral_gap_from_qk(q, k, padding_mask=pad, causal=causal)
        new = spectral_gap_from_qk(q, k, mask=pad[:, None, :], causal=causal)
        assert torch.equal(old.gap, new.gap)
    with pytest.warns(DeprecationWarning):
        with pytest.raises(ValueError, match="padding_mask: give mask= or the deprecated padding_mask=, not both"):
            spectral_gap_from_qk(q, k, padding_mask=pad, mask=pad[:, None, :])
    with pytest.warns(DeprecationWarning):
        with pytest.raises(ValueError, match=r"padding_mask: shape \(3, 40\) does not broadcast to \(2, 40\)"):
            spectral_gap_from_qk(q, k, padding_mask=torch.ones(3, n, dtype=torch.bool))
