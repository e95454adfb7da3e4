"""Lesson 06's three kernels against common.reference.attention_ref.

Under emulation the sizes are tiny (every CUDA thread is a Python thread); the gpu-marked
tests run real sizes. Outputs are poisoned with NaN, so an element a kernel forgets to
write fails the comparison.
"""

import math

import pytest
import torch

from common import runtime
from common.checks import assert_close, poisoned
from common.reference import attention_ref

import attention_memory
import standard_attention as sa

DEV = runtime.torch_device()


def _qkv(batch, seqlen_q, seqlen_k, heads, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads, d, generator=g).to(dtype).to(DEV)
    k = torch.randn(batch, seqlen_k, heads, d, generator=g).to(dtype).to(DEV)
    v = torch.randn(batch, seqlen_k, heads, d, generator=g).to(dtype).to(DEV)
    return q, k, v


def _check(q, k, v, causal, scale=None):
    out = poisoned(q.shape, q.dtype, DEV)
    o, lse = sa.standard_attention(q, k, v, softmax_scale=scale, causal=causal, out=out)
    ref_o, ref_lse = attention_ref(q, k, v, softmax_scale=scale, causal=causal)
    assert o is out
    # output in the input dtype: tolerance of that dtype; lse is float32 in both
    assert_close(o, ref_o.to(q.dtype), dtype=q.dtype, name="out")
    assert_close(lse, ref_lse, dtype=torch.float32, name="lse")


# (batch, seqlen_q, seqlen_k, heads, d, causal, dtype): ragged sizes, seqlen_q > seqlen_k
# with causal (the first rows see no key: zeros and lse = +inf), float16.
EMU_CASES = [
    (1, 1, 1, 1, 32, False, torch.float32),
    (1, 17, 17, 2, 32, False, torch.float32),
    (1, 33, 17, 1, 32, True, torch.float32),
    (2, 17, 33, 1, 32, True, torch.float16),
    (1, 17, 20, 1, 64, False, torch.float16),
]


@pytest.mark.parametrize("case", EMU_CASES, ids=str)
def test_standard_attention_small(case):
    batch, sq, sk, heads, d, causal, dtype = case
    _check(*_qkv(batch, sq, sk, heads, d, dtype), causal)


def test_scale_and_intermediates():
    """S is scale * Q K^T (masked -inf), each row of P sums to 1, lse = logsumexp(S)."""
    q, k, v = _qkv(1, 19, 23, 1, 32, torch.float32, seed=3)
    o, lse, s, p = sa.standard_attention(q, k, v, softmax_scale=0.3, causal=True, return_sp=True)
    qf, kf = q[0, :, 0].double().cpu(), k[0, :, 0].double().cpu()
    s_ref = 0.3 * qf @ kf.T
    i = torch.arange(19)[:, None]
    j = torch.arange(23)[None, :]
    s_ref = s_ref.masked_fill(j > i + 23 - 19, -math.inf)
    assert_close(s[0, 0], s_ref, dtype=torch.float32, name="S")
    assert_close(p[0, 0].sum(-1), torch.ones(19, device=p.device), dtype=torch.float32,
                 name="rowsum P")
    assert_close(lse[0, 0], torch.logsumexp(s_ref, -1), dtype=torch.float32, name="lse")
    ref_o, _ = attention_ref(q, k, v, softmax_scale=0.3, causal=True)
    assert_close(o, ref_o, dtype=torch.float32)


def test_empty_inputs_launch_nothing(monkeypatch):
    monkeypatch.setattr(sa, "kernel_array", lambda t: pytest.fail("a kernel was launched"))
    q, k, v = _qkv(1, 0, 5, 2, 32, torch.float32)
    o, lse = sa.standard_attention(q, k, v)
    assert o.shape == (1, 0, 2, 32) and lse.shape == (1, 2, 0)
    q, k, v = _qkv(1, 4, 0, 2, 32, torch.float32)
    o, lse = sa.standard_attention(q, k, v)
    assert (o == 0).all() and torch.isinf(lse).all() and (lse > 0).all()


def _bad_inputs():
    f32 = dict(dtype=torch.float32, device=DEV)
    q = torch.randn(1, 8, 2, 32, **f32)
    return [
        ((q, q[..., :16], q[..., :16]), ValueError, "headdim"),               # d mismatch
        ((q, torch.randn(2, 8, 2, 32, **f32), torch.randn(2, 8, 2, 32, **f32)), ValueError, "batch"),
        ((q, q, torch.randn(1, 9, 2, 32, **f32)), ValueError, "same shape"),   # k vs v
        ((q, q.half(), q), TypeError, "one dtype"),
        ((q.double(), q.double(), q.double()), TypeError, "not supported"),
        ((q.bfloat16(), q.bfloat16(), q.bfloat16()), TypeError, "not supported"),
        ((torch.randn(1, 8, 2, 48, **f32),) * 3, ValueError, "head dim 48"),
        ((torch.randn(1, 8, 2, 256, **f32),) * 3, ValueError, "head dim 256"),
        ((q[0], q[0], q[0]), ValueError, "4-D"),
        ((q, q.to("meta"), q), ValueError, "one device"),
        ((q.numpy() if DEV == "cpu" else q.cpu(), q, q), (TypeError, ValueError),
         "torch.Tensor|one device"),
    ]


@pytest.mark.parametrize("i", range(11))
def test_bad_input_rejected_before_launch(i, monkeypatch):
    monkeypatch.setattr(sa, "kernel_array", lambda t: pytest.fail("a kernel was launched"))
    args, exc, msg = _bad_inputs()[i]
    with pytest.raises(exc, match=msg):
        sa.standard_attention(*args)


def test_memory_model():
    # S and P in float32 dominate: 2 * 4 * N^2 bytes per (batch, head)
    n = 4096
    peak = attention_memory.standard_peak_bytes(1, n, n, 1, 64)
    assert peak == 2 * 4 * n * n + 4 * n * 64 * 4 + 4 * n
    fits = attention_memory.max_seqlen_that_fits(80e9, 1, 32, 64)
    assert attention_memory.standard_peak_bytes(1, fits, fits, 32, 64) <= 80e9
    assert attention_memory.standard_peak_bytes(1, fits + 1, fits + 1, 32, 64) > 80e9
    b = attention_memory.standard_bytes(2, n, n, 3, 64)
    assert b["total"] == b["scores"] + b["softmax"] + b["pv"]
    assert b["softmax"] == 2 * 2 * 3 * n * n * 4 + 2 * 3 * n * 4


# ---------------------------------------------------------------------------------------
# Real sizes on the GPU

GPU_CASES = [
    (2, 1000, 1000, 3, 64, False, torch.float32),
    (2, 1000, 1000, 3, 64, True, torch.float16),
    (1, 1, 777, 2, 128, False, torch.float32),
    (1, 777, 300, 2, 128, True, torch.float32),
    (3, 513, 1025, 2, 32, True, torch.float16),
    (1, 2048, 2048, 4, 64, False, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_standard_attention_gpu(case):
    batch, sq, sk, heads, d, causal, dtype = case
    _check(*_qkv(batch, sq, sk, heads, d, dtype, seed=sq), causal)
