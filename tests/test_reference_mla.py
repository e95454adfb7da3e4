"""paged_mla_decode_ref against attention written out token by token, in float64."""

import math

import pytest
import torch

from common.checks import assert_close
from common.reference import paged_mla_decode_ref


def _paged_problem(lens, seqlen_q, heads_q, heads_k, d, page, gen):
    """Random pages in random order; every slot no sequence owns holds NaN or garbage."""
    pages_per_seq = [(n + page - 1) // page for n in lens]
    max_pages = max(pages_per_seq) + 2                    # table slots nobody uses
    num_pages = sum(pages_per_seq) + 3                    # pages nobody uses
    perm = torch.randperm(num_pages, generator=gen)
    k_cache = torch.randn(num_pages, page, heads_k, d, generator=gen, dtype=torch.float64)
    block_table = torch.randint(-10**6, 10**6, (len(lens), max_pages), generator=gen,
                                dtype=torch.int32)
    owned = torch.zeros(num_pages, page, dtype=torch.bool)
    nxt = 0
    for b, n in enumerate(lens):
        for p in range(pages_per_seq[b]):
            block_table[b, p] = perm[nxt]
            owned[perm[nxt], :max(0, min(page, n - p * page))] = True
            nxt += 1
    k_cache[~owned] = float("nan")
    q = torch.randn(len(lens), seqlen_q, heads_q, d, generator=gen, dtype=torch.float64)
    return q, k_cache, block_table, torch.tensor(lens, dtype=torch.int32)


def _token_by_token(q, k_cache, block_table, lens, dv, scale, causal):
    batch, sq, hq, d = q.shape
    page, hk = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(batch, sq, hq, dv, dtype=torch.float64)
    lse = torch.full((batch, hq, sq), math.inf, dtype=torch.float64)
    for b, n in enumerate(lens.tolist()):
        keys = [k_cache[int(block_table[b, j // page]), j % page] for j in range(n)]
        for i in range(sq):
            last = n - sq + i if causal else n - 1            # last visible key
            for h in range(hq):
                kv = h // (hq // hk)
                s = [float(q[b, i, h] @ keys[j][kv]) * scale for j in range(last + 1)]
                if not s:
                    continue
                m = max(s)
                w = [math.exp(x - m) for x in s]
                lse[b, h, i] = m + math.log(sum(w))
                out[b, i, h] = sum(w[j] * keys[j][kv, :dv] for j in range(len(w))) / sum(w)
    return out, lse


@pytest.mark.parametrize("lens,sq,hq,hk,causal", [
    ([5, 1, 17, 0, 9], 1, 4, 1, False),
    ([5, 1, 17, 0, 9], 3, 4, 1, True),      # len 1 < seqlen_q: rows with no key
    ([12, 33, 2], 2, 6, 2, True),
    ([12, 33, 2], 4, 3, 3, False)])
def test_matches_token_by_token(lens, sq, hq, hk, causal):
    gen = torch.Generator().manual_seed(sum(lens) * 10 + sq)
    d, dv, page = 12, 8, 8
    q, k_cache, bt, cl = _paged_problem(lens, sq, hq, hk, d, page, gen)
    scale = 0.9 / math.sqrt(d)
    out, lse = paged_mla_decode_ref(q, k_cache, bt, cl, head_dim_v=dv, softmax_scale=scale,
                                    causal=causal, compute_dtype=torch.float64)
    exp_out, exp_lse = _token_by_token(q, k_cache, bt, cl, dv, scale, causal)
    assert_close(out, exp_out, atol=1e-10, rtol=1e-9, name="out")
    assert_close(lse, exp_lse, atol=1e-10, rtol=1e-9, name="lse")
    assert not torch.isnan(out).any()


def test_default_scale_and_float32():
    gen = torch.Generator().manual_seed(3)
    q, k_cache, bt, cl = _paged_problem([7, 20], 1, 2, 1, 16, 4, gen)
    out, lse = paged_mla_decode_ref(q.float(), k_cache.float(), bt, cl, head_dim_v=16)
    exp_out, exp_lse = _token_by_token(q, k_cache, bt, cl, 16, 16 ** -0.5, False)
    assert out.dtype == torch.float32
    assert_close(out, exp_out, name="out")
    assert_close(lse, exp_lse, name="lse")
