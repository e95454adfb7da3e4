"""Property tests of lesson 07: FlashAttention v1 with shapes drawn by hypothesis.

The rule is test_flash_v1's (out within the input dtype's tolerance, lse within
float32's, NaN-poisoned outputs), against common.reference.attention_ref in float64.
The kernel takes one head count for q, k and v (no GQA) and float32/float16.

* Shapes: seqlens on both sides of the tile edges (Br = Bc = 16 under the simulator,
  the d's TileConfig on a GPU) and of two tiles, every head dim, both dtypes, causal
  with seqlen_q > seqlen_k (rows that see no key), and every grouping of Q tiles per
  thread block (``q_tiles_per_block``: 1, 2, 3, None = all).
* Diagonal: seqlen_k - seqlen_q on every residue modulo the tile size, causal, so the
  early exits of both loops (``break`` over K/V tiles, ``continue`` over Q tiles) and the
  mask meet the diagonal at each offset inside a tile.
* Numerics: integer q and k with a shared constant part and a power-of-two scale: every
  score is exact and > 88 in magnitude (exp overflows float32 without the max shift, or
  underflows to 0/0), with the keys ordered so that the running max of a row grows at
  every K/V tile (each step rescales O, l in HBM), or is found in the first tile.

Every CUDA thread is a Python thread under the simulator: few, small examples (the cpu
profile in conftest.py; the explicit @example cases are kept from hypothesis's runs).
"""

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from common import runtime
from common.checks import assert_close, poisoned

import flash_v1 as fv
from common.reference import attention_ref

DEV = runtime.torch_device()
TILES = sorted({fv.default_config(d).block_m for d in fv.SUPPORTED_HEAD_DIMS}
               | {fv.default_config(d).block_n for d in fv.SUPPORTED_HEAD_DIMS})
TILE = max(TILES)                       # simulator: 16
EDGES = sorted({1} | {n + e for t in TILES for n in (t, 2 * t) for e in (-1, 0, 1)})


def _examples(fraction):
    return settings(max_examples=max(1, round(settings.default.max_examples * fraction)))


def _check(q, k, v, causal, scale=None, g=2):
    out = poisoned(q.shape, q.dtype, DEV)
    o, lse = fv.flash_attn_v1(q, k, v, softmax_scale=scale, causal=causal, out=out,
                              q_tiles_per_block=g)
    ref_o, ref_lse = attention_ref(q, k, v, softmax_scale=scale, causal=causal,
                                   compute_dtype=torch.float64)
    assert o is out and lse.dtype == torch.float32
    assert_close(o, ref_o.to(q.dtype), dtype=q.dtype, name="out")
    assert_close(lse, ref_lse, dtype=torch.float32, name="lse")


def _qkv(b, sq, sk, h, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=gen).to(DEV, dtype) for s in (sq, sk, sk))


seqlens = st.one_of(st.sampled_from(EDGES), st.integers(1, 2 * TILE + 2))
groups = st.sampled_from([1, 2, 3, None])


@_examples(1.0)
@given(b=st.integers(1, 2), sq=seqlens, sk=seqlens, d=st.sampled_from(fv.SUPPORTED_HEAD_DIMS),
       dtype=st.sampled_from(fv.SUPPORTED_DTYPES), causal=st.booleans(), g=groups,
       seed=st.integers(0, 2 ** 16))
@example(b=1, sq=2 * TILE + 1, sk=TILE + 1, d=32, dtype=torch.float32, causal=True, g=None,
         seed=0)                     # the first tile and a half see no key; three Q tiles
def test_shapes(b, sq, sk, d, dtype, causal, g, seed):
    _check(*_qkv(b, sq, sk, 1, d, dtype, seed), causal, g=g)


@_examples(1 / 6)    # TILE launches per example
@given(sq=st.integers(2, 2 * TILE + 1), g=groups, dtype=st.sampled_from(fv.SUPPORTED_DTYPES),
       seed=st.integers(0, 2 ** 16))
def test_every_diagonal_residue(sq, g, dtype, seed):
    """Causal, seqlen_k = seqlen_q + r - TILE/2 (+TILE where < 1) for every residue r."""
    q, k, v = _qkv(1, sq, sq + TILE, 1, 32, dtype, seed)
    for r in range(TILE):
        sk = sq + r - TILE // 2
        sk = sk if sk >= 1 else sk + TILE
        _check(q, k[:, :sk], v[:, :sk], True, g=g)


@_examples(0.5)
@given(sq=st.integers(1, TILE + 1), tiles=st.integers(2, 3), extra=st.integers(0, TILE - 1),
       dtype=st.sampled_from(fv.SUPPORTED_DTYPES), causal=st.booleans(),
       order=st.sampled_from(["ascending", "descending", "random"]),
       sign=st.sampled_from([1, -1]), log2_scale=st.integers(0, 1),
       seed=st.integers(0, 2 ** 16))
@example(sq=1, tiles=3, extra=0, dtype=torch.float32, causal=False, order="ascending",
         sign=1, log2_scale=1, seed=0)
def test_large_scores_match_float64(sq, tiles, extra, dtype, causal, order, sign,
                                    log2_scale, seed):
    """Scores: +-128 x scale (two channels of +-8 and 8 in q and k) plus small integers
    (-1, 0, 1 in the other 30): exact in float16 and float32, |score| > 88."""
    gen = torch.Generator().manual_seed(seed)
    sk, d = tiles * TILE + extra, 32
    q = torch.randint(-1, 2, (1, sq, 1, d), generator=gen).float()
    k = torch.randint(-1, 2, (1, sk, 1, d), generator=gen).float()
    q[..., :2] = 8.0 * sign
    k[..., :2] = 8.0
    if order != "random":   # the first query's running max grows at every K/V tile, or not
        s0 = (k[0, :, 0] * q[0, 0, 0]).sum(-1)
        k = k[:, torch.argsort(s0, descending=order == "descending", stable=True)]
    scale = 2.0 ** log2_scale
    assert (q[0, :, 0] @ k[0, :, 0].T * scale).abs().min() > 88
    v = torch.randn(1, sk, 1, d, generator=gen)
    _check(q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype), causal, scale=scale)
