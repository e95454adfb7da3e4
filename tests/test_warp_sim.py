"""common/warp_sim.py: the simulator's warp intrinsics behave as CUDA defines them.

Three independent statements of the semantics are checked against each other:

1. the PTX ISA pseudo-code of ``shfl.sync`` (``warp_sim.ptx_source_lane``) against the
   CUDA C Programming Guide's prose for ``__shfl*_sync(mask, var, b, width)``
   (``_guide_source_lane`` below), for every mode, lane, offset and width;
2. kernels run on the simulator with the emulated intrinsics against a NumPy model of
   the guide (random values, every offset, two warps);
3. NVIDIA's own kernels from numba-cuda's ``tests/cudapy/test_warp_ops.py`` (which skip
   on the simulator) with the results their GPU tests expect.

The GPU-marked test runs the same all-offsets kernel compiled for a real GPU and checks
the hardware against the same NumPy model, closing the loop.
"""

from __future__ import annotations

import ast
import os
import time

import numpy as np
import pytest

from common import runtime, warp_sim
from common.warp_sim import (MODE_BFLY, MODE_DOWN, MODE_IDX, MODE_UP, WarpSyncError,
                             clamp_operand, ptx_source_lane)

from numba import cuda  # noqa: E402  (common.runtime chose the mode above)

warp_sim.install()
emulation_only = pytest.mark.skipif(not runtime.is_emulated(),
                                    reason="tests the emulation itself")


# ----------------------------------------------------------------------------------------
# 1. PTX pseudo-code == Programming Guide prose (pure functions, no threads)

def _guide_source_lane(mode, lane, b, width):
    """The CUDA C Programming Guide, 'Warp Shuffle Functions', in its own words."""
    base = lane // width * width
    if mode == MODE_IDX:  # "srcLane modulo width (within the same subsection)"
        return base + b % width
    if mode == MODE_UP:  # "if laneid - delta < 0 within the segment, var is unchanged"
        return lane - b if lane % width - b >= 0 else lane
    if mode == MODE_DOWN:  # "... lanes at the top of the segment keep their value"
        return lane + b if lane % width + b < width else lane
    # xor: "earlier groups can be read; reading a later group returns own var"
    j = lane ^ b
    return j if j < base + width else lane


@pytest.mark.parametrize("mode", [MODE_IDX, MODE_UP, MODE_DOWN, MODE_BFLY],
                         ids=["idx", "up", "down", "xor"])
def test_ptx_pseudocode_matches_programming_guide(mode):
    for width in (1, 2, 4, 8, 16, 32):
        c = clamp_operand(mode, width)
        for lane in range(32):
            for b in range(32):
                j, _ = ptx_source_lane(mode, lane, b, c)
                assert j == _guide_source_lane(mode, lane, b, width), (mode, width, lane, b)


def test_numba_clamp_operands_are_full_warp():
    # numba/cuda/intrinsics.py passes c = 0x1f for idx/down/xor and c = 0 for up
    assert [clamp_operand(m) for m in (MODE_IDX, MODE_UP, MODE_DOWN, MODE_BFLY)] == \
        [0x1F, 0, 0x1F, 0x1F]


def test_offsets_use_five_bits_like_the_hardware():
    # PTX uses b[4:0]: a delta of 32 is a delta of 0 (own value), 33 acts as 1
    assert ptx_source_lane(MODE_DOWN, 3, 32, 0x1F) == (3, True)
    assert ptx_source_lane(MODE_DOWN, 3, 33, 0x1F) == (4, True)
    assert ptx_source_lane(MODE_UP, 0, 1, 0) == (0, False)
    with pytest.raises(ValueError, match="width"):
        clamp_operand(MODE_DOWN, 3)


# ----------------------------------------------------------------------------------------
# 2. Emulated intrinsics in simulated kernels against a NumPy model

def _model(a: np.ndarray, mode: int, b: int, width: int = 32) -> np.ndarray:
    out = np.empty_like(a)
    for t in range(a.size):
        w, lane = divmod(t, 32)
        out[t] = a[w * 32 + _guide_source_lane(mode, lane, b % 32, width)]
    return out


@cuda.jit
def _all_offsets(a, out):
    i = cuda.grid(1)
    v = a[i]
    for d in range(32):
        out[0, d, i] = cuda.shfl_sync(0xFFFFFFFF, v, d)
        out[1, d, i] = cuda.shfl_up_sync(0xFFFFFFFF, v, d)
        out[2, d, i] = cuda.shfl_down_sync(0xFFFFFFFF, v, d)
        out[3, d, i] = cuda.shfl_xor_sync(0xFFFFFFFF, v, d)


def _check_all_offsets(out, a):
    for m, mode in enumerate((MODE_IDX, MODE_UP, MODE_DOWN, MODE_BFLY)):
        for d in range(32):
            np.testing.assert_array_equal(out[m, d], _model(a, mode, d),
                                          err_msg=f"mode {mode} offset {d}")


def test_every_shuffle_every_offset_two_warps():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(64).astype(np.float32)
    out = np.full((4, 32, 64), np.nan, np.float32)
    _all_offsets[1, 64](a, out)
    _check_all_offsets(out, a)


@pytest.mark.gpu
def test_hardware_matches_the_same_model():
    rng = np.random.default_rng(2)
    a = rng.standard_normal(96).astype(np.float32)
    out = np.full((4, 32, 96), np.nan, np.float32)
    _all_offsets[1, 96](a, out)
    _check_all_offsets(out, a)


@emulation_only
def test_width_segments_through_shuffle_helper():
    @cuda.jit
    def kern(a, out):
        i = cuda.threadIdx.x
        k = 0
        for width in (2, 8, 16):
            for mode in (0, 1, 2, 3):
                out[k, i] = warp_sim.shuffle(mode, 0xFFFFFFFF, a[i], 3, width)
                k += 1

    a = np.random.default_rng(3).integers(-1000, 1000, 32).astype(np.int32)
    out = np.zeros((12, 32), np.int32)
    kern[1, 32](a, out)
    k = 0
    for width in (2, 8, 16):
        for mode in (MODE_IDX, MODE_UP, MODE_DOWN, MODE_BFLY):
            np.testing.assert_array_equal(out[k], _model(a, mode, 3, width),
                                          err_msg=f"width {width} mode {mode}")
            k += 1


@emulation_only
def test_64_bit_values_travel_exactly():
    @cuda.jit
    def kern(f, n, out_f, out_n):
        i = cuda.threadIdx.x
        out_f[i] = cuda.shfl_xor_sync(0xFFFFFFFF, f[i], 5)
        out_n[i] = cuda.shfl_sync(0xFFFFFFFF, n[i], 7)

    rng = np.random.default_rng(4)
    f = rng.standard_normal(32)  # float64
    n = rng.integers(-2**62, 2**62, 32, dtype=np.int64)
    out_f, out_n = np.zeros(32), np.zeros(32, np.int64)
    kern[1, 32](f, n, out_f, out_n)
    np.testing.assert_array_equal(out_f, f[np.arange(32) ^ 5])
    np.testing.assert_array_equal(out_n, np.full(32, n[7]))


@emulation_only
def test_warp_reduction_sums_each_warp():
    @cuda.jit
    def kern(a, out):
        i = cuda.grid(1)
        v = a[i]
        offset = 16
        while offset > 0:
            v += cuda.shfl_down_sync(0xFFFFFFFF, v, offset)
            offset //= 2
        if cuda.laneid == 0:
            out[i // 32] = v

    a = np.random.default_rng(5).integers(-100, 100, 64).astype(np.int64)
    out = np.zeros(2, np.int64)
    kern[1, 64](a, out)
    np.testing.assert_array_equal(out, a.reshape(2, 32).sum(1))


@emulation_only
def test_syncwarp_is_a_real_barrier():
    @cuda.jit
    def kern(out):
        buf = cuda.shared.array(32, np.int32)
        lane = cuda.threadIdx.x
        if lane == 31:
            time.sleep(0.05)  # the writer is late on purpose
        buf[lane] = lane * 3 + 1
        cuda.syncwarp()
        out[lane] = buf[31 - lane]

    out = np.zeros(32, np.int32)
    kern[1, 32](out)
    np.testing.assert_array_equal(out, (31 - np.arange(32)) * 3 + 1)


@emulation_only
def test_partial_last_warp_waits_only_for_existing_lanes():
    @cuda.jit
    def kern(out_ballot, out_xor):
        i = cuda.threadIdx.x
        out_ballot[i] = cuda.ballot_sync(0xFFFFFFFF, i % 2 == 0)
        out_xor[i] = cuda.shfl_xor_sync(0xFFFFFFFF, i, 1)  # stays inside the 16 lanes

    ballot, xor = np.zeros(48, np.int64), np.zeros(48, np.int64)
    kern[1, 48](ballot, xor)
    assert (ballot[:32] == np.int32(np.uint32(0x55555555).view(np.int32))).all()
    assert (ballot[32:] == 0x5555).all()
    np.testing.assert_array_equal(xor, np.arange(48) ^ 1)


@emulation_only
def test_disjoint_masks_run_independently():
    @cuda.jit
    def kern(a, out):
        lane = cuda.threadIdx.x
        if lane < 16:
            out[lane] = cuda.shfl_xor_sync(0x0000FFFF, a[lane], 1)
        else:
            out[lane] = cuda.shfl_sync(0xFFFF0000, a[lane], 16 + (lane + 1) % 16)

    a = np.random.default_rng(6).standard_normal(32).astype(np.float32)
    out = np.zeros(32, np.float32)
    kern[1, 32](a, out)
    lanes = np.arange(32)
    exp = np.where(lanes < 16, a[lanes ^ 1], a[16 + (lanes + 1) % 16])
    np.testing.assert_array_equal(out, exp)


# ----------------------------------------------------------------------------------------
# Undefined behaviour on the GPU is an error under emulation

@emulation_only
def test_reading_a_lane_outside_the_mask_is_an_error():
    @cuda.jit
    def kern(a, out):
        lane = cuda.threadIdx.x
        if lane < 16:
            out[lane] = cuda.shfl_down_sync(0x0000FFFF, a[lane], 1)  # lane 15 reads 16

    with pytest.raises(WarpSyncError, match="lane 15 reads lane 16"):
        kern[1, 32](np.zeros(32, np.float32), np.zeros(32, np.float32))


@emulation_only
def test_caller_outside_its_own_mask_is_an_error():
    @cuda.jit
    def kern(out):
        out[cuda.threadIdx.x] = cuda.shfl_sync(0x1, 1.0, 0)

    with pytest.raises(WarpSyncError, match="does not name it"):
        kern[1, 32](np.zeros(32))


@emulation_only
def test_exited_lanes_are_not_waited_for_but_cannot_be_read():
    @cuda.jit
    def ok(out):
        lane = cuda.threadIdx.x
        if lane >= 16:
            return
        out[lane] = cuda.shfl_xor_sync(0xFFFFFFFF, lane, 1)

    out = np.full(32, -1, np.int64)
    ok[1, 32](out)
    np.testing.assert_array_equal(out[:16], np.arange(16) ^ 1)

    @cuda.jit
    def bad(out):
        lane = cuda.threadIdx.x
        if lane >= 16:
            return
        out[lane] = cuda.shfl_down_sync(0xFFFFFFFF, lane, 8)  # lanes 8..15 read 16..23

    with pytest.raises(WarpSyncError, match="did not take part"):
        bad[1, 32](np.zeros(32, np.int64))


@emulation_only
def test_different_intrinsics_on_one_mask_is_an_error():
    @cuda.jit
    def kern(out):
        lane = cuda.threadIdx.x
        if lane == 0:
            time.sleep(0.02)
            cuda.syncwarp()
        else:
            out[lane] = cuda.shfl_sync(0xFFFFFFFF, lane, 0)

    with pytest.raises(WarpSyncError, match="different warp intrinsics"):
        kern[1, 32](np.zeros(32, np.int64))


@emulation_only
def test_lane_in_syncthreads_while_warp_waits_is_a_deadlock():
    @cuda.jit
    def kern(out):
        lane = cuda.threadIdx.x
        if lane == 3:
            cuda.syncthreads()
        else:
            cuda.syncwarp()
        out[lane] = 1

    t0 = time.monotonic()
    with pytest.raises(WarpSyncError, match="deadlock"):
        kern[1, 32](np.zeros(32, np.int64))
    assert time.monotonic() - t0 < 20


@emulation_only
def test_types_numba_refuses_are_refused():
    @cuda.jit
    def half(out):
        out[0] = cuda.shfl_sync(0xFFFFFFFF, np.float16(1), 0)

    @cuda.jit
    def float_mask(out):
        cuda.syncwarp(1.5)

    with pytest.raises(TypeError, match="32- and 64-bit"):
        half[1, 32](np.zeros(1, np.float16))
    with pytest.raises(TypeError, match="mask must be an integer"):
        float_mask[1, 32](np.zeros(1))


@emulation_only
def test_outside_a_kernel_is_an_error():
    with pytest.raises(WarpSyncError, match="outside a simulated CUDA kernel"):
        warp_sim.syncwarp()


def test_install_is_active_exactly_under_emulation():
    assert warp_sim.install() == runtime.is_emulated()
    assert warp_sim.install() == runtime.is_emulated()  # idempotent
    if runtime.is_emulated():
        assert {"shfl_down_sync", "shfl_xor_sync", "syncwarp"} <= set(warp_sim.installed_names())


# ----------------------------------------------------------------------------------------
# 3. NVIDIA's kernels from numba-cuda's own warp-op tests (skipped there on the simulator)

def _numba_warp_op_kernels():
    import numba_cuda
    path = os.path.join(os.path.dirname(numba_cuda.__file__),
                        "numba", "cuda", "tests", "cudapy", "test_warp_ops.py")
    if not os.path.exists(path):
        pytest.skip("this numba-cuda install ships without its tests")
    tree = ast.parse(open(path).read())
    ns = {"cuda": cuda}
    for node in tree.body:  # the module-level kernel bodies only, not its test harness
        if isinstance(node, ast.FunctionDef) and node.name.startswith("use"):
            exec(compile(ast.Module([node], []), path, "exec"), ns)
    return ns


@emulation_only
def test_numba_cuda_own_warp_op_kernels():
    k = _numba_warp_op_kernels()
    jit = cuda.jit
    ary = np.empty(32, np.int32)
    jit(k["useful_syncwarp"])[1, 32](ary)
    assert (ary == 42).all()
    for name, arg, exp in [
        ("use_shfl_sync_idx", 4, np.full(32, 4)),
        ("use_shfl_sync_up", 4, np.r_[np.arange(4), np.arange(28)]),
        ("use_shfl_sync_down", 4, np.r_[np.arange(4, 32), np.arange(28, 32)]),
        ("use_shfl_sync_xor", 16, np.arange(32) ^ 16),
    ]:
        ary = np.empty(32, np.int32)
        jit(k[name])[1, 32](ary, arg)
        np.testing.assert_array_equal(ary, exp, err_msg=name)
    for val in (np.int32(-1), np.int64(1 << 42), np.float32(np.pi), np.float64(np.pi)):
        ary = np.empty(32, val.dtype)
        jit(k["use_shfl_sync_with_val"])[1, 32](ary, val)
        assert (ary == val).all()
    ones, out = np.ones(32, np.int32), np.empty(32, np.int32)
    jit(k["use_vote_sync_all"])[1, 32](ones, out)
    assert (out == 1).all()
    ones[-1] = 0
    jit(k["use_vote_sync_all"])[1, 32](ones, out)
    assert (out == 0).all()
    jit(k["use_vote_sync_any"])[1, 32](ones, out)
    assert (out == 1).all()
    jit(k["use_vote_sync_eq"])[1, 32](ones, out)
    assert (out == 0).all()
    ballot = np.empty(32, np.uint32)
    jit(k["use_vote_sync_ballot"])[1, 32](ballot)
    assert (ballot == np.uint32(0xFFFFFFFF)).all()
    ai, ao = (np.arange(10) % 2).astype(np.int32), np.empty(10, np.int32)
    jit(k["use_match_any_sync"])[1, 10](ai, ao)
    np.testing.assert_array_equal(ao, np.tile((0b0101010101, 0b1010101010), 5))
    ai = np.zeros(10, np.int32)
    jit(k["use_match_all_sync"])[1, 10](ai, ao)
    assert (ao == 0b1111111111).all()
    ai[1] = 4
    jit(k["use_match_all_sync"])[1, 10](ai, ao)
    assert (ao == 0).all()
    arr = np.empty(32, np.uint32)
    jit(k["use_independent_scheduling"])[1, 32](arr)
    np.testing.assert_array_equal(arr, np.tile((0x11111111, 0x22222222, 0x44444444,
                                                0x88888888), 8))


@emulation_only
def test_lanes_still_starting_are_waited_for():
    # A lane whose thread is starting (Thread.is_alive() still False) must not be taken
    # for an exited one: shuffle first thing, in many short blocks (found as a race).
    @cuda.jit
    def kern(a, out):
        i = cuda.grid(1)
        out[i] = cuda.shfl_xor_sync(0xFFFFFFFF, a[i], 31)

    a = np.random.default_rng(7).standard_normal(8 * 64)
    out = np.zeros_like(a)
    kern[8, 64](a, out)
    np.testing.assert_array_equal(out, a[np.arange(a.size) ^ 31])
