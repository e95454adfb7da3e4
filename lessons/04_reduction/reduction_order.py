"""The order in which each rung combines the numbers: NumPy specs, and the error it costs.

Floating-point addition is not associative: (a + b) + c and a + (b + c) can differ in
the last bit, so two correct reductions of the same array may disagree. What a kernel
computes is fixed by the *tree* of additions it performs. This module writes each rung's
tree in vectorised NumPy (float32, one rounding per addition, like the GPU), so that

* the tests can demand **bitwise** equality between a kernel and its spec (every rung
  except the atomic one, whose blocks add in whatever order they finish);
* the **error bound** of each order can be computed exactly: if no element of x goes
  through more than ``d`` roundings on its way to the result, then (Higham, *Accuracy
  and Stability of Numerical Algorithms*, 2nd ed., section 4.2)

      |computed - exact| <= gamma(d) * sum(|x_i|),   gamma(d) = d*u / (1 - d*u),

  with u = 2^-24 for float32. Summing left to right, the first element goes through
  ``n - 1`` roundings; a balanced tree caps that at ``ceil(log2 n)``. The bound is the
  worst case; errors of random sign grow like ``sqrt(d) * u`` instead (the README plots
  both against measurements).

``spec(x, op, rung, block, grid)`` runs with ``op`` = ``"sum"``, ``"max"``, or ``"depth"``:
the same tree over *rounding counts* instead of values (combining two real partials
costs one rounding more than the deeper of them; combining with the identity used as
padding, 0 + x = x, is exact and costs none), which yields ``d`` for the bound.

Max is exact in any order (it never rounds): its spec must match bit for bit everywhere.
"""

from __future__ import annotations

import math

import numpy as np

U = 2.0 ** -24   # unit roundoff of float32 (round to nearest): half the gap above 1.0

TREE_RUNGS = {"interleaved_divergent": ("pairs", 1), "interleaved_strided": ("pairs", 1),
              "sequential": ("halves", 1), "first_add": ("halves", 2),
              "unroll_last_warp": ("halves", 2), "warp_shuffle": ("warps", 2)}
GRID_STRIDE_RUNGS = ("grid_stride_atomic", "grid_stride_two_pass")
NO_ROUNDING = -1  # "depth" of the padding identity: combining with it is exact


def _depth_combine(a, b):
    deeper = np.maximum(a, b) + np.int32(1)
    return np.where(a == NO_ROUNDING, b, np.where(b == NO_ROUNDING, a, deeper))


def _op(op: str):
    """(combine, identity, dtype) of an operation on NumPy arrays."""
    if op == "sum":
        return np.add, np.float32(0.0), np.float32
    if op == "max":
        return np.maximum, np.float32(-np.inf), np.float32
    if op == "depth":
        return _depth_combine, np.int32(NO_ROUNDING), np.int32
    raise ValueError(f"op must be sum, max or depth, got {op!r}")


def leaves(x: np.ndarray, op: str) -> np.ndarray:
    """The values the tree starts from: x itself, or 0 roundings for every element."""
    return np.zeros(x.size, np.int32) if op == "depth" else np.asarray(x, np.float32)


def _pad(v, size, identity, dtype):
    out = np.full(size, identity, dtype)
    out[:v.size] = v
    return out


def _halve_last_axis(v, combine):
    """sdata[tid] = sdata[tid] (+) sdata[tid + s], s = width/2, width/4, ..., 1."""
    while v.shape[-1] > 1:
        h = v.shape[-1] // 2
        v = combine(v[..., :h], v[..., h:])
    return v[..., 0]


def _pairs_last_axis(v, combine):
    """sdata[2st] = sdata[2st] (+) sdata[2st + s], s = 1, 2, ...: neighbours first."""
    while v.shape[-1] > 1:
        v = combine(v[..., 0::2], v[..., 1::2])
    return v[..., 0]


def _block_reduce(v, combine, identity, dtype, block):
    """parallel_reduction.make_block_reduce: (grid, block) values -> (grid,)."""
    grid = v.shape[0]
    nwarps = block // 32
    v = _halve_last_axis(v.reshape(grid, nwarps, 32), combine)   # shfl_down 16, 8, 4, 2, 1
    padded = np.full((grid, 32), identity, dtype)                # warp 0: lane < nwarps
    padded[:, :nwarps] = v
    return _halve_last_axis(padded, combine)


def tree_pass(v: np.ndarray, op: str, rung: str, block: int) -> np.ndarray:
    """One launch of rungs 1-6: every block's partial."""
    combine, identity, dtype = _op(op)
    shape, epb = TREE_RUNGS[rung]
    grid = math.ceil(v.size / (epb * block))
    t = _pad(v, grid * epb * block, identity, dtype).reshape(grid, epb * block)
    if epb == 2:  # first add during load: x[i] (+) x[i + block]
        t = combine(t[:, :block], t[:, block:])
    if shape == "pairs":
        return _pairs_last_axis(t, combine)
    if shape == "halves":
        return _halve_last_axis(t, combine)
    return _block_reduce(t, combine, identity, dtype, block)


def grid_stride_pass(v: np.ndarray, op: str, block: int, grid: int) -> np.ndarray:
    """One launch of parallel_reduction.make_grid_stride: every block's partial.

    Thread t (of T = grid*block) walks i = t, t+T, ...: while i + 3T < n it adds x[i],
    x[i+T], x[i+2T], x[i+3T] into a0..a3 and steps 4T; the 0-3 elements left go into a0.
    """
    combine, identity, dtype = _op(op)
    n = v.size
    T = grid * block
    t = np.arange(T)
    acc = [np.full(T, identity, dtype) for _ in range(4)]
    i = t.copy()
    while True:
        full = i + 3 * T < n
        if not full.any():
            break
        for k in range(4):
            idx = np.where(full, i + k * T, 0)
            acc[k] = np.where(full, combine(acc[k], v[idx]), acc[k])
        i = np.where(full, i + 4 * T, i)
    while True:
        left = i < n
        if not left.any():
            break
        acc[0] = np.where(left, combine(acc[0], v[np.where(left, i, 0)]), acc[0])
        i = np.where(left, i + T, i)
    per_thread = combine(combine(acc[0], acc[1]), combine(acc[2], acc[3]))
    return _block_reduce(per_thread.reshape(grid, block), combine, identity, dtype, block)


def spec(x: np.ndarray, op: str, rung: str, block: int, launches: list[tuple[int, int]]):
    """What ``parallel_reduction.reduce(x, op, rung, block)`` computes, launch by launch.

    ``launches`` is ``parallel_reduction.passes(rung, n, block, ...)``: [(grid, n_in)].
    Returns a float32 scalar (an int rounding count for ``op="depth"``). For the atomic
    rung it returns the per-block partials (the order they are added in is not fixed):
    use :func:`atomic_result_bound`.
    """
    v = leaves(x, op)
    if v.size == 0:
        return _op(op)[1]
    for grid, n_in in launches:
        assert v.size == n_in, (v.size, n_in)
        v = (grid_stride_pass(v, op, block, grid) if rung in GRID_STRIDE_RUNGS
             else tree_pass(v, op, rung, block))
    if rung == "grid_stride_atomic":
        return v
    assert v.size == 1
    return v[0]


def sequential_sum(x: np.ndarray) -> np.float32:
    """Left to right in float32, one rounding per element: what a single thread's loop
    (or a CPU's naive ``for``) computes. ``cumsum`` is strictly sequential."""
    return np.float32(0) if x.size == 0 else np.cumsum(x, dtype=np.float32)[-1]


def gamma(d: int) -> float:
    """Higham's gamma_d = d u / (1 - d u): the relative bound of d roundings."""
    return math.inf if d * U >= 1 else d * U / (1 - d * U)


def _chain(n: int, threads: int) -> int:
    """Roundings of the longest running value of a grid-stride pass: thread 0 owns
    ceil(n/T) elements, a quarter of them (plus up to 3 left-overs) in a0; the first
    addition to the identity is exact."""
    return max(math.ceil(math.ceil(n / threads) / 4) + 3 - 1, 0)


def rounding_depth(n: int, rung: str, block: int, launches) -> int:
    """An upper bound on the roundings any element goes through (n >= 1); equal to the
    exact count of ``spec(..., op="depth")`` when blocks are full (the tests check it
    never falls below)."""
    if rung == "sequential_cpu":
        return max(n - 1, 0)
    log_block = int(math.log2(block))
    if rung in TREE_RUNGS:
        epb = TREE_RUNGS[rung][1]
        return len(launches) * (log_block + epb - 1)
    d = 0
    for grid, n_in in launches:  # a0..a3 chains, (a0+a1)+(a2+a3), block tree
        d += _chain(n_in, grid * block) + 2 + log_block
    if rung == "grid_stride_atomic":  # blocks added one after another, in any order:
        d += launches[0][0] - 1         # the first one in goes through G-1 more roundings
    return d


def error_bound(x: np.ndarray, rung: str, block: int, launches) -> float:
    """gamma(depth) * sum|x|: no result of this rung can be further from the exact sum."""
    return gamma(rounding_depth(x.size, rung, block, launches)) * float(
        np.abs(x.astype(np.float64)).sum())


def atomic_result_bound(partials: np.ndarray) -> tuple[float, float]:
    """(exact sum of the blocks' partials, bound on the rounding of adding them in any
    order): the atomic rung's result must lie within it."""
    p = partials.astype(np.float64)
    return float(p.sum()), gamma(max(partials.size - 1, 0)) * float(np.abs(p).sum())
