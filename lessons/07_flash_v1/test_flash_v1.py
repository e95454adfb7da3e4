"""FlashAttention v1 (lesson 07) against common.reference.attention_ref.

Under emulation: tiny sizes with 16 x 16 tiles (so 17 and 33 rows cross tile edges), one or
two (batch, head). On a GPU (gpu marker): real sizes with the H100 tile configurations.
Outputs are poisoned with NaN before every run.
"""

import math

import pytest
import torch

from common import runtime
from common.checks import assert_close, poisoned
from common.reference import attention_ref

import flash_v1 as fv

DEV = runtime.torch_device()


def _qkv(batch, seqlen_q, seqlen_k, heads, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads, d, generator=g).to(dtype).to(DEV)
    k = torch.randn(batch, seqlen_k, heads, d, generator=g).to(dtype).to(DEV)
    v = torch.randn(batch, seqlen_k, heads, d, generator=g).to(dtype).to(DEV)
    return q, k, v


def _check(q, k, v, causal, scale=None, **kw):
    out = poisoned(q.shape, q.dtype, DEV)
    o, lse = fv.flash_attn_v1(q, k, v, softmax_scale=scale, causal=causal, out=out, **kw)
    ref_o, ref_lse = attention_ref(q, k, v, softmax_scale=scale, causal=causal)
    assert o is out and lse.dtype == torch.float32
    assert_close(o, ref_o.to(q.dtype), dtype=q.dtype, name="out")
    assert_close(lse, ref_lse, dtype=torch.float32, name="lse")


# (batch, seqlen_q, seqlen_k, heads, d, causal, dtype, q_tiles_per_block)
EMU_CASES = [
    (1, 1, 1, 1, 32, False, torch.float32, 1),
    (1, 17, 17, 2, 32, False, torch.float32, 1),
    (1, 33, 17, 1, 32, True, torch.float32, None),   # first 16 rows see no key: 0 and +inf
    (2, 17, 33, 1, 32, True, torch.float16, 1),
    (1, 33, 33, 1, 32, True, torch.float32, 2),      # one block walks both Q tiles
    (1, 17, 20, 1, 64, False, torch.float16, 1),
    (1, 9, 18, 1, 128, True, torch.float32, 1),
]


@pytest.mark.parametrize("case", EMU_CASES, ids=str)
def test_flash_v1_small(case):
    batch, sq, sk, heads, d, causal, dtype, g = case
    _check(*_qkv(batch, sq, sk, heads, d, dtype, seed=sq + sk), causal, q_tiles_per_block=g)


def test_softmax_scale_argument():
    q, k, v = _qkv(1, 17, 17, 1, 32, torch.float32, seed=5)
    _check(q * 3, k, v, causal=False, scale=0.9)  # large logits: exercises the max shift


def test_empty_inputs_launch_nothing(monkeypatch):
    monkeypatch.setattr(fv, "kernel_array", lambda t: pytest.fail("a kernel was launched"))
    q, k, v = _qkv(2, 0, 5, 1, 64, torch.float16)
    o, lse = fv.flash_attn_v1(q, k, v)
    assert o.shape == (2, 0, 1, 64) and lse.shape == (2, 1, 0)
    q, k, v = _qkv(1, 3, 0, 2, 32, torch.float32)
    o, lse = fv.flash_attn_v1(q, k, v)
    assert (o == 0).all() and torch.isinf(lse).all() and (lse > 0).all()


def _bad_inputs():
    f32 = dict(dtype=torch.float32, device=DEV)
    q = torch.randn(1, 8, 2, 32, **f32)
    return [
        (dict(q=q, k=q[..., :16], v=q[..., :16]), ValueError, "headdim"),
        (dict(q=q, k=torch.randn(1, 8, 3, 32, **f32), v=torch.randn(1, 8, 3, 32, **f32)),
         ValueError, "heads"),
        (dict(q=q, k=q, v=torch.randn(1, 9, 2, 32, **f32)), ValueError, "same shape"),
        (dict(q=q, k=q.half(), v=q), TypeError, "one dtype"),
        (dict(q=q.double(), k=q.double(), v=q.double()), TypeError, "not supported"),
        (dict(q=q.bfloat16(), k=q.bfloat16(), v=q.bfloat16()), TypeError, "not supported"),
        (dict(q=torch.randn(1, 8, 2, 96, **f32), k=torch.randn(1, 8, 2, 96, **f32),
              v=torch.randn(1, 8, 2, 96, **f32)), ValueError, "head dim 96"),
        (dict(q=q[0], k=q[0], v=q[0]), ValueError, "4-D"),
        (dict(q=q, k=q.to("meta"), v=q), ValueError, "one device"),
        (dict(q=q, k=q, v=q, q_tiles_per_block=0), ValueError, "q_tiles_per_block"),
        (dict(q=q, k=q, v=q, softmax_scale=math.nan), ValueError, "finite"),
        (dict(q=q, k=q, v=q, out=torch.empty(1, 8, 2, 32, dtype=torch.float16, device=DEV)),
         ValueError, "out must be"),
        (dict(q=q, k=q, v=q, config=fv.TileConfig(128, 64, 8, 16)), ValueError, "shared memory"),
    ]


@pytest.mark.parametrize("i", range(13))
def test_bad_input_rejected_before_launch(i, monkeypatch):
    monkeypatch.setattr(fv, "kernel_array", lambda t: pytest.fail("a kernel was launched"))
    kwargs, exc, msg = _bad_inputs()[i]
    with pytest.raises(exc, match=msg):
        fv.flash_attn_v1(**kwargs)


@pytest.mark.parametrize("d", fv.SUPPORTED_HEAD_DIMS)
def test_gpu_tile_configs_are_valid(d):
    """The H100 configurations fit 48 KB and divide evenly (checked here, without a GPU)."""
    fv.GPU_CONFIGS[d].check(d)
    fv.EMULATION_CONFIGS[d].check(d)


def test_hbm_bytes_model():
    cfg = fv.TileConfig(32, 64, 8, 16)
    full = fv.hbm_bytes(1, 4096, 4096, 1, 64, cfg)
    steps = (4096 // 32) * (4096 // 64)
    assert full["o_l_m"] == steps * 32 * (2 * 64 + 4) * 4
    causal = fv.hbm_bytes(1, 4096, 4096, 1, 64, cfg, causal=True)
    assert 0.5 < causal["o_l_m"] / full["o_l_m"] < 0.52   # about half the tiles
    one_block = fv.hbm_bytes(1, 4096, 4096, 1, 64, cfg, q_tiles_per_block=None)
    assert one_block["kv"] == 2 * 4096 * 64 * 4            # K and V read exactly once


# ---------------------------------------------------------------------------------------
# Real sizes on the GPU, the tile configurations the benchmark uses

GPU_CASES = [
    (2, 1000, 1000, 3, 64, False, torch.float32, 1),
    (2, 1000, 1000, 3, 64, True, torch.float16, 1),
    (1, 1, 1, 1, 64, False, torch.float32, 1),
    (1, 17, 1000, 2, 64, True, torch.float32, None),
    (1, 1000, 17, 2, 64, True, torch.float16, 3),
    (2, 2048, 2048, 2, 64, True, torch.float32, None),
    (1, 1, 777, 2, 128, False, torch.float32, 1),
    (1, 777, 1000, 2, 128, True, torch.float16, 1),
    (3, 513, 1025, 2, 32, True, torch.float16, 1),
    (1, 1500, 700, 2, 32, False, torch.float32, 4),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_flash_v1_gpu(case):
    batch, sq, sk, heads, d, causal, dtype, g = case
    _check(*_qkv(batch, sq, sk, heads, d, dtype, seed=sq), causal, q_tiles_per_block=g)


@pytest.mark.gpu
def test_flash_v1_gpu_other_tile_configs():
    """The configurations the benchmark compares compute the same function."""
    q, k, v = _qkv(1, 1000, 1000, 2, 64, torch.float32, seed=9)
    for cfg in (fv.TileConfig(64, 32, 16, 8), fv.TileConfig(32, 64, 4, 16)):
        _check(q, k, v, True, config=cfg)
