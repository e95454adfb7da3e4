"""FlashAttention-2 (lesson 08): forward and backward against the float32 reference.

The rule is flash-attn's: the kernel's max error against the float32 reference may be at
most twice the error of PyTorch doing the same computation in the input dtype, plus the
rounding granularity of that dtype (slack). Every buffer the kernels write starts as NaN.
Under the interpreter (CPU) the sizes are small and the dots run in float32; the GPU tests
(`gpu` marker) use real sizes, every head dim, GQA, varlen and every tuned tile.
"""

import math

import pytest
import torch

from common import runtime
from common.checks import assert_close, assert_error_within, poison
from common.reference import attention_ref, attention_varlen_ref

import flash_ablation
import flash_attn as fa
from flash_attn_interface import flash_attn_func, flash_attn_varlen_func

DEV = runtime.torch_device()
GPU = runtime.is_gpu()


@pytest.fixture(autouse=True)
def _poisoned_outputs_and_default_tiles(monkeypatch):
    """NaN-filled outputs; one tile per kernel (the tile tests below cover the others)."""
    monkeypatch.setattr(fa, "_empty", lambda *a, **k: poison(torch.empty(*a, **k)))
    monkeypatch.setattr(fa, "AUTOTUNE", False)


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(DEV, dtype)


def _slack(ref, dtype):
    """flash-attn's atol: twice the rounding step of `dtype` at the reference's scale."""
    return 2 * ((ref.to(dtype) + 0.3 - 0.3).float() - ref).abs().max().item() + 1e-6


def _run_and_check(fn, ref_fn, q, k, v, dout, causal, lse_index=None):
    """Run fn (ours) and ref_fn (reference) forward+backward; apply flash-attn's rule."""
    dtype = q.dtype
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(qs, ks, vs, causal)
    out.backward(dout)
    grads = (qs.grad, ks.grad, vs.grad)

    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = ref_fn(qf, kf, vf, causal, torch.float32)
    out_ref.backward(dout.float())
    qb, kb, vb = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out_pt, _ = ref_fn(qb, kb, vb, causal, dtype)
    out_pt.backward(dout)

    assert out.dtype == dtype and out.shape == q.shape
    assert_error_within(out, out_pt, out_ref, slack=_slack(out_ref, dtype), name="out")
    assert_close(lse, lse_ref, atol=2e-3, rtol=1e-3, name="lse")
    for name, g, g_pt, g_ref in zip(("dq", "dk", "dv"), grads, (qb.grad, kb.grad, vb.grad),
                                    (qf.grad, kf.grad, vf.grad)):
        assert g.dtype == dtype and g.shape == g_ref.shape, name
        assert_error_within(g, g_pt, g_ref, slack=_slack(g_ref, dtype), name=name)


def check_batched(b, sq, sk, hq, hk, d, causal, dtype, seed=0, scale=None, layout=None):
    gen = torch.Generator().manual_seed(seed)
    if layout == "qkv_packed":  # q, k, v are strided views into one (b, s, 3, h, d) tensor
        qkv = _rand((b, sq, 3, hq, d), dtype, gen)
        q, k, v = qkv.unbind(2)
        assert not q.is_contiguous()
    else:
        q = _rand((b, sq, hq, d), dtype, gen)
        k = _rand((b, sk, hk, d), dtype, gen)
        v = _rand((b, sk, hk, d), dtype, gen)
    dout = _rand(q.shape, dtype, gen)

    def ours(q_, k_, v_, c):
        return flash_attn_func(q_, k_, v_, softmax_scale=scale, causal=c,
                               return_attn_probs=True)[:2]

    def ref(q_, k_, v_, c, cdt):
        return attention_ref(q_, k_, v_, softmax_scale=scale, causal=c, compute_dtype=cdt)

    _run_and_check(ours, ref, q, k, v, dout, causal)


def check_varlen(lens_q, lens_k, hq, hk, d, causal, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEV)
    q = _rand((sum(lens_q), hq, d), dtype, gen)
    k = _rand((sum(lens_k), hk, d), dtype, gen)
    v = _rand((sum(lens_k), hk, d), dtype, gen)
    dout = _rand(q.shape, dtype, gen)

    def ours(q_, k_, v_, c):
        return flash_attn_varlen_func(q_, k_, v_, cu_q, cu_k, max(lens_q), max(lens_k),
                                      causal=c, return_attn_probs=True)[:2]

    def ref(q_, k_, v_, c, cdt):
        return attention_varlen_ref(q_, k_, v_, cu_q, cu_k, causal=c, compute_dtype=cdt)

    _run_and_check(ours, ref, q, k, v, dout, causal)


# --------------------------------------------------------------------------------------
# Small cases: these run everywhere (the interpreter on CPU, the GPU in GPU mode)

@pytest.mark.parametrize("b,sq,sk,hq,hk,d,causal,dtype", [
    (1, 17, 17, 2, 2, 32, False, torch.bfloat16),
    (1, 113, 113, 4, 2, 64, True, torch.bfloat16),     # GQA 2, ragged blocks, diagonal
    (2, 1, 17, 2, 1, 32, True, torch.float16),         # one query row, MQA
    (1, 113, 17, 2, 2, 32, True, torch.bfloat16),      # seqlen_q > seqlen_k: empty rows
    (1, 17, 113, 3, 1, 32, True, torch.float16),       # seqlen_q < seqlen_k, bottom-right
    (1, 113, 40, 2, 2, 96, False, torch.bfloat16),     # headdim 96 padded to 128
    (1, 40, 17, 1, 1, 128, True, torch.float16),
    (1, 17, 33, 1, 1, 256, False, torch.bfloat16),
    (1, 1, 1, 1, 1, 64, True, torch.bfloat16),
])
def test_forward_backward_small(b, sq, sk, hq, hk, d, causal, dtype):
    check_batched(b, sq, sk, hq, hk, d, causal, dtype, seed=sq * 7 + sk)


def test_custom_softmax_scale_and_packed_qkv_views():
    check_batched(1, 33, 33, 2, 2, 32, True, torch.bfloat16, scale=0.3, layout="qkv_packed")


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_with_empty_and_one_token_sequences(causal):
    check_varlen([3, 0, 1, 40, 17], [5, 4, 0, 40, 30], 4, 2, 32, causal, torch.bfloat16)


@pytest.mark.parametrize("causal", [False, True])
def test_tensor_descriptor_path(monkeypatch, causal):
    """The TMA path (tensor descriptors) - the GPU default on Hopper - in the interpreter too."""
    monkeypatch.setattr(fa, "_tma_ok", lambda *t: True)
    check_batched(1, 113, 70, 2, 1, 96, causal, torch.bfloat16, seed=3)
    check_varlen([9, 0, 50], [20, 3, 50], 2, 2, 64, causal, torch.float16, seed=4)


def test_lse_is_natural_log_and_not_differentiable():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (_rand((1, 5, 1, 32), torch.bfloat16, gen) for _ in range(3))
    q.requires_grad_()
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True)
    assert probs is None  # flash-attn returns probabilities only with dropout
    s = torch.einsum("bqhd,bkhd->bhqk", q.detach().float(), k.float()) * 32 ** -0.5
    assert_close(lse, torch.logsumexp(s, -1), atol=1e-3, rtol=1e-3)
    assert out.requires_grad and not lse.requires_grad
    assert flash_attn_func(q, k, v).shape == q.shape  # return_attn_probs=False: just out


def test_empty_inputs_launch_nothing(monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched for an empty problem")
    monkeypatch.setattr(fa, "_launch", no_launch)
    z = torch.zeros(0, 4, 2, 32, dtype=torch.bfloat16, device=DEV)
    assert flash_attn_func(z, z, z).shape == (0, 4, 2, 32)
    q = torch.randn(2, 0, 2, 32, device=DEV).bfloat16()
    k = torch.randn(2, 5, 2, 32, device=DEV).bfloat16()
    out, lse, _ = flash_attn_func(q, k, k, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 0)
    q = torch.randn(2, 3, 2, 32, device=DEV).bfloat16()
    k = torch.randn(2, 0, 2, 32, device=DEV).bfloat16()
    out, lse, _ = flash_attn_func(q, k, k, return_attn_probs=True)  # no keys: zeros and +inf
    assert (out == 0).all() and torch.isposinf(lse).all()


# --------------------------------------------------------------------------------------
# Bad input: a clear error before any launch

def _bad(monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched for invalid input")
    monkeypatch.setattr(fa, "_launch", no_launch)
    t = lambda *s, dt=torch.bfloat16: torch.randn(*s, device=DEV).to(dt)  # noqa: E731
    return t


def test_bad_batched_inputs_are_rejected(monkeypatch):
    t = _bad(monkeypatch)
    q = t(1, 8, 4, 64)
    cases = [
        ((t(8, 4, 64), q, q), ValueError, "4-D"),
        ((q, t(2, 8, 4, 64), t(2, 8, 4, 64)), ValueError, "batch"),
        ((q, t(1, 8, 4, 32), t(1, 8, 4, 32)), ValueError, "head dims"),
        ((q, t(1, 8, 3, 64), t(1, 8, 3, 64)), ValueError, "multiple"),
        ((q, q, t(1, 9, 4, 64)), ValueError, "seqlens"),
        ((q, q.half(), q), TypeError, "dtype"),
        ((q.float(), q.float(), q.float()), TypeError, "not supported"),
        ((t(1, 8, 4, 257), t(1, 8, 4, 257), t(1, 8, 4, 257)), ValueError, "headdim 257"),
        ((t(1, 8, 4, 0), t(1, 8, 4, 0), t(1, 8, 4, 0)), ValueError, "headdim 0"),
        (([1.0], q, q), TypeError, "torch.Tensor"),
    ]
    for args, err, msg in cases:
        with pytest.raises(err, match=msg):
            flash_attn_func(*args)


def test_bad_varlen_inputs_are_rejected(monkeypatch):
    """Shapes and dtypes: on the host, before any launch. (The *values* of cu_seqlens are
    checked on the device: test_flash_interface.py.)"""
    t = _bad(monkeypatch)
    q, k = t(10, 2, 32), t(12, 2, 32)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEV)
    ok = dict(max_seqlen_q=6, max_seqlen_k=7)
    flash_ablation  # (imported: the module must import cleanly everywhere)
    cases = [
        ((q, k, k, cu_q.long(), cu_k), ok, TypeError, "int32"),
        ((q, k, k, cu_q, torch.tensor([0, 12], dtype=torch.int32, device=DEV)),
         dict(max_seqlen_q=6, max_seqlen_k=12),
         ValueError, "different batch"),
        ((q, k, k, cu_q, cu_k), dict(max_seqlen_q=-1, max_seqlen_k=7), ValueError, "max_seqlen_q"),
        ((q[None], k, k, cu_q, cu_k), ok, ValueError, "3-D"),
        ((q, k, t(11, 2, 32), cu_q, cu_k), ok, ValueError, "token counts"),
    ]
    for args, kw, err, msg in cases:
        with pytest.raises(err, match=msg):
            flash_attn_varlen_func(*args, **kw)


# --------------------------------------------------------------------------------------
# The forward's early-Q K^T stage (the next block's S issued before this block's softmax)

@pytest.mark.parametrize("sq,sk,d,causal", [(70, 70, 32, False), (130, 200, 64, True),
                                            (65, 129, 96, False), (200, 64, 64, True)])
def test_early_qk_stage_matches_reference(monkeypatch, sq, sk, d, causal):
    """Same attention with EARLY_QK on: ragged key counts, padded head dim 96, causal
    with seqlen_q != seqlen_k, and a key block count that leaves the stage empty."""
    monkeypatch.setattr(fa, "EARLY_QK", True)
    check_batched(2, sq, sk, 2, 1, d, causal, torch.bfloat16, seed=sq + d)


# --------------------------------------------------------------------------------------
# The ablation's kernels compute the same attention

@pytest.mark.parametrize("causal", [False, True])
def test_ablation_steps_match_reference(causal):
    gen = torch.Generator().manual_seed(5)
    shape = (1, 70, 2, 32) if not GPU else (2, 1000, 4, 128)
    q, k, v = (_rand(shape, torch.bfloat16, gen) for _ in range(3))
    ref, _ = attention_ref(q, k, v, causal=causal)
    pt, _ = attention_ref(q, k, v, causal=causal, compute_dtype=torch.bfloat16)
    steps = flash_ablation.STEPS if GPU else ("v1", "v2_order", "deferred", "skip", "tma")
    for step in steps:
        tile = (128, 64, 8, 3) if step in ("tuned", "tma", "warp_spec") else None
        out = flash_ablation.attention_step(step, q, k, v, causal, tile=tile)
        assert_error_within(out, pt, ref, slack=_slack(ref, torch.bfloat16), name=step)


# --------------------------------------------------------------------------------------
# Real sizes on the GPU

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("d", fa.SUPPORTED_HEADDIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_every_headdim(d, causal):
    check_batched(2, 1000, 1000, 4, 2, d, causal, torch.bfloat16, seed=d)
    check_batched(1, 113, 1000, 2, 2, d, causal, torch.float16, seed=d + 1)


@gpu
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (113, 113), (1000, 1000), (4096, 4096),
                                   (113, 1000), (1000, 113), (1, 4096), (4096, 17)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_seqlens(sq, sk, d, causal):
    b = 1 if max(sq, sk) >= 4096 else 2
    check_batched(b, sq, sk, 4, 4, d, causal, torch.bfloat16, seed=sq + sk)


@gpu
@pytest.mark.parametrize("hq,hk", [(8, 8), (8, 4), (8, 1), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_gqa_and_dtypes(hq, hk, dtype):
    check_batched(2, 777, 1025, hq, hk, 128, True, dtype, seed=hq * 10 + hk)
    check_batched(2, 513, 300, hq, hk, 64, False, dtype, seed=hq * 10 + hk + 1)


@gpu
@pytest.mark.parametrize("d", [64, 128, 96])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_varlen(d, causal):
    lens_q = [0, 1, 1000, 17, 513, 2048, 1]
    lens_k = [5, 0, 1000, 300, 64, 2048, 1]
    check_varlen(lens_q, lens_k, 8, 2, d, causal, torch.bfloat16, seed=d)


@gpu
def test_gpu_packed_qkv_and_pointer_path(monkeypatch):
    check_batched(2, 1000, 1000, 4, 4, 128, True, torch.bfloat16, layout="qkv_packed")
    monkeypatch.setattr(fa, "_tma_ok", lambda *t: False)  # plain-pointer path on Hopper
    check_batched(2, 1000, 777, 4, 2, 64, True, torch.bfloat16)
    check_batched(2, 1000, 1000, 4, 2, 96, False, torch.float16)


@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("i", [0, 1, 2, 3])
def test_gpu_every_tuned_tile(monkeypatch, d, i):
    """The autotuner may pick any tile of the pruned set: each must be correct."""
    orig_fwd, orig_bwd = fa._flash_fwd, fa._flash_bwd
    tiles = {kind: fa.TILES[kind][d][min(i, len(fa.TILES[kind][d]) - 1)]
             for kind in ("fwd", "dkdv", "dq")}
    monkeypatch.setattr(fa, "_flash_fwd", lambda *a, **k: orig_fwd(*a, **k, tile=tiles["fwd"]))
    monkeypatch.setattr(fa, "_flash_bwd", lambda *a, **k: orig_bwd(*a, **k, tiles=tiles))
    for causal in (False, True):
        check_batched(2, 1000, 1000, 4, 2, d, causal, torch.bfloat16, seed=i)
