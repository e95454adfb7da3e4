"""Matrix multiply in Numba-CUDA, float32: three rungs of a ladder, one idea each.

C (M x N) = A (M x K) @ B (K x N) costs 2*M*N*K floating-point operations and needs at
least (M*K + K*N + M*N) * 4 bytes of memory traffic. At 4096^3 that is 137 GFLOP against
201 MB: 683 FLOP per byte, far above what an H100 needs to be compute-bound (~67 TFLOPS
of FP32 FMA / ~3 TB/s = 22 FLOP/byte). So a matmul *can* run at the FMA peak - if every
byte fetched from memory is reused enough times. Each rung raises that reuse, the
*arithmetic intensity* of the kernel (FLOPs per byte it actually moves):

1. ``matmul_naive_kernel``: one thread per C element, a loop over k reading A[row, k]
   and B[k, col] straight from global memory. 2 FLOPs per 8 bytes loaded = 0.25 FLOP/B
   from the memory hierarchy; only the L1/L2 caches keep it from being hopeless.
2. ``matmul_tiled_kernel``: a 16x16 block of threads stages a 16x16 tile of A and of B in
   shared memory, then each thread reads its row/column of the tiles from there. Every
   element loaded from global memory is used 16 times: 16 / 4 = 4 FLOP per global byte.
   But each FMA still reads two operands from shared memory (0.25 FLOP per shared byte):
   shared-memory bandwidth is the new wall.
3. ``matmul_regblock_kernel``: a 256-thread block owns a 128x128 tile of C; each thread
   owns an 8x8 sub-tile held in 64 *registers*. Per step k it loads 8 values of A and 8
   of B from shared memory (four 16-byte loads) and does 64 FMAs with them: 128 FLOPs
   per 64 shared bytes = 2 FLOP/B (8x the tiled kernel), and 128x128 tiles reuse every
   global element 128 times (32 FLOP/B). Two shared buffers let the loads of the next
   K-slice (global -> registers) overlap the FMAs of this one; one barrier per slice.

Any M, N, K and any strides (row-major, transposed, sliced): every kernel gets each
matrix's memory as a flat 1-D array (from its first to its last element) plus its element
strides, and addresses A[m, k] as ``a[m * sa0 + k * sa1]`` itself. (Numba's 2-D arrays
carry strides too, but the simulator refuses non-contiguous ones, and explicit strides
let the fast kernel update one running index per operand instead of recomputing 2-D
addresses; one compiled kernel serves every layout.) float32 only: the lesson is about FP32 FMA pipes; tensor cores are
lesson 03's Triton half (``matmul_triton``).
"""

from __future__ import annotations

import math

from common import runtime

import torch
from numba import cuda, float32, uint64
from common.numba_torch import kernel_array, torch_stream

from matmul_operands import check_matmul_operands, max_element_offset, output_for


# Under emulation, common.runtime makes the simulator's cuda.shared.array thread-safe:
# without that, two threads could get different "shared" tiles (a wrong row now and then).

DTYPES = (torch.float32,)
WHY_NOT = {torch.float16: "these Numba kernels are the FP32 rungs; use matmul_triton for "
                          "16-bit inputs on tensor cores",
           torch.bfloat16: "Numba has no bfloat16 arrays; use matmul_triton"}

# --- 1. naive -------------------------------------------------------------------------------
NAIVE_BLOCK = 16  # 16 x 16 threads; x runs along N so a warp reads consecutive B[k, col]


@cuda.jit
def matmul_naive_kernel(a, sa0, sa1, b, sb0, sb1, c, sc0, sc1, M, N, K):
    # a, b, c: each matrix's memory as a flat array; A[m, k] is a[m * sa0 + k * sa1].
    col, row = cuda.grid(2)          # x -> column, y -> row
    if row < M and col < N:
        acc = float32(0.0)
        for k in range(K):
            acc += a[row * sa0 + k * sa1] * b[k * sb0 + col * sb1]
        c[row * sc0 + col * sc1] = acc


# --- 2. shared-memory tiles -----------------------------------------------------------------
TILE = 16


@cuda.jit
def matmul_tiled_kernel(a, sa0, sa1, b, sb0, sb1, c, sc0, sc1, M, N, K):
    a_s = cuda.shared.array((TILE, TILE), float32)
    b_s = cuda.shared.array((TILE, TILE), float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    col = cuda.blockIdx.x * TILE + tx
    row = cuda.blockIdx.y * TILE + ty
    acc = float32(0.0)
    for k0 in range(0, K, TILE):
        # Each thread copies one element of each tile (zero outside the matrices, so the
        # inner loop needs no bounds checks) ...
        a_s[ty, tx] = a[row * sa0 + (k0 + tx) * sa1] if row < M and k0 + tx < K else float32(0.0)
        b_s[ty, tx] = b[(k0 + ty) * sb0 + col * sb1] if k0 + ty < K and col < N else float32(0.0)
        cuda.syncthreads()           # ... the whole tile is loaded before anyone reads it
        for k in range(TILE):
            acc += a_s[ty, k] * b_s[k, tx]  # a_s[ty, k]: broadcast; b_s[k, tx]: 16 banks
        cuda.syncthreads()           # ... and read by everyone before it is overwritten
    if row < M and col < N:
        c[row * sc0 + col * sc1] = acc


# --- 3. register blocking -------------------------------------------------------------------
BM, BN, BK = 128, 128, 8   # block tile of C, and the K-slice staged in shared memory
TM, TN = 8, 8              # per-thread tile of C: 64 accumulators in registers
RB_THREADS = (BM // TM) * (BN // TN)  # 256 threads = 16 x 16
A_ROW = BM + 4             # a_s rows padded 128 -> 132 floats: conflict-free transposed stores
assert BK == 8 and TM == 8 and TN == 8 and BM == BN == 128 and RB_THREADS == 256, \
    "the index arithmetic below is written out for this shape"

# 16-byte alignment lets the compiler merge four float loads into one ld.shared.v4 (LDS.128);
# the simulator has no alignment option, and its arrays are NumPy arrays anyway.
_SMEM_ALIGN = None if runtime.is_emulated() else 16
# At most 128 registers per thread, so two 256-thread blocks fit on an SM (65536
# registers): while one block waits at its barrier, the other computes. Checked with
# ptxas: 128 registers, no spills.
_RB_JIT = {} if runtime.is_emulated() else {"launch_bounds": (RB_THREADS, 2)}


@cuda.jit(device=True, inline="always")
def _rb_step(a_s, b_s, buf, k, tx, ty, acc, a_frag, b_frag):
    """One k of the K-slice: 16 values from shared memory, 64 FMAs in registers.

    Thread (ty, tx) owns C rows {4ty..4ty+3, 64+4ty..64+4ty+3} and the same pattern of
    columns with tx: four consecutive floats per group, so each group is one 16-byte
    shared load; a warp's 16 tx read 256 contiguous bytes of b_s (no bank conflicts) and
    its two ty read two 16-byte words of a_s (broadcast)."""
    for i in range(4):
        a_frag[i] = a_s[buf, k, 4 * ty + i]
        a_frag[4 + i] = a_s[buf, k, 64 + 4 * ty + i]
    for j in range(4):
        b_frag[j] = b_s[buf, k, 4 * tx + j]
        b_frag[4 + j] = b_s[buf, k, 64 + 4 * tx + j]
    for i in range(TM):
        for j in range(TN):
            acc[i, j] += a_frag[i] * b_frag[j]  # the outer product: 64 independent FMAs


@cuda.jit(**_RB_JIT)
def matmul_regblock_kernel(a, sa0, sa1, b, sb0, sb1, c, sc0, sc1, M, N, K):
    """Addressing as in the other rungs (flat storage + strides), which lets each thread
    keep one running index per operand and add a constant per K-slice, instead of
    recomputing a 2-D address for every load."""
    tid = cuda.threadIdx.x
    # Bit operations, not % and //: they tell LLVM the indices are small and non-negative,
    # so Numba's negative-index wraparound code folds away (seen in the PTX: without it,
    # every shared load carried 5 extra integer instructions).
    tx = tid & 15
    ty = (tid >> 4) & 15
    row0 = cuda.blockIdx.y * BM
    col0 = cuda.blockIdx.x * BN

    a_s = cuda.shared.array((2, BK, A_ROW), float32, alignment=_SMEM_ALIGN)  # A^T slices
    b_s = cuda.shared.array((2, BK, BN), float32, alignment=_SMEM_ALIGN)
    acc = cuda.local.array((TM, TN), float32)  # registers: only constant indices below
    a_frag = cuda.local.array(TM, float32)
    b_frag = cuda.local.array(TN, float32)
    a_next = cuda.local.array(4, float32)      # the next K-slice, on its way from memory
    b_next = cuda.local.array(4, float32)
    for i in range(TM):
        for j in range(TN):
            acc[i, j] = 0.0

    # Who copies what: the A slice (128 rows x 8 k) as 8 k-neighbours x 32 rows, 4 times
    # (a warp reads 4 rows x 32 contiguous bytes when A is row-major); the B slice (8 k x
    # 128 columns) as one k-row of 32 neighbours, 4 times (128 contiguous bytes).
    a_k = tid & 7
    a_r = (tid >> 3) & 31
    b_k = (tid >> 5) & 7
    b_c = tid & 31
    ia = (row0 + a_r) * sa0 + a_k * sa1    # index of A[row0 + a_r, a_k]; +32 rows: + da
    ib = b_k * sb0 + (col0 + b_c) * sb1    # index of B[b_k, col0 + b_c]; +32 cols: + db
    da = 32 * sa0
    db = 32 * sb1
    n_slices = (K + BK - 1) // BK
    interior = row0 + BM <= M and col0 + BN <= N  # the whole block tile is inside C

    for s in range(n_slices + 1):
        buf = s & 1
        # (1) Global loads of slice s into registers, issued now, used after step (2).
        if s < n_slices:
            if interior and (s + 1) * BK <= K:
                # Fast path (all but the edge blocks and the last slice): no checks.
                # uint64 indices: Numba adds negative-index wraparound code for signed ones.
                for e in range(4):
                    a_next[e] = a[uint64(ia + e * da)]
                    b_next[e] = b[uint64(ib + e * db)]
            else:
                # Edges: elements outside A or B become 0, so the FMAs need no checks.
                # Their load reads index 0 instead (always valid): no branch per load.
                k_ok_a = s * BK + a_k < K
                k_ok_b = s * BK + b_k < K
                for e in range(4):
                    ok = k_ok_a and row0 + a_r + 32 * e < M
                    v = a[uint64(ia + e * da) if ok else uint64(0)]
                    a_next[e] = v if ok else float32(0.0)
                    ok = k_ok_b and col0 + b_c + 32 * e < N
                    v = b[uint64(ib + e * db) if ok else uint64(0)]
                    b_next[e] = v if ok else float32(0.0)
            ia += BK * sa1
            ib += BK * sb0
        # (2) FMAs on slice s-1 (in buffer 1-buf) while those loads are in flight.
        # BK = 8 steps, written out: Numba has no unroll pragma, and LLVM does not unroll
        # a loop body this large; written out, every shared address is a constant offset.
        if s > 0:
            cb = 1 - buf
            _rb_step(a_s, b_s, cb, 0, tx, ty, acc, a_frag, b_frag)
            _rb_step(a_s, b_s, cb, 1, tx, ty, acc, a_frag, b_frag)
            _rb_step(a_s, b_s, cb, 2, tx, ty, acc, a_frag, b_frag)
            _rb_step(a_s, b_s, cb, 3, tx, ty, acc, a_frag, b_frag)
            _rb_step(a_s, b_s, cb, 4, tx, ty, acc, a_frag, b_frag)
            _rb_step(a_s, b_s, cb, 5, tx, ty, acc, a_frag, b_frag)
            _rb_step(a_s, b_s, cb, 6, tx, ty, acc, a_frag, b_frag)
            _rb_step(a_s, b_s, cb, 7, tx, ty, acc, a_frag, b_frag)
        # (3) Registers -> shared buffer `buf`. Nobody reads `buf` now: its last readers
        # (slice s-2) all passed the barrier at the end of the previous iteration.
        if s < n_slices:
            for e in range(4):
                a_s[buf, a_k, a_r + 32 * e] = a_next[e]  # transposed: a_s[k, m], so step (2)
                b_s[buf, b_k, b_c + 32 * e] = b_next[e]  # reads 4 consecutive rows at once
        cuda.syncthreads()  # one barrier per slice: `buf` is complete before it is read

    for i in range(TM):
        r = row0 + 64 * (i // 4) + 4 * ty + i % 4
        if r < M:
            for j in range(TN):
                cc = col0 + 64 * (j // 4) + 4 * tx + j % 4
                if cc < N:
                    c[r * sc0 + cc * sc1] = acc[i, j]


# --- wrappers ---------------------------------------------------------------------------------


def _prepare(a, b, out, who):
    M, N, K = check_matmul_operands(a, b, dtypes=DTYPES, who=who, why_not=WHY_NOT)
    c = output_for(a, b, out, M, N, who)
    if M == 0 or N == 0:
        return None, c                 # empty result: nothing to launch
    if K == 0:
        return None, c.zero_()         # a sum over nothing is 0; no launch
    return (M, N, K), c


def _storage_1d(t: torch.Tensor) -> torch.Tensor:
    """The memory ``t`` spans, from its first element to its last, as a 1-D view."""
    return torch.as_strided(t.detach(), (max_element_offset(t) + 1,), (1,))


def _launch(kernel, grid, block, a, b, c, M, N, K):
    kernel[grid, block, torch_stream()](
        kernel_array(_storage_1d(a)), a.stride(0), a.stride(1),
        kernel_array(_storage_1d(b)), b.stride(0), b.stride(1),
        kernel_array(_storage_1d(c)), c.stride(0), c.stride(1), M, N, K)


def matmul_naive(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """C = A @ B, one thread per element of C."""
    shape, c = _prepare(a, b, out, "matmul_naive")
    if shape:
        M, N, K = shape
        grid = (math.ceil(N / NAIVE_BLOCK), math.ceil(M / NAIVE_BLOCK))
        _launch(matmul_naive_kernel, grid, (NAIVE_BLOCK, NAIVE_BLOCK), a, b, c, M, N, K)
    return c


def matmul_tiled(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """C = A @ B with 16x16 shared-memory tiles."""
    shape, c = _prepare(a, b, out, "matmul_tiled")
    if shape:
        M, N, K = shape
        grid = (math.ceil(N / TILE), math.ceil(M / TILE))
        _launch(matmul_tiled_kernel, grid, (TILE, TILE), a, b, c, M, N, K)
    return c


def matmul_regblock(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """C = A @ B, 128x128 block tiles, 8x8 register tiles per thread, any strides."""
    shape, c = _prepare(a, b, out, "matmul_regblock")
    if shape:
        M, N, K = shape
        grid = (math.ceil(N / BN), math.ceil(M / BM))
        _launch(matmul_regblock_kernel, grid, RB_THREADS, a, b, c, M, N, K)
    return c


RUNGS = {
    "numba naive": matmul_naive,
    "numba tiled 16x16": matmul_tiled,
    "numba regblock 128x128/8x8": matmul_regblock,
}
