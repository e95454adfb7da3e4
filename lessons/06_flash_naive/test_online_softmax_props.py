"""Property tests of lesson 06: the online softmax (NumPy) and standard attention (Numba),
with inputs drawn by hypothesis.

The rules are the lesson's: the NumPy softmaxes against torch.softmax in float64 (the
tolerance of the input's dtype), the float64 loops against attention_ref in float64 to
1e-12 / 1e-10 (so a float32 accumulation anywhere would show), the three kernels of
standard_attention against attention_ref (now in float64) with the output dtype's
tolerance and NaN-poisoned outputs. The kernels take one head count for q, k and v
(no GQA) and float32/float16.

* Softmax of one vector: lengths around every block size of softmax_online_blocks,
  offsets up to +-2000 (exp overflows float32 past 88 and float64 past 709 without the
  max shift; the naive softmax's NaN is asserted where it must appear).
* The loops (row-wise, FlashAttention v1 and v2 orders): any tile sizes, causal with
  seqlen_q on both sides of seqlen_k, and integer scores of magnitude > 709 (float64's
  exp overflows without the shift) ordered so that the running max grows at every block.
* standard_attention: seqlens around its 16-wide tiles (simulator) and the softmax's
  32 threads, causal on every residue of seqlen_k - seqlen_q modulo the tile, both
  dtypes, every head dim, and exact integer scores > 88 in magnitude.

Every CUDA thread is a Python thread under the simulator: few, small examples there
(the cpu profile in conftest.py); the NumPy properties draw more.
"""

import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from common import runtime
from common.checks import assert_close, poisoned
from common.reference import attention_ref

import online_softmax as osm
import standard_attention as sa

DEV = runtime.torch_device()
TILE = sa.TILE                        # simulator: 16 (GPU: 64)
EDGES = sorted({1} | {n + e for n in (TILE, 2 * TILE, sa.SOFTMAX_THREADS) for e in (-1, 0, 1)})


def _examples(fraction):
    return settings(max_examples=max(1, round(settings.default.max_examples * fraction)))


# ----------------------------------------------------------------------------------------
# NumPy: the softmax of one vector, and the attention loops

@_examples(4.0)
@given(n=st.integers(1, 70), block=st.integers(1, 33), offset=st.floats(-2000, 2000),
       spread=st.sampled_from([0.0, 1.0, 10.0, 50.0]),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2 ** 16))
@example(n=17, block=16, offset=1000.0, spread=10.0, dtype=np.float32, seed=0)
@example(n=33, block=8, offset=-1000.0, spread=1.0, dtype=np.float64, seed=1)
def test_softmaxes_match_float64(n, block, offset, spread, dtype, seed):
    x = (np.random.default_rng(seed).standard_normal(n) * spread + offset).astype(dtype)
    ref = torch.softmax(torch.from_numpy(x.astype(np.float64)), 0)
    for name, fn in (("safe", osm.softmax_safe), ("online", osm.softmax_online),
                     ("blocks", lambda x: osm.softmax_online_blocks(x, block))):
        assert_close(fn(x), ref, dtype=torch.float32 if dtype == np.float32 else
                     torch.float64, name=name)
    if x.max() > (88.8 if dtype == np.float32 else 709.8):   # exp(x) = inf: inf / inf
        with np.errstate(over="ignore", invalid="ignore"):
            assert np.isnan(osm.softmax_naive(x)).any()


def _exact_qkv(b, sq, sk, h, d, sign, gen, ramp=None):
    """Integer q, k whose scores share a constant part (two channels of sign*16 and 16:
    +-512 per unit scale) plus small integers; v unit normal. float64."""
    q = torch.randint(-1, 2, (b, sq, h, d), generator=gen).double()
    k = torch.randint(-1, 2, (b, sk, h, d), generator=gen).double()
    q[..., :2] = 16.0 * sign
    k[..., :2] = 16.0
    if ramp is not None:    # the first query's scores ascending/descending along the keys
        s0 = (k[0, :, 0] * q[0, 0, 0]).sum(-1)
        k = k[:, torch.argsort(s0, descending=ramp == "descending", stable=True)]
    return q, k, torch.randn(b, sk, h, d, generator=gen, dtype=torch.float64)


@_examples(2.0)
@given(b=st.integers(1, 2), h=st.integers(1, 2), sq=st.integers(1, 40), sk=st.integers(1, 40),
       d=st.integers(1, 16), causal=st.booleans(), block_m=st.integers(1, 20),
       block_n=st.integers(1, 20), large=st.sampled_from([None, "ascending", "descending"]),
       sign=st.sampled_from([1, -1]), seed=st.integers(0, 2 ** 16))
@example(b=1, h=1, sq=1, sk=40, d=8, causal=False, block_m=16, block_n=7, large="ascending",
         sign=1, seed=0)
def test_attention_loops_match_float64(b, h, sq, sk, d, causal, block_m, block_n, large,
                                       sign, seed):
    """large: scores of magnitude 1024 +- a few (scale 2, d >= 2), so float64's exp
    overflows without the max shift; with the keys ordered so that the first query's
    running max grows at every block (or is found first)."""
    gen = torch.Generator().manual_seed(seed)
    if large is not None:
        d = max(d, 2)
        q, k, v = _exact_qkv(b, sq, sk, h, d, sign, gen, large)
        scale = 2.0
    else:
        q, k, v = (torch.randn(b, s, h, d, generator=gen, dtype=torch.float64)
                   for s in (sq, sk, sk))
        scale = 0.37
    ref_o, ref_lse = attention_ref(q, k, v, softmax_scale=scale, causal=causal,
                                   compute_dtype=torch.float64)
    for name, one_head, kw in (("rowwise", osm.attention_rowwise, {}),
                               ("v1", osm.flash_attention_v1_loops,
                                dict(block_m=block_m, block_n=block_n)),
                               ("v2", osm.flash_attention_v2_loops,
                                dict(block_m=block_m, block_n=block_n))):
        o, lse = osm.per_head(one_head, q.numpy(), k.numpy(), v.numpy(), scale, causal, **kw)
        assert_close(o, ref_o, atol=1e-12, rtol=1e-10, name=f"{name} out")
        assert_close(lse, ref_lse, atol=1e-12, rtol=1e-10, name=f"{name} lse")


# ----------------------------------------------------------------------------------------
# standard_attention: the three Numba kernels

def _check(q, k, v, causal, scale=None):
    out = poisoned(q.shape, q.dtype, DEV)
    o, lse = sa.standard_attention(q, k, v, softmax_scale=scale, causal=causal, out=out)
    ref_o, ref_lse = attention_ref(q, k, v, softmax_scale=scale, causal=causal,
                                   compute_dtype=torch.float64)
    assert o is out
    assert_close(o, ref_o.to(q.dtype), dtype=q.dtype, name="out")
    assert_close(lse, ref_lse, dtype=torch.float32, name="lse")


def _qkv(b, sq, sk, h, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=gen).to(DEV, dtype) for s in (sq, sk, sk))


seqlens = st.one_of(st.sampled_from(EDGES), st.integers(1, 2 * TILE + 2))


@_examples(0.5)
@given(b=st.integers(1, 2), sq=seqlens, sk=seqlens, d=st.sampled_from(sa.SUPPORTED_HEAD_DIMS),
       dtype=st.sampled_from(sa.SUPPORTED_DTYPES), causal=st.booleans(),
       seed=st.integers(0, 2 ** 16))
@example(b=1, sq=TILE + 1, sk=2 * TILE + 1, d=32, dtype=torch.float16, causal=True, seed=0)
def test_standard_attention_shapes(b, sq, sk, d, dtype, causal, seed):
    _check(*_qkv(b, sq, sk, 1, d, dtype, seed), causal)


@_examples(1 / 6)    # TILE launches per example
@given(sq=st.integers(2, TILE + 2), dtype=st.sampled_from(sa.SUPPORTED_DTYPES),
       seed=st.integers(0, 2 ** 16))
def test_standard_attention_every_diagonal_residue(sq, dtype, seed):
    """Causal, seqlen_k = seqlen_q + r - TILE/2 (+TILE where < 1), every residue r."""
    q, k, v = _qkv(1, sq, sq + TILE, 1, 32, dtype, seed)
    for r in range(TILE):
        sk = sq + r - TILE // 2
        sk = sk if sk >= 1 else sk + TILE
        _check(q, k[:, :sk].contiguous(), v[:, :sk].contiguous(), True)


@_examples(0.5)
@given(sq=st.integers(1, TILE + 1), sk=st.integers(TILE + 1, sa.SOFTMAX_THREADS + 2),
       dtype=st.sampled_from(sa.SUPPORTED_DTYPES), causal=st.booleans(),
       order=st.sampled_from(["ascending", "descending", "random"]),
       sign=st.sampled_from([1, -1]), seed=st.integers(0, 2 ** 16))
@example(sq=1, sk=TILE + 1, dtype=torch.float32, causal=False, order="ascending", sign=1,
         seed=0)
def test_standard_attention_large_scores_match_float64(sq, sk, dtype, causal, order, sign,
                                                       seed):
    """Exact integer scores of magnitude 512 +- a few at scale 1 (> 88: exp overflows
    float32 without the max shift, or every term underflows: 0/0)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _exact_qkv(1, sq, sk, 1, 32, sign, gen, None if order == "random" else order)
    assert (q[0, :, 0] @ k[0, :, 0].T).abs().min() > 88
    _check(q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype), causal, scale=1.0)


def test_profile_is_bounded():
    """The examples drawn under emulation stay few (conftest.py's cpu profile)."""
    assert runtime.is_gpu() or settings.default.max_examples <= 10
    assert settings.default.derandomize and settings.default.deadline is None
