"""Matmul: every rung against a float64 reference, ragged shapes, strided views, bad input.

Error rule (flash-attn's): max |C - C_float64| may be at most `factor` x the error of
torch.matmul computed in the kernel's own precision (TF32 off for float32), plus a small
slack; for 16-bit outputs also elementwise within the dtype's tolerance. Outputs start
as NaN (`out=`), so an element a kernel never writes fails.

Under the simulator every CUDA thread is a Python thread (a 128x128-tile block is 256 of
them): the Numba shapes stay tiny there; GPU-marked tests use real sizes.
"""

import pytest
import torch

from common import runtime
from common.checks import assert_close, assert_error_within, poisoned

import matmul_numba as mn
import matmul_triton as mt

DEV = runtime.torch_device()
RUNGS = list(mn.RUNGS.items())
SIM_SHAPES = [(1, 1, 1), (17, 33, 5), (33, 20, 40)]
GPU_SHAPES = [(1, 1, 1), (17, 33, 5), (1000, 1000, 1000), (129, 257, 1031), (1024, 1024, 1024)]
TRITON_SHAPES = runtime.pick([(1, 1, 1), (17, 33, 5), (70, 96, 56)],  # GPU: compile time
                              [(1, 1, 1), (17, 33, 5), (33, 20, 40), (64, 48, 80), (70, 96, 56)])


def _operands(M, N, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g).to(dtype).to(DEV)
    b = torch.randn(K, N, generator=g).to(dtype).to(DEV)
    return a, b


def _baseline(a, b):
    """torch.matmul in the operands' precision (TF32 off for float32)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return a @ b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _check(out, a, b, name):
    ref = a.double() @ b.double()
    K = a.shape[1]
    if out.dtype == torch.float32:
        assert_error_within(out, _baseline(a, b), ref, factor=4, slack=1e-5 * K**0.5, name=name)
    else:
        slack = 1e-3
        if runtime.is_emulated() and out.dtype == torch.bfloat16:
            # The interpreter rounds fp32 -> bf16 by truncation (1 ulp), torch to nearest.
            slack += 2.0**-7 * ref.abs().max().item()
        assert_error_within(out, _baseline(a, b), ref, factor=2, slack=slack, name=name)
        assert_close(out, ref, dtype=out.dtype, name=name)


def _run(fn, a, b, **kw):
    out = poisoned((a.shape[0], b.shape[1]), a.dtype, DEV)
    got = fn(a, b, out=out, **kw)
    assert got is out
    return out


# --- Numba float32 rungs ---------------------------------------------------------------------
@pytest.mark.parametrize("M,N,K", SIM_SHAPES)
@pytest.mark.parametrize("name,fn", RUNGS, ids=[k for k, _ in RUNGS])
def test_numba_rungs_ragged(name, fn, M, N, K):
    a, b = _operands(M, N, K, torch.float32, seed=M * 7 + N)
    _check(_run(fn, a, b), a, b, name)


@pytest.mark.parametrize("name,fn", RUNGS, ids=[k for k, _ in RUNGS])
def test_numba_rungs_strided_views(name, fn):
    """A transposed (column-major) A and a column-sliced B: strides reach the kernel."""
    g = torch.Generator().manual_seed(3)
    at = torch.randn(9, 17, generator=g).to(DEV)            # A = at.t(): 17 x 9, strides (1, 17)
    bw = torch.randn(9, 2 * 21, generator=g).to(DEV)        # B = bw[:, ::2]: 9 x 21, strides (42, 2)
    a, b = at.t(), bw[:, ::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    _check(_run(fn, a, b), a, b, f"{name} strided")


def test_numba_regblock_full_tile_fast_path():
    """M, N multiples of 128 and K of 8: the unchecked load path, and 2 K-slices."""
    M, N, K = runtime.pick((256, 384, 64), (128, 128, 16))
    a, b = _operands(M, N, K, torch.float32, seed=5)
    _check(_run(mn.matmul_regblock, a, b), a, b, "regblock full tiles")


@pytest.mark.parametrize("M,N,K", [(130, 9, 11), (7, 131, 17)])
def test_numba_regblock_several_blocks(M, N, K):
    """The 128 x 128 block tile under the simulator with a grid of 2 x 1 and 1 x 2 blocks
    (the ragged shapes above fit one block): blockIdx.x and blockIdx.y each matter, and the
    second block is an edge block."""
    a, b = _operands(M, N, K, torch.float32, seed=M + N)
    _check(_run(mn.matmul_regblock, a, b), a, b, f"regblock {M}x{N}x{K}")


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", GPU_SHAPES)
@pytest.mark.parametrize("name,fn", RUNGS, ids=[k for k, _ in RUNGS])
def test_gpu_numba_rungs(name, fn, M, N, K):
    a, b = _operands(M, N, K, torch.float32, seed=M + N + K)
    _check(_run(fn, a, b), a, b, name)
    _check(_run(fn, a.t().contiguous().t(), b[:, :]), a, b, f"{name} column-major A")


# --- Triton ----------------------------------------------------------------------------------
# Under the interpreter a single small config; on the GPU a fixed mid-size config for the
# ragged shapes (one compilation each), the autotuned path in the gpu tests below.
FIXED = mt.CONFIGS[-1]


PATHS = {"tma": dict(use_tma=True), "pointers": dict(use_tma=False),
         "tma persistent": dict(use_tma=True, persistent=True)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,N,K", TRITON_SHAPES)
@pytest.mark.parametrize("path", list(PATHS))
def test_triton_ragged(path, M, N, K, dtype):
    a, b = _operands(M, N, K, dtype, seed=M + 3 * N + 7 * K)
    kw = PATHS[path]
    if kw["use_tma"] and (K % 8 or N % 8):  # rows of A or B/C not a multiple of 16 bytes
        with pytest.raises(ValueError, match="TMA needs"):
            mt.matmul(a, b, **kw)
        kw = {}                        # the default: falls back to pointer loads
    _check(_run(mt.matmul, a, b, config=FIXED, **kw), a, b, f"triton {path}")


def test_triton_persistent_walks_many_tiles():
    """More tiles than programs: each persistent program must loop (grid = #SMs)."""
    cfg = mt.CONFIGS_PERSISTENT[-1]
    tiles_wanted = runtime.pick(3 * 132 + 5, 7)  # > 1 tile per program (3 under emulation)
    M = cfg.kwargs["BLOCK_M"] * tiles_wanted - 5
    a, b = _operands(M, cfg.kwargs["BLOCK_N"], 64, torch.bfloat16, seed=8)
    _check(_run(mt.matmul, a, b, use_tma=True, persistent=True, config=cfg), a, b, "persistent")
    with pytest.raises(ValueError, match="persistent"):
        mt.matmul(a, b, use_tma=False, persistent=True)


def test_triton_interpreter_computes_bf16_dot_in_fp32():
    """Under the interpreter the kernels must multiply fp32 copies (DOT_FP32) and then
    be right for bf16; on a GPU they must use the 16-bit tensor-core path."""
    assert mt.DOT_FP32 == runtime.is_emulated()
    a, b = _operands(40, 24, 72, torch.bfloat16, seed=9)
    for use_tma in (True, False):
        _check(_run(mt.matmul, a, b, use_tma=use_tma, config=FIXED), a, b, "bf16")


def test_triton_strided_views_fall_back_to_pointers():
    g = torch.Generator().manual_seed(4)
    at = torch.randn(24, 33, generator=g).to(torch.bfloat16).to(DEV)
    b = torch.randn(24, 40, generator=g).to(torch.bfloat16).to(DEV)
    a = at.t()                                     # 33 x 24, strides (1, 33): no TMA
    assert not mt.tma_compatible(a, b)
    _check(_run(mt.matmul, a, b, config=FIXED), a, b, "transposed A")
    with pytest.raises(ValueError, match="TMA needs"):
        mt.matmul(a, b, use_tma=True)
    # A slice with 16-byte aligned rows keeps TMA: columns 8.. of a 48-wide matrix.
    wide = torch.randn(33, 48, generator=g).to(torch.bfloat16).to(DEV)
    a2 = wide[:, 8:32]                             # 33 x 24, strides (48, 1), offset 16 bytes
    assert mt.tma_compatible(a2, b)
    _check(_run(mt.matmul, a2, b, use_tma=True, config=FIXED), a2, b, "sliced A, TMA")


@pytest.mark.gpu
@pytest.mark.parametrize("path", list(PATHS))
def test_gpu_triton_autotuned(path):
    a, b = _operands(1024, 1024, 1024, torch.bfloat16, seed=1)
    _check(_run(mt.matmul, a, b, **PATHS[path]), a, b, f"autotuned {path}")
    assert mt.best_config(**PATHS[path]) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_triton_ragged_real_sizes(dtype):
    for M, N, K in [(1000, 1000, 1000), (1, 4096, 4096), (4097, 33, 1031)]:
        a, b = _operands(M, N, K, dtype, seed=M + N)
        _check(_run(mt.matmul, a, b, config=FIXED), a, b, f"{M}x{N}x{K}")
        if mt.tma_compatible(a, b):
            _check(_run(mt.matmul, a, b, persistent=True, config=FIXED), a, b, f"{M}x{N}x{K} pers.")
    a, b = _operands(1000, 1000, 1000, dtype, seed=2)
    _check(_run(mt.matmul, a.t().contiguous().t(), b, config=FIXED), a, b, "column-major A")


# --- both: empty and bad input ---------------------------------------------------------------
ALL = RUNGS + [("triton", mt.matmul)]


@pytest.mark.parametrize("name,fn", ALL, ids=[k for k, _ in ALL])
def test_empty_inputs(name, fn):
    dt = torch.float32 if name.startswith("numba") else torch.bfloat16
    for M, N, K in [(0, 5, 3), (4, 0, 3), (0, 0, 0)]:
        out = fn(torch.randn(M, K, device=DEV).to(dt), torch.randn(K, N, device=DEV).to(dt))
        assert out.shape == (M, N)
    # K = 0: a sum over nothing is 0 (no launch)
    out = fn(torch.randn(3, 0, device=DEV).to(dt), torch.randn(0, 4, device=DEV).to(dt))
    assert out.shape == (3, 4) and torch.all(out == 0)


@pytest.mark.parametrize("name,fn", ALL, ids=[k for k, _ in ALL])
def test_bad_input_is_rejected(name, fn):
    dt = torch.float32 if name.startswith("numba") else torch.bfloat16
    wrong_dt = torch.float16 if name.startswith("numba") else torch.float32
    a = torch.randn(4, 6, device=DEV).to(dt)
    b = torch.randn(6, 5, device=DEV).to(dt)
    with pytest.raises(ValueError, match="inner dimensions"):
        fn(a, torch.randn(5, 5, device=DEV).to(dt))
    with pytest.raises(ValueError, match="2-D"):
        fn(a[None], b)
    with pytest.raises(TypeError, match="dtypes differ"):
        fn(a, b.double())
    with pytest.raises(TypeError, match="not supported"):
        fn(a.to(wrong_dt), b.to(wrong_dt))
    with pytest.raises(TypeError, match="not supported"):
        fn(a.int(), b.int())
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(a.cpu().float().numpy(), b)
    with pytest.raises(ValueError, match="devices differ"):
        fn(a, b.to("meta"))
    other = "meta" if runtime.is_emulated() else "cpu"
    with pytest.raises(ValueError, match="move them"):
        fn(a.to(other), b.to(other))
    with pytest.raises(ValueError, match="out must be"):
        fn(a, b, out=torch.empty(5, 4, device=DEV, dtype=dt))
    with pytest.raises(ValueError, match="overlaps"):
        big = torch.randn(4, 6, device=DEV).to(dt)
        fn(big, b, out=big[:, :5])


def test_numba_rejects_bfloat16_and_says_why():
    a = torch.randn(4, 4, device=DEV, dtype=torch.bfloat16)
    for _, fn in RUNGS:
        with pytest.raises(TypeError, match="no bfloat16"):
            fn(a, a)


@pytest.mark.skipif(runtime.is_gpu(), reason="about Triton's interpreter")
def test_interpreter_bf16_dot_is_broken_without_the_flag():
    """Why DOT_FP32 exists. If this starts failing, the interpreter was fixed and the
    flag can go."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 32, generator=g).bfloat16()
    b = torch.randn(32, 32, generator=g).bfloat16()
    c = torch.empty(32, 32, dtype=torch.bfloat16)
    mt.matmul_kernel[(1,)](a, b, c, 32, 32, 32, 32, 1, 32, 1, 32, 1, BLOCK_M=32, BLOCK_N=32,
                           BLOCK_K=16, GROUP_M=1, DOT_FP32=False)
    assert (c.float() - a.float() @ b.float()).abs().max() > 1.0
