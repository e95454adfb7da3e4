"""Property tests of lesson 08: shapes drawn by hypothesis, and the numerics that bite.

Every test runs the forward *and* the backward pass and applies the lesson's rule
(test_flash_v2.py: error at most 2x PyTorch's in the input dtype plus the dtype's
rounding step; lse within 2e-3), against common.reference computed in float64.

* Shapes: seqlens on both sides of every tile edge the kernels use (BLOCK_M and BLOCK_N
  of the forward, dK/dV and dQ kernels: ``_INTERPRETER_TILES`` under the interpreter,
  the default tuned tile on a GPU), GQA groups, head dims that pad, both dtypes, causal
  and sliding windows, ragged varlen batches with empty sequences.
* Block bounds: one varlen call holds a sequence for *every* residue of
  seqlen_k - seqlen_q modulo the largest tile, so each causal/window diagonal position
  inside a block is met, forward and backward (``_query_block_bounds`` and
  ``_key_block_bounds``; an off-by-one in either fails here, e.g. at (64, 65)).
* Numerics: integer-valued q and k and a power-of-two scale make every score exact and
  larger than 88 in magnitude (exp overflows float32 without the max shift, or every
  term underflows; the backward's exp2(s - lse) likewise), with keys ordered so that the
  running max grows at every key block, or is found in the first, or neither (the
  rescale of the accumulator shows).

The cpu profile (conftest.py) draws a few derandomized examples; the failing examples
hypothesis found are kept as @example cases.
"""

import math

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common import runtime
from common.checks import assert_close, assert_error_within
from common.reference import attention_ref, attention_varlen_ref

import flash_attn as fa
from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
from test_flash_v2 import _poisoned_outputs_and_default_tiles, _rand, _slack  # noqa: F401

DEV = runtime.torch_device()


def _tile_sizes():
    """Every BLOCK_M and BLOCK_N the three kernels use in this mode (head dims <= 64)."""
    if runtime.is_emulated():
        tiles = fa._INTERPRETER_TILES.values()
    else:
        tiles = [fa.TILES[kind][64][0] for kind in ("fwd", "dkdv", "dq")]
    return sorted({t[0] for t in tiles} | {t[1] for t in tiles})


BLOCKS = _tile_sizes()               # interpreter: [32, 64]
PERIOD = max(BLOCKS)                 # every residue modulo each block size, at once
EDGES = sorted({1} | {n + e for b in BLOCKS for n in (b, 2 * b) for e in (-1, 0, 1)})

# The autouse fixture of test_flash_v2 patches module attributes, the same for every
# example: hypothesis may share it between examples.
SETTINGS = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                           HealthCheck.function_scoped_fixture])


def _examples(fraction):
    """A fraction of the profile's examples (the costly tests draw fewer)."""
    return settings(SETTINGS, max_examples=max(1, round(settings.default.max_examples
                                                        * fraction)))


seqlens = st.one_of(st.sampled_from(EDGES), st.integers(1, 2 * PERIOD + 2))
dtypes = st.sampled_from(fa.SUPPORTED_DTYPES)
windows = st.tuples(st.integers(-1, PERIOD + 2), st.integers(-1, PERIOD + 2))


def _check(ours, ref, q, k, v, dout):
    """test_flash_v2's rule, with a float64 reference. ours/ref: (q, k, v) -> (out, lse)."""
    dtype = q.dtype
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = ours(qs, ks, vs)
    out.backward(dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = ref(q64, k64, v64, torch.float64)
    out_ref.backward(dout.double())
    qb, kb, vb = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out_pt, _ = ref(qb, kb, vb, dtype)
    out_pt.backward(dout)
    assert out.dtype == dtype and out.shape == q.shape
    assert_error_within(out, out_pt, out_ref, slack=_slack(out_ref.float(), dtype), name="out")
    assert_close(lse, lse_ref, atol=2e-3, rtol=1e-3, name="lse")
    for name, g, g_pt, g_ref in zip(("dq", "dk", "dv"), (qs.grad, ks.grad, vs.grad),
                                    (qb.grad, kb.grad, vb.grad), (q64.grad, k64.grad, v64.grad)):
        assert g.dtype == dtype and g.shape == g_ref.shape, name
        assert_error_within(g, g_pt, g_ref, slack=_slack(g_ref.float(), dtype), name=name)


def _batched(q, k, v, dout, causal, window=(-1, -1), scale=None):
    def ours(q_, k_, v_):
        return flash_attn_func(q_, k_, v_, softmax_scale=scale, causal=causal,
                               window_size=window, return_attn_probs=True)[:2]

    def ref(q_, k_, v_, cdt):
        return attention_ref(q_, k_, v_, scale, causal, cdt, window_size=window)

    _check(ours, ref, q, k, v, dout)


def _varlen(lens_q, lens_k, hq, hk, d, causal, window, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(),  # noqa: E731
                                   dtype=torch.int32, device=DEV)
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    max_q, max_k = max(lens_q), max(lens_k)
    q = _rand((sum(lens_q), hq, d), dtype, gen)
    k = _rand((sum(lens_k), hk, d), dtype, gen)
    v = _rand((sum(lens_k), hk, d), dtype, gen)
    dout = _rand(q.shape, dtype, gen)

    def ours(q_, k_, v_):
        return flash_attn_varlen_func(q_, k_, v_, cu_q, cu_k, max_q, max_k, causal=causal,
                                      window_size=window, return_attn_probs=True)[:2]

    def ref(q_, k_, v_, cdt):
        return attention_varlen_ref(q_, k_, v_, cu_q, cu_k, None, causal, cdt,
                                    window_size=window, max_seqlen_q=max_q,
                                    max_seqlen_k=max_k)

    _check(ours, ref, q, k, v, dout)


# --------------------------------------------------------------------------------------
# Shapes

@_examples(1.0)
@given(b=st.integers(1, 2), sq=seqlens, sk=seqlens, hk=st.integers(1, 2),
       group=st.sampled_from([1, 2, 3]), d=st.sampled_from([16, 32, 40, 64]), dtype=dtypes,
       causal=st.booleans(), window=st.one_of(st.just((-1, -1)), windows),
       seed=st.integers(0, 2 ** 16))
@example(b=1, sq=64, sk=65, hk=1, group=1, d=32, dtype=torch.bfloat16, causal=True,
         window=(-1, -1), seed=0)                    # the last row's one extra key
@example(b=1, sq=64, sk=94, hk=1, group=1, d=32, dtype=torch.float16, causal=True,
         window=(-1, -1), seed=0)                    # diagonal at a block's last key - 1
def test_batched_shapes(b, sq, sk, hk, group, d, dtype, causal, window, seed):
    gen = torch.Generator().manual_seed(seed)
    hq = hk * group
    q, k, v = (_rand((b, s, h, d), dtype, gen) for s, h in ((sq, hq), (sk, hk), (sk, hk)))
    _batched(q, k, v, _rand(q.shape, dtype, gen), causal, window)


@_examples(0.5)
@given(lens=st.lists(st.tuples(st.integers(0, PERIOD + 3), st.integers(0, PERIOD + 3)),
                     min_size=1, max_size=5).filter(lambda ls: max(a for a, _ in ls) > 0
                                                    and max(b for _, b in ls) > 0),
       hk=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), dtype=dtypes,
       causal=st.booleans(), window=st.one_of(st.just((-1, -1)), windows),
       seed=st.integers(0, 2 ** 16))
def test_varlen_ragged_batches(lens, hk, group, dtype, causal, window, seed):
    """Packed batches with empty sequences (no queries, or no keys), GQA, masks."""
    lens_q, lens_k = [a for a, _ in lens], [b for _, b in lens]
    _varlen(lens_q, lens_k, hk * group, hk, 32, causal, window, dtype, seed)


@_examples(1 / 6)   # each run is PERIOD sequences, forward and backward: ~10 s on a CPU
@given(sq=st.integers(2, PERIOD // 2 + 2), mode=st.sampled_from(["causal", "window"]),
       window=windows, dtype=dtypes, seed=st.integers(0, 2 ** 16))
@example(sq=PERIOD + 1, mode="causal", window=(-1, -1), dtype=torch.bfloat16, seed=0)
@example(sq=BLOCKS[0] + 1, mode="window", window=(5, 3), dtype=torch.float16, seed=1)
def test_every_diagonal_residue(sq, mode, window, dtype, seed):
    """seqlen_k - seqlen_q on every residue modulo each block size, in one varlen call:
    sequence i has seqlen_k = seqlen_q + i - PERIOD/2 (+PERIOD when that is < 0), so the
    causal diagonal and the window's edges cross each key and query block at every offset.
    The causal example has a full query block of every kernel (seqlen_q = PERIOD + 1): only
    there is a block's last key bound start_m + BLOCK_M + diag below seqlen_k, so only
    there does an off-by-one in it drop a key (with a partial block, seqlen_k bounds it).
    """
    diags = [i - PERIOD // 2 for i in range(PERIOD)]
    lens_k = [sq + dg if sq + dg >= 0 else sq + dg + PERIOD for dg in diags]
    causal = mode == "causal"
    _varlen([sq] * PERIOD, lens_k, 1, 1, 16, causal, (-1, -1) if causal else window,
            dtype, seed)


# --------------------------------------------------------------------------------------
# Numerics: scores > 88 (exp overflows float32 without the max shift), exact in every
# precision, with the running max growing, shrinking or jumping around across key blocks.

@_examples(0.5)
@given(sq=st.integers(1, 4), sk=st.integers(BLOCKS[0] + 1, 2 * PERIOD), hk=st.integers(1, 2),
       group=st.sampled_from([1, 2]), dtype=dtypes, causal=st.booleans(),
       order=st.sampled_from(["ascending", "descending", "random"]),
       sign=st.sampled_from([1, -1]), log2_scale=st.integers(0, 1),
       seed=st.integers(0, 2 ** 16))
@example(sq=1, sk=65, hk=1, group=1, dtype=torch.float16, causal=False, order="ascending",
         sign=1, log2_scale=1, seed=0)
def test_large_scores_match_float64(sq, sk, hk, group, dtype, causal, order, sign,
                                    log2_scale, seed):
    """Every score is an integer of magnitude > 88 (exact in fp16, bf16 and the fp32 dots):
    q and k share a constant part (two channels of +-8 and 8, +-128 x scale), which the
    softmax ignores, plus small integers (-1, 0, 1) that make a softmax far from one-hot.
    Without the max shift exp overflows (or, negative, every term underflows: 0/0)."""
    gen = torch.Generator().manual_seed(seed)
    hq, d = hk * group, 32
    q = torch.randint(-1, 2, (1, sq, hq, d), generator=gen).float()
    k = torch.randint(-1, 2, (1, sk, hk, d), generator=gen).float()
    q[..., :2] = 8.0 * sign
    k[..., :2] = 8.0
    # order the keys by the first query's scores: that row's running max grows at every
    # key block (ascending), or is found in the first block (descending)
    if order != "random":
        s0 = (k[0, :, 0] * q[0, 0, 0]).sum(-1)
        k = k[:, torch.argsort(s0, descending=order == "descending", stable=True)]
    scale = 2.0 ** log2_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(group, 2)) * scale
    assert scores.abs().min() > 88, "every score must overflow exp without the max shift"
    q, k = q.to(DEV, dtype), k.to(DEV, dtype)
    v = _rand((1, sk, hk, d), dtype, gen)
    _batched(q, k, v, _rand(q.shape, dtype, gen), causal, scale=scale)
