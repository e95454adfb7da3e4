"""Property tests of lesson 09: paged MLA decoding with shapes drawn by hypothesis.

The problems are test_flash_mla's adversarial ones (pages in random order, NaN in every
cache row no sequence owns, garbage in unused table slots, NaN-filled and guarded output
buffers) and the rule is its rule (out: at most 2x the error of PyTorch in the input
dtype plus half an ulp; lse within 1e-3 + 1e-4 relative), here against the float64
reference (common.reference.paged_mla_decode_ref).

* Shapes: batches whose sequences have zero, one or many pages, lengths on page
  boundaries (PAGE_SIZE = 64) and one either side, s_q 1..4 with and without causal
  (rows with no visible key included), h_q/h_k combinations whose folded rows
  (s_q x h_q / h_k) fall on both sides of the 16/32/64-row tiles (BLOCK_M), both dtypes,
  both plans, and plans forced to split sequences many times (the combine kernel).
* Numerics: softmax_scale up to 8 on unit-normal inputs, so that scores reach the
  hundreds (exp overflows float32 without the max shift: the decode kernel's, and the
  combine's over the splits' lse), with pages scaled by powers of two in ascending,
  descending or random order, so the splits of one sequence have lse's hundreds apart
  and the order in which the running max and the combine meet them shows.

The cpu profile (conftest.py) draws a few derandomized examples; the failing examples
hypothesis found are kept as @example cases.
"""

import math

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common import runtime
from common.checks import assert_close, assert_error_within
from common.reference import paged_mla_decode_ref

import flash_mla
from flash_mla import HEAD_DIM_V, PAGE_SIZE, flash_mla_with_kvcache, get_mla_metadata, \
    plan_mla_splits
from test_flash_mla import SLACK, make_problem, nan_outputs  # noqa: F401

BLOCK_MS = sorted({flash_mla.default_config(r).block_m for r in (1, 17, 33)})   # 16, 32, 64
# the NaN-output fixture patches a module attribute, the same for every example, and
# checks the guards of every buffer made during the test at its end
SETTINGS = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                           HealthCheck.function_scoped_fixture])


def _examples(fraction):
    return settings(SETTINGS, max_examples=max(1, round(settings.default.max_examples
                                                        * fraction)))


boundary_len = st.sampled_from([0, 1, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1,
                                2 * PAGE_SIZE - 1, 2 * PAGE_SIZE, 2 * PAGE_SIZE + 1,
                                3 * PAGE_SIZE - 1, 3 * PAGE_SIZE + 1])
lengths = st.lists(st.one_of(boundary_len, st.integers(0, 3 * PAGE_SIZE + 2)),
                   min_size=1, max_size=4)
dtypes = st.sampled_from([torch.bfloat16, torch.float16])
# (h_q, h_k): folded rows of s_q x h_q / h_k from 1 to 4 x 20 = 80, across every BLOCK_M
heads = st.sampled_from([(1, 1), (3, 1), (8, 1), (16, 1), (17, 1), (20, 1), (8, 2),
                         (32, 2), (6, 3)])
plans = st.one_of(st.just(None), st.tuples(st.sampled_from(flash_mla.PLANS),
                                           st.integers(1, 12)))


def _slack(ref, dtype):
    """The final rounding to dtype: half an ulp at the output's largest magnitude
    (test_flash_mla's SLACK is that for outputs below 1.0). Under the interpreter a whole
    ulp: its fp32 -> bf16 cast truncates (rounds toward zero; torch rounds to nearest), so
    a one-hot softmax, whose exact output PyTorch reproduces in bf16 (no baseline error),
    may come out one ulp off. Hypothesis found that with scores in the hundreds."""
    top = max(ref.abs().max().item(), 0.5)
    ulp = 2.0 ** math.floor(math.log2(top)) * torch.finfo(dtype).eps
    return max(SLACK[dtype], ulp if runtime.is_emulated() else ulp / 2)


def check(q, k_cache, block_table, cache_seqlens, causal, softmax_scale=None, plan=None):
    """flash_mla_with_kvcache against the float64 reference, test_flash_mla's rule.
    plan: None (today's form: the call plans) or (plan, num_sm_parts) (the 2025 form)."""
    dtype = q.dtype
    batch, seqlen_q, heads_q, _ = q.shape
    heads_k = k_cache.shape[2]
    if plan is None:
        meta, num_splits = get_mla_metadata()
    else:
        meta, num_splits = plan_mla_splits(cache_seqlens, seqlen_q * heads_q // heads_k,
                                           heads_k, num_sm_parts=plan[1], plan=plan[0])
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V,
                                      meta, num_splits, softmax_scale=softmax_scale,
                                      causal=causal)
    assert out.shape == (batch, seqlen_q, heads_q, HEAD_DIM_V) and out.dtype == dtype
    assert lse.shape == (batch, heads_q, seqlen_q) and lse.dtype == torch.float32
    ref_out, ref_lse = paged_mla_decode_ref(q, k_cache, block_table, cache_seqlens,
                                            HEAD_DIM_V, softmax_scale, causal, torch.float64)
    base_out, _ = paged_mla_decode_ref(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V,
                                       softmax_scale, causal, compute_dtype=dtype)
    assert not torch.isnan(out).any(), "NaN in out: a row never written, or garbage read"
    assert_error_within(out, base_out.to(dtype), ref_out, factor=2, slack=_slack(ref_out, dtype))
    assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4, name="lse")
    return out, lse, num_splits


@_examples(2.0)
@given(lens=lengths, seqlen_q=st.integers(1, 4), hq_hk=heads, causal=st.booleans(),
       dtype=dtypes, plan=plans, seed=st.integers(0, 2 ** 16))
@example(lens=[0, 1, PAGE_SIZE, PAGE_SIZE + 1], seqlen_q=4, hq_hk=(17, 1), causal=True,
         dtype=torch.bfloat16, plan=("equal", 12), seed=0)     # 68 rows: two 64-row blocks
def test_paged_shapes(lens, seqlen_q, hq_hk, causal, dtype, plan, seed):
    heads_q, heads_k = hq_hk
    problem = make_problem(lens, seqlen_q, heads_q, heads_k, dtype, seed)
    _, lse, _ = check(*problem, causal, plan=plan)
    if causal and seqlen_q > 1 and min(lens) < seqlen_q:
        assert torch.isposinf(lse).any(), "expected rows with no visible key"


@_examples(1.0)
@given(lens=st.lists(st.integers(2 * PAGE_SIZE + 1, 5 * PAGE_SIZE), min_size=1, max_size=2),
       seqlen_q=st.integers(1, 3), causal=st.booleans(), dtype=dtypes,
       log2_scale=st.integers(1, 3), order=st.sampled_from(["ascending", "descending",
                                                             "random"]),
       parts=st.integers(8, 16), seed=st.integers(0, 2 ** 16))
@example(lens=[300], seqlen_q=1, causal=False, dtype=torch.bfloat16, log2_scale=2,
         order="ascending", parts=16, seed=0)
# found by hypothesis: softmax_scale 4 (NaN without a max shift) and a one-hot softmax,
# where the interpreter's truncating bf16 cast is one ulp off (see _slack)
def test_large_scores_and_many_splits_match_float64(lens, seqlen_q, causal, dtype,
                                                     log2_scale, order, parts, seed):
    """Scores in the hundreds (softmax_scale 2**log2_scale on unit-normal q and cache: the
    scores' spread is ~24 x scale), each page of the cache scaled by a power of two
    (1/4 .. 2; V, the first 512 channels, with it), so the splits' lse's lie far apart;
    every sequence is split many times and merged by the combine kernel."""
    q, k_cache, block_table, cache_seqlens = make_problem(lens, seqlen_q, 16, 1, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    num_pages = k_cache.shape[0]
    factors = 2.0 ** torch.randint(-2, 2, (num_pages,), generator=gen).float()
    if order != "random":    # by position in each sequence: the max grows (or not) per split
        factors = torch.ones(num_pages)
        for b, n in enumerate(lens):
            pages = (n + PAGE_SIZE - 1) // PAGE_SIZE
            ramp = 2.0 ** torch.linspace(-2, 1, pages).round()
            if order == "descending":
                ramp = ramp.flip(0)
            factors[block_table[b, :pages].long().cpu()] = ramp
    k_cache = (k_cache.float() * factors.to(k_cache.device)[:, None, None, None]).to(dtype)
    scale = 2.0 ** log2_scale
    s = torch.einsum("bqhd,pthd->bqpt", q.float(), k_cache.float().nan_to_num()) * scale
    assert s.abs().max() > 88, "the case must overflow exp without the max shift"
    _, lse, num_splits = check(q, k_cache, block_table, cache_seqlens, causal,
                               softmax_scale=scale, plan=("equal", parts))
    assert (num_splits[1:] - num_splits[:-1]).min() >= 2, "every sequence must be split"
