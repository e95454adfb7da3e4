"""The attention reference against PyTorch's own SDPA, on random inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.checks import assert_close
from common.reference import attention_flops, attention_ref, attention_varlen_ref


def _sdpa(q, k, v, scale, causal):
    """SDPA in float64 with an explicit bottom-right mask (SDPA's is_causal is top-left)."""
    group = q.shape[2] // k.shape[2]
    qt = q.double().transpose(1, 2)
    kt = k.double().transpose(1, 2).repeat_interleave(group, 1)
    vt = v.double().transpose(1, 2).repeat_interleave(group, 1)
    mask = None
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        mask = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("sq,sk,hq,hk,d,causal", [
    (17, 17, 4, 4, 32, False), (17, 17, 4, 2, 32, True), (5, 33, 6, 1, 16, True),
    (33, 33, 2, 2, 64, True), (1, 100, 8, 2, 24, False), (40, 60, 3, 3, 8, True)])
def test_matches_sdpa(sq, sk, hq, hk, d, causal):
    g = torch.Generator().manual_seed(sq * 1000 + sk)
    q = torch.randn(2, sq, hq, d, generator=g)
    k = torch.randn(2, sk, hk, d, generator=g)
    v = torch.randn(2, sk, hk, d, generator=g)
    scale = 0.7 / math.sqrt(d)
    out, lse = attention_ref(q, k, v, softmax_scale=scale, causal=causal,
                             compute_dtype=torch.float64)
    assert_close(out, _sdpa(q, k, v, scale, causal), atol=1e-10, rtol=1e-9)
    # lse = log sum_j exp(s_ij) over the visible keys, computed the slow way
    s = torch.einsum("bihd,bjhd->bhij", q.double(),
                     k.double().repeat_interleave(hq // hk, 2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq), -math.inf)
    assert_close(lse, torch.logsumexp(s, -1), atol=1e-10, rtol=1e-9)


def test_row_without_keys_is_zero_with_inf_lse():
    """Causal with seqlen_q > seqlen_k: the first rows see no key (bottom-right)."""
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
    out, lse = attention_ref(q, k, v, causal=True)
    assert torch.all(out[:, :3] == 0) and torch.all(torch.isposinf(lse[:, :, :3]))
    assert torch.isfinite(out[:, 3:]).all() and torch.isfinite(lse[:, :, 3:]).all()
    assert (out[:, 3:].abs() > 0).any()


def test_value_headdim_may_differ():
    q, k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 9, 1, 16), torch.randn(2, 9, 1, 12)
    out, _ = attention_ref(q, k, v)
    p = torch.softmax(torch.einsum("bihd,bjd->bhij", q, k[:, :, 0]) / 4.0, -1)
    assert_close(out, torch.einsum("bhij,bjd->bihd", p, v[:, :, 0]))


def test_varlen_matches_per_sequence_and_handles_empty():
    lens_q, lens_k = [3, 0, 1, 7], [5, 4, 0, 7]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q, k, v = torch.randn(11, 4, 8), torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True)
    for b in range(4):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if q1 == q0:
            continue
        if k1 == k0:
            assert torch.all(out[q0:q1] == 0) and torch.isposinf(lse[:, q0:q1]).all()
            continue
        o_b, l_b = attention_ref(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=True)
        assert_close(out[q0:q1], o_b[0])
        assert_close(lse[:, q0:q1], l_b[0])


def test_bad_shapes_are_rejected():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        attention_ref(q, torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="head dims"):
        attention_ref(q, torch.randn(1, 4, 3, 4), torch.randn(1, 4, 3, 4))


def test_flops_convention():
    f = attention_flops(2, 128, 128, 4, 64)
    assert f == 4 * 2 * 128 * 128 * 4 * 64
    assert attention_flops(2, 128, 128, 4, 64, causal=True, mode="fwd_bwd") == 3.5 * f / 2


# flash-attn 2.8.3's options (window_size, softcap, alibi_slopes)

def test_window_minus_one_zero_is_causal_and_wide_windows_are_none():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, n, 2, 8, generator=g) for n in (9, 13, 13))
    causal = attention_ref(q, k, v, causal=True)
    for kw in (dict(window_size=(-1, 0)), dict(window_size=(40, 0)),
               dict(window_size=(-1, 5), causal=True)):
        out, lse = attention_ref(q, k, v, **kw)
        assert_close(out, causal[0])
        assert_close(lse, causal[1])
    plain = attention_ref(q, k, v)
    out, lse = attention_ref(q, k, v, window_size=(13, 13))  # >= seqlen_k: unbounded
    assert_close(out, plain[0])
    assert_close(lse, plain[1])


def test_window_mask_row_by_row():
    """Row i sees keys i + sk - sq - left <= j <= i + sk - sq + right, bottom-right."""
    g = torch.Generator().manual_seed(8)
    sq, sk, (wl, wr) = 7, 11, (2, 1)
    q, k, v = (torch.randn(1, n, 1, 4, generator=g, dtype=torch.float64) for n in (sq, sk, sk))
    out, _ = attention_ref(q, k, v, window_size=(wl, wr), compute_dtype=torch.float64)
    for i in range(sq):
        lo, hi = max(i + sk - sq - wl, 0), min(i + sk - sq + wr, sk - 1)
        s = (k[0, lo:hi + 1, 0] @ q[0, i, 0]) / 2.0
        assert_close(out[0, i, 0], torch.softmax(s, 0) @ v[0, lo:hi + 1, 0])


def test_softcap_to_infinity_is_plain_and_alibi_is_a_bias():
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, n, 2, 8, generator=g, dtype=torch.float64) for n in (5, 6, 6))
    plain = attention_ref(q, k, v, compute_dtype=torch.float64)
    capped = attention_ref(q, k, v, softcap=1e7, compute_dtype=torch.float64)
    assert_close(capped[0], plain[0], atol=1e-8, rtol=1e-8)
    slopes = torch.tensor([0.5, 0.25])
    out, lse = attention_ref(q, k, v, alibi_slopes=slopes, compute_dtype=torch.float64)
    i, j = torch.arange(5)[:, None], torch.arange(6)[None, :]
    s = torch.einsum("bihd,bjhd->bhij", q, k) * 8 ** -0.5
    s = s - slopes[:, None, None].double() * (i + 1 - j).abs()
    assert_close(lse, torch.logsumexp(s, -1))
    assert_close(out, torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v))
