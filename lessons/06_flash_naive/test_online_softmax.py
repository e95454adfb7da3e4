"""The NumPy walk-through of lesson 06 against torch.softmax and attention_ref."""

import numpy as np
import pytest
import torch

from common.checks import assert_close
from common.reference import attention_ref

import online_softmax as osm


@pytest.mark.parametrize("n", [1, 17, 1000])
def test_softmax_variants_agree(n):
    x = np.random.default_rng(n).standard_normal(n) * 5
    ref = torch.softmax(torch.from_numpy(x), 0)
    for fn in (osm.softmax_naive, osm.softmax_safe, osm.softmax_online):
        assert_close(fn(x), ref, dtype=torch.float64, name=fn.__name__)
    for block in (1, 7, 16, 4096):
        assert_close(osm.softmax_online_blocks(x, block), ref, dtype=torch.float64,
                     name=f"blocks of {block}")


def test_naive_softmax_overflows_safe_ones_do_not():
    x = (np.random.default_rng(1).standard_normal(33) * 50 + 60).astype(np.float32)  # up to ~200
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.isnan(osm.softmax_naive(x)).any()  # exp(>88) = inf in float32: inf/inf
    ref = torch.softmax(torch.from_numpy(x).double(), 0)
    for fn in (osm.softmax_safe, osm.softmax_online):
        assert_close(fn(x), ref, dtype=torch.float32, name=fn.__name__)
    assert_close(osm.softmax_online_blocks(x, 8), ref, dtype=torch.float32)


# (batch, seqlen_q, seqlen_k, heads, d, causal): ragged, seqlen_q > seqlen_k with causal
# gives rows that see no key (zeros, lse = +inf).
CASES = [(1, 1, 1, 1, 8, False), (2, 17, 33, 2, 16, False), (1, 33, 17, 2, 16, True),
         (1, 40, 40, 1, 32, True), (1, 17, 50, 1, 8, True)]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("fn", ["rowwise", "v1", "v2"])
def test_attention_loops_match_reference(case, fn):
    batch, sq, sk, heads, d, causal = case
    g = torch.Generator().manual_seed(sq * 100 + sk)
    q, k, v = (torch.randn(batch, s, heads, d, generator=g, dtype=torch.float64)
               for s in (sq, sk, sk))
    scale = 0.37
    kw = {} if fn == "rowwise" else {"block_m": 16, "block_n": 7}  # tiles that don't divide
    one_head = {"rowwise": osm.attention_rowwise, "v1": osm.flash_attention_v1_loops,
                "v2": osm.flash_attention_v2_loops}[fn]
    o, lse = osm.per_head(one_head, q.numpy(), k.numpy(), v.numpy(), scale, causal, **kw)
    ref_o, ref_lse = attention_ref(q, k, v, softmax_scale=scale, causal=causal,
                                   compute_dtype=torch.float64)
    assert_close(o, ref_o, atol=1e-12, rtol=1e-10, name=f"{fn} out")
    assert_close(lse, ref_lse, atol=1e-12, rtol=1e-10, name=f"{fn} lse")


def test_v1_and_v2_independent_of_tile_sizes():
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((29, 16)) for _ in range(3))
    base, _ = osm.flash_attention_v1_loops(q, k, v, causal=True, block_m=29, block_n=29)
    for bm, bn in ((1, 1), (4, 16), (16, 4), (32, 64)):
        for fn in (osm.flash_attention_v1_loops, osm.flash_attention_v2_loops):
            o, _ = fn(q, k, v, causal=True, block_m=bm, block_n=bn)
            assert_close(o, base, atol=1e-12, rtol=1e-10, name=f"{fn.__name__} {bm}x{bn}")
