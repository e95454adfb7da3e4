"""Lesson 04: every rung, sum and max, bit for bit against its NumPy spec; error bounds.

Under emulation the kernels run on Numba's simulator; the warp-shuffle and last-warp
rungs use common/warp_sim.py's shfl_down_sync/syncwarp (tested in tests/test_warp_sim.py).
Sizes are ragged (1, 17, 300: partial blocks, several passes) and small; the GPU-marked
tests repeat the checks at 10^6 and 2^28 elements.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common import runtime

import parallel_reduction as pr
import reduction_order as ro

DEVICE = runtime.torch_device()
RUNGS = list(pr.RUNGS)


def _data(n: int, seed: int, kind: str = "normal") -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) if kind == "normal" else rng.random(n)
    return x.astype(np.float32)


def _check(x_np: np.ndarray, op: str, rung: str, block: int = pr.BLOCK,
           blocks_per_sm: int = pr.BLOCKS_PER_SM):
    x = torch.from_numpy(x_np).to(DEVICE)
    got = pr.reduce(x, op, rung, block=block, blocks_per_sm=blocks_per_sm)
    assert got.shape == () and got.dtype == torch.float32 and got.device.type == DEVICE
    got = got.item()
    launches = pr.passes(rung, x_np.size, block, blocks_per_sm)
    spec = ro.spec(x_np, op, rung, block, launches)
    if rung == "grid_stride_atomic" and op == "sum":
        centre, slack = ro.atomic_result_bound(spec)   # blocks add in any order
        assert abs(got - centre) <= slack, (got, centre, slack)
    elif rung == "grid_stride_atomic":
        assert got == spec.max()
    else:
        assert np.float32(got) == spec, f"{rung} {op} n={x_np.size}: {got!r} != {spec!r}"
    if op == "max":
        assert got == x_np.max()
    else:  # the error bound this lesson teaches, against float64
        exact = x_np.astype(np.float64).sum()
        assert abs(got - exact) <= ro.error_bound(x_np, rung, block, launches)


@pytest.mark.parametrize("rung", RUNGS)
def test_sum_matches_spec_bitwise(rung):
    for k, n in enumerate((1, 17, 300)):
        _check(_data(n, seed=10 + k), "sum", rung)


@pytest.mark.parametrize("rung", RUNGS)
def test_max_matches_spec(rung):
    for k, n in enumerate((33, 300)):
        _check(_data(n, seed=20 + k), "max", rung)


@pytest.mark.parametrize("rung", ["unroll_last_warp", "warp_shuffle", "grid_stride_two_pass"])
def test_gpu_block_size_256(rung):
    # the block size the GPU runs, with the emulated shuffles/syncwarp: 8 warps per block
    _check(_data(500, seed=30), "sum", rung, block=256)


def test_block_128_and_several_grid_stride_rounds():
    # 2 blocks of 128 threads = 256 threads over 2000 elements: 7+ loop rounds per thread,
    # both the 4-wide loop and its 0-3 element tail
    _check(_data(2000, seed=31, kind="uniform"), "sum", "grid_stride_two_pass", block=128,
           blocks_per_sm=1)


@pytest.mark.parametrize("op", ["sum", "max"])
def test_atomic_plan_called_twice_starts_from_the_identity(op):
    x_np = _data(150, seed=41)
    plan = pr.ReductionPlan(torch.from_numpy(x_np).to(DEVICE), op, "grid_stride_atomic")
    first, second = plan().item(), plan().item()   # atomics must not pile up across calls
    exact = x_np.astype(np.float64).sum() if op == "sum" else x_np.max()
    for got in (first, second):
        assert abs(got - exact) <= (ro.error_bound(x_np, "grid_stride_atomic", pr.BLOCK,
                                                   plan_grids(x_np.size)) if op == "sum" else 0)


def plan_grids(n):
    return pr.passes("grid_stride_atomic", n)


def test_all_elements_of_a_2d_tensor_are_reduced():
    x_np = _data(6 * 50, seed=40)
    x = torch.from_numpy(x_np).reshape(6, 50).to(DEVICE)
    got = pr.reduce_sum(x, rung="sequential").item()
    assert np.float32(got) == ro.spec(x_np, "sum", "sequential", pr.BLOCK,
                                      pr.passes("sequential", 300))


def test_empty_gives_identity_without_launch(monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("no kernel may be launched for empty input")
    monkeypatch.setattr(pr, "kernel_for", no_launch)
    empty = torch.empty(0, device=DEVICE)
    for rung in RUNGS:
        assert pr.reduce_sum(empty, rung=rung).item() == 0.0
        assert pr.reduce_max(empty, rung=rung).item() == -np.inf


def test_bad_input_is_rejected_before_launch(monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("no kernel may be launched for bad input")
    monkeypatch.setattr(pr, "kernel_for", no_launch)
    x = torch.from_numpy(_data(64, seed=50)).to(DEVICE)
    with pytest.raises(TypeError, match="float32 only"):
        pr.reduce_sum(x.double())
    with pytest.raises(TypeError, match="float32 only"):
        pr.reduce_sum(x.to(torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        pr.reduce_sum(x.cpu().numpy())
    with pytest.raises(ValueError, match="not contiguous"):
        pr.reduce_sum(x[::2])
    with pytest.raises(ValueError, match="not contiguous"):
        pr.reduce_sum(x.reshape(8, 8).t())
    with pytest.raises(ValueError, match="is on meta"):
        pr.reduce_sum(torch.empty(8, device="meta"))
    with pytest.raises(ValueError, match="op must be"):
        pr.reduce(x, "mean")
    with pytest.raises(ValueError, match="rung must be"):
        pr.reduce(x, "sum", "fastest")
    for block in (32, 48, 2048):
        with pytest.raises(ValueError, match="power of two"):
            pr.reduce(x, "sum", "sequential", block=block)
    with pytest.raises(ValueError, match="blocks_per_sm"):
        pr.reduce(x, "sum", "grid_stride_atomic", blocks_per_sm=0)


# --- the numerics, on the specs alone (NumPy; fast) ----------------------------------------

@pytest.mark.parametrize("rung", RUNGS)
def test_depth_formula_bounds_the_exact_rounding_count(rung):
    for n in (1, 2, 17, 1000, 4096, 100_003):
        launches = pr.passes(rung, n, 256, 4)
        exact = ro.spec(np.zeros(n, np.float32), "depth", rung, 256, launches)
        exact = int(np.max(exact)) + (len(exact) - 1 if rung == "grid_stride_atomic" else 0)
        assert exact <= ro.rounding_depth(n, rung, 256, launches), (rung, n)


def test_tree_depth_is_exact_for_full_blocks():
    n = 256 * 256
    launches = pr.passes("sequential", n, 256)
    assert ro.spec(np.zeros(n, np.float32), "depth", "sequential", 256, launches) == 16
    assert ro.rounding_depth(n, "sequential", 256, launches) == 16


def test_errors_stay_within_bounds_and_sequential_is_worst():
    x = _data(2**18, seed=60, kind="uniform")
    exact = x.astype(np.float64).sum()
    seq = abs(float(ro.sequential_sum(x)) - exact)
    assert seq <= ro.gamma(x.size - 1) * exact
    for rung in ("sequential", "warp_shuffle", "grid_stride_two_pass"):
        launches = pr.passes(rung, x.size, 256, 4)
        err = abs(float(ro.spec(x, "sum", rung, 256, launches)) - exact)
        assert err <= ro.error_bound(x, rung, 256, launches)
        assert err < seq / 4, (rung, err, seq)  # a tree beats one long chain by far here


def test_sequential_float32_stalls_at_2_to_the_24():
    # 2^24 + 1 is not a float32: adding 1.0 to 16777216.0 rounds back to 16777216.0
    ones = np.ones(2**24 + 100, np.float32)
    assert ro.sequential_sum(ones) == 2**24
    launches = pr.passes("sequential", ones.size, 256)
    assert ro.spec(ones, "sum", "sequential", 256, launches) == ones.size


# --- real sizes on the GPU ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("rung", RUNGS)
def test_gpu_million_elements_bitwise(rung):
    for op in ("sum", "max"):
        _check(_data(1_000_003, seed=70), op, rung)


@pytest.mark.gpu
def test_gpu_two_to_the_28():
    n = 2**28 + 7  # 1 GiB and a ragged tail
    gen = torch.Generator(device="cuda").manual_seed(80)
    x = torch.rand(n, device="cuda", generator=gen) * 2 - 1
    exact = x.double().sum().item()
    abs_sum = x.abs().double().sum().item()
    top = x.max().item()
    for rung in RUNGS:
        launches = pr.passes(rung, n)
        bound = ro.gamma(ro.rounding_depth(n, rung, pr.BLOCK, launches)) * abs_sum
        assert abs(pr.reduce_sum(x, rung=rung).item() - exact) <= bound, rung
        assert pr.reduce_max(x, rung=rung).item() == top, rung


# --- mutation-testing finds (make mutate LESSON=04): what the checks above let through ---


@pytest.mark.parametrize("rung", [r for r in RUNGS if r != "grid_stride_atomic"])
def test_max_of_equal_values_keeps_the_left_operand(rung):
    # _max is `a if a >= b else b`: of two equal operands the left one wins. x[0] is the
    # left operand of every combine it takes part in, so a max over zeros keeps its sign.
    # (`==` cannot see this: -0.0 == 0.0; the sign bit can.) It also sees what a sum
    # cannot: shared memory rotated by one slot (a store to sdata[tid - 1]) folds the same
    # pairs, only with their operands swapped, and a + b == b + a exactly.
    x_np = np.zeros(150, np.float32)   # 2-3 blocks, then a second pass
    x_np[0] = -0.0
    got = pr.reduce_max(torch.from_numpy(x_np).to(DEVICE), rung=rung).item()
    assert got == 0.0 and math.copysign(1.0, got) == -1.0, got


@pytest.fixture
def poisoned_shared(monkeypatch):
    """Under emulation: every block starts with shared memory full of NaN, as if another
    block had just left garbage there (on a GPU it is simply uninitialised). Without it
    the simulator hands each block the previous block's shared array, whose stale words
    are often the very values a thread would have read after the barrier it skipped, so
    a missing syncthreads can pass. With it, a read before the write it should wait for
    gives NaN, which no sum or max turns back into the right answer."""
    if not runtime.is_emulated():
        yield
        return
    from numba.cuda.simulator import kernel as sim_kernel, kernelapi

    arrays = []

    class _PoisonNumpy:  # kernelapi's `np`, with np.empty (shared/local arrays) -> NaN
        def __getattr__(self, name):
            return getattr(np, name)

        def empty(self, shape, dtype=float):
            a = np.empty(shape, dtype)
            if a.dtype.kind == "f":
                a.fill(np.nan)
                arrays.append(a)
            return a

    run = sim_kernel.BlockManager.run

    def run_poisoned(self, grid_point, *args):
        for a in arrays:   # the allocation is reused by every block of the launch
            a.fill(np.nan)
        return run(self, grid_point, *args)

    monkeypatch.setattr(kernelapi, "np", _PoisonNumpy())
    monkeypatch.setattr(sim_kernel.BlockManager, "run", run_poisoned)
    yield


def _first_pass(x_np: np.ndarray, rung: str, grid: int, block: int = pr.BLOCK) -> np.ndarray:
    """One launch of a rung's kernel on x: every block's partial (no wrapper, no 2nd pass)."""
    x = torch.from_numpy(x_np).to(DEVICE)
    out = torch.full((grid,), np.nan, dtype=torch.float32, device=DEVICE)
    pr.kernel_for(rung, "sum", block)[grid, block](pr._view(x), pr._view(out), x_np.size)
    return out.cpu().numpy()


@pytest.mark.parametrize("rung", list(ro.TREE_RUNGS))
def test_each_block_writes_its_own_partial(rung, poisoned_shared):
    # Three blocks, each partial checked bit for bit in its own slot: a block writing its
    # neighbour's slot, or reading one element too far, cannot hide in the final sum (two
    # partials added in swapped order give the same float; three or more need not).
    # n = 3 blocks' worth - 1: the last block is one element short, and for the rungs that
    # add two elements while loading (epb = 2) its last thread finds i + block == n.
    epb = ro.TREE_RUNGS[rung][1]
    x_np = _data(3 * epb * pr.BLOCK - 1, seed=35)
    got = _first_pass(x_np, rung, 3)
    want = ro.tree_pass(x_np, "sum", rung, pr.BLOCK)
    np.testing.assert_array_equal(got, want)


def test_grid_stride_partials_and_loop_bounds(poisoned_shared):
    # 3 blocks (T = 192 threads) over n = 7T + 10: every thread runs the 4-wide loop once,
    # threads 0-9 a second time (thread 9 with i + 3T == n - 1 exactly, the last element
    # the loop may take), the others finish in the tail loop. Partials bit for bit.
    T = 3 * pr.BLOCK
    x_np = _data(7 * T + 10, seed=36)
    got = _first_pass(x_np, "grid_stride_two_pass", 3)
    np.testing.assert_array_equal(got, ro.grid_stride_pass(x_np, "sum", pr.BLOCK, 3))
