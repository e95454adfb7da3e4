"""Standard attention as three Numba-CUDA kernels, with S and P in global memory.

This is "Algorithm 0" of the FlashAttention paper (Dao et al., 2022), the way attention
is computed when nothing is fused:

    1. S = softmax_scale * Q K^T          qk_scores_kernel   writes S  (N x N) to HBM
    2. P = softmax(S) row by row          softmax_rows_kernel reads S, writes P (N x N)
    3. O = P V                            pv_kernel          reads P

The two N x N matrices are what FlashAttention removes: they cost 4 * N^2 * 4 bytes of
HBM traffic per (batch, head) and 2 * N^2 * 4 bytes of memory, where Q, K, V and O cost
only N * d each. ``attention_memory.py`` counts both; lesson 07 avoids them.

Layout follows flash-attn: q (batch, seqlen_q, heads, d), k and v (batch, seqlen_k, heads,
d). S and P are float32 (batch, heads, seqlen_q, seqlen_k) whatever the input dtype (float32
or float16): the softmax is computed in float32, as every attention implementation does.
``causal=True`` masks key j for query i when j > i + seqlen_k - seqlen_q (bottom-right
aligned, like flash-attn >= 2.1 and ``common.reference.attention_ref``); a query that sees
no key at all outputs zeros and lse = +inf.

The two matrix-product kernels share one design, the classic shared-memory tiled matmul
with a register micro-tile (lesson 03's kernel): a block of 16 x 16 threads computes a
64 x 64 tile of the product, each thread a 4 x 4 micro-tile, the operands staged through
shared memory in slices of 32 along the reduction dimension. Lesson 07's kernel uses the
same micro-tiling, so the two lessons differ in the algorithm, not in matmul craft.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common import runtime  # noqa: F401  (selects GPU or simulator before numba loads)
from numba import cuda, float32, uint32
from common.checks import check_attention_inputs
from common.numba_torch import kernel_array

SUPPORTED_HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16)

# GPU: 64 x 64 tiles, 16 x 16 threads, reduction slices of 32, 256 threads per softmax row.
# The simulator runs every CUDA thread as an OS thread: the same code with 16 x 16 tiles
# and 4 x 4 threads there (Numba reads these globals as compile-time constants).
TILE, THREADS, BK, SOFTMAX_THREADS = (64, 16, 32, 256) if runtime.is_gpu() else (16, 4, 16, 32)
TM = TILE // THREADS  # each thread owns a TM x TM micro-tile: rows ty + a*THREADS, cols tx + c*THREADS
BK_PAD = BK + 1       # padded row length of the shared tiles read column-wise (see below)
NEG_INF = float32(-math.inf)


# ----------------------------------------------------------------------------------------
# Kernel 1: S = scale * Q K^T (masked entries -inf)

@cuda.jit
def qk_scores_kernel(q, k, s, softmax_scale, causal):
    """One block computes S[b, h, row0:row0+64, col0:col0+64].

    grid = (ceil(seqlen_k / 64), ceil(seqlen_q / 64), batch * heads), block = (16, 16).
    """
    heads = q.shape[2]
    seqlen_q = q.shape[1]
    seqlen_k = k.shape[1]
    d = q.shape[3]
    bh = cuda.blockIdx.z
    b = bh // heads
    h = bh - b * heads
    row0 = cuda.blockIdx.y * TILE
    col0 = cuda.blockIdx.x * TILE
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * THREADS + tx
    # Unsigned indices in the inner loop: for a signed index Numba emits Python's
    # negative-index wraparound (if i < 0: i += n), integer instructions that compete with
    # the FMAs for issue slots. (Never mix: Numba turns uint + int64 into float64.)
    tyu = uint32(ty)
    txu = uint32(tx)

    # +1 padding: 16 threads of a warp read 16 different rows of k_s at the same column;
    # a row stride of 33 floats puts them in 16 different banks (32 would be 1 bank).
    q_s = cuda.shared.array((TILE, BK_PAD), float32)
    k_s = cuda.shared.array((TILE, BK_PAD), float32)
    acc = cuda.local.array((TM, TM), float32)
    q_reg = cuda.local.array(TM, float32)
    k_reg = cuda.local.array(TM, float32)
    for a in range(TM):
        for c in range(TM):
            acc[a, c] = float32(0.0)

    for x0 in range(0, d, BK):
        # Stage Q[row0:+64, x0:+32] and K[col0:+64, x0:+32]: consecutive threads read
        # consecutive x, so each warp reads 128 contiguous bytes (coalesced).
        for t in range(tid, TILE * BK, THREADS * THREADS):
            r = t // BK
            x = t - r * BK
            q_s[r, x] = float32(q[b, row0 + r, h, x0 + x]) if row0 + r < seqlen_q else float32(0.0)
            k_s[r, x] = float32(k[b, col0 + r, h, x0 + x]) if col0 + r < seqlen_k else float32(0.0)
        cuda.syncthreads()
        for x in range(BK):
            xu = uint32(x)  # unsigned shared-memory indices: see "tyu" above
            for a in range(TM):
                q_reg[a] = q_s[tyu + uint32(a * THREADS), xu]
            for c in range(TM):
                k_reg[c] = k_s[txu + uint32(c * THREADS), xu]
            for a in range(TM):
                for c in range(TM):
                    acc[a, c] += q_reg[a] * k_reg[c]
        cuda.syncthreads()

    diag = seqlen_k - seqlen_q  # causal: query r sees keys c <= r + diag
    for a in range(TM):
        r = row0 + ty + a * THREADS
        if r < seqlen_q:
            for c in range(TM):
                col = col0 + tx + c * THREADS
                if col < seqlen_k:
                    val = acc[a, c] * softmax_scale
                    if causal and col > r + diag:
                        val = NEG_INF
                    s[b, h, r, col] = val


# ----------------------------------------------------------------------------------------
# Kernel 2: P = softmax(S) per row, the safe (max-subtracted) softmax in three passes

@cuda.jit
def softmax_rows_kernel(s, p, lse):
    """One block per row of S: grid = (seqlen_q, heads, batch), block = 256 threads.

    Pass 1 finds m = max_j S[j], pass 2 sums l = sum_j exp(S[j] - m), pass 3 writes
    P[j] = exp(S[j] - m) / l. Subtracting m keeps every exp() <= 1 (no overflow) and
    changes nothing mathematically (docs/flash_attention/01_theory.md, "safe softmax").
    Also stores lse = m + log(l), what the backward pass of any attention needs.
    """
    r = cuda.blockIdx.x
    h = cuda.blockIdx.y
    b = cuda.blockIdx.z
    n = s.shape[3]
    tid = cuda.threadIdx.x
    red = cuda.shared.array(SOFTMAX_THREADS, float32)

    # pass 1: row max (each thread a strided part, then a tree reduction in shared memory)
    m = NEG_INF
    for c in range(tid, n, SOFTMAX_THREADS):
        m = max(m, s[b, h, r, c])
    red[tid] = m
    cuda.syncthreads()
    stride = SOFTMAX_THREADS // 2
    while stride > 0:
        if tid < stride:
            red[tid] = max(red[tid], red[tid + stride])
        cuda.syncthreads()
        stride //= 2
    m = red[0]
    cuda.syncthreads()  # everyone has read red[0] before it is reused

    if m == NEG_INF:  # causal row that sees no key: P = 0, lse = +inf (reference convention)
        for c in range(tid, n, SOFTMAX_THREADS):
            p[b, h, r, c] = float32(0.0)
        if tid == 0:
            lse[b, h, r] = float32(math.inf)
        return

    # pass 2: l = sum exp(S - m)
    l = float32(0.0)
    for c in range(tid, n, SOFTMAX_THREADS):
        l += math.exp(s[b, h, r, c] - m)
    red[tid] = l
    cuda.syncthreads()
    stride = SOFTMAX_THREADS // 2
    while stride > 0:
        if tid < stride:
            red[tid] += red[tid + stride]
        cuda.syncthreads()
        stride //= 2
    l = red[0]

    # pass 3: P = exp(S - m) / l
    inv_l = float32(1.0) / l
    for c in range(tid, n, SOFTMAX_THREADS):
        p[b, h, r, c] = math.exp(s[b, h, r, c] - m) * inv_l
    if tid == 0:
        lse[b, h, r] = m + math.log(l)


# ----------------------------------------------------------------------------------------
# Kernel 3: O = P V

@cuda.jit
def pv_kernel(p, v, o):
    """One block computes O[b, row0:row0+64, h, col0:col0+64] = P[b, h, rows, :] V[b, :, h, cols].

    grid = (ceil(d / 64), ceil(seqlen_q / 64), batch * heads), block = (16, 16). The
    reduction runs over all seqlen_k keys, 32 at a time. Columns past d (d = 32) are
    computed on zeros and not stored.
    """
    heads = o.shape[2]
    seqlen_q = p.shape[2]
    seqlen_k = p.shape[3]
    d = v.shape[3]
    bh = cuda.blockIdx.z
    b = bh // heads
    h = bh - b * heads
    row0 = cuda.blockIdx.y * TILE
    col0 = cuda.blockIdx.x * TILE
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * THREADS + tx
    tyu = uint32(ty)  # unsigned inner-loop indices, as in qk_scores_kernel
    txu = uint32(tx)

    p_s = cuda.shared.array((TILE, BK_PAD), float32)  # P[rows, x0:x0+32] (+1: see above)
    v_s = cuda.shared.array((BK, TILE), float32)      # V[x0:x0+32, cols]: read along a row
    acc = cuda.local.array((TM, TM), float32)
    p_reg = cuda.local.array(TM, float32)
    v_reg = cuda.local.array(TM, float32)
    for a in range(TM):
        for c in range(TM):
            acc[a, c] = float32(0.0)

    for x0 in range(0, seqlen_k, BK):
        for t in range(tid, TILE * BK, THREADS * THREADS):
            r = t // BK
            x = t - r * BK
            ok = row0 + r < seqlen_q and x0 + x < seqlen_k
            p_s[r, x] = p[b, h, row0 + r, x0 + x] if ok else float32(0.0)
            x = t // TILE
            c = t - x * TILE
            ok = x0 + x < seqlen_k and col0 + c < d
            v_s[x, c] = float32(v[b, x0 + x, h, col0 + c]) if ok else float32(0.0)
        cuda.syncthreads()
        for x in range(BK):
            xu = uint32(x)
            for a in range(TM):
                p_reg[a] = p_s[tyu + uint32(a * THREADS), xu]
            for c in range(TM):
                v_reg[c] = v_s[xu, txu + uint32(c * THREADS)]
            for a in range(TM):
                for c in range(TM):
                    acc[a, c] += p_reg[a] * v_reg[c]
        cuda.syncthreads()

    for a in range(TM):
        r = row0 + ty + a * THREADS
        if r < seqlen_q:
            for c in range(TM):
                col = col0 + tx + c * THREADS
                if col < d:
                    o[b, r, h, col] = acc[a, c]  # cast to o's dtype (float16 or float32)


# ----------------------------------------------------------------------------------------
# Host side: validation, allocation, launches



def check_inputs(q, k, v, softmax_scale):
    """Validate before any launch; return (softmax_scale as float)."""
    scale = check_attention_inputs(q, k, v, softmax_scale, dtypes=SUPPORTED_DTYPES,
                                   head_dims=SUPPORTED_HEAD_DIMS)
    if q.shape[0] * q.shape[2] > 65535:
        raise ValueError("batch * heads must be <= 65535 (the grid's z dimension)")
    return scale


def scores(q, k, softmax_scale: float, causal: bool = False, s=None):
    """Kernel 1 alone: S (batch, heads, seqlen_q, seqlen_k) float32."""
    batch, seqlen_q, heads, _ = q.shape
    seqlen_k = k.shape[1]
    if s is None:
        s = torch.empty(batch, heads, seqlen_q, seqlen_k, dtype=torch.float32, device=q.device)
    grid = (math.ceil(seqlen_k / TILE), math.ceil(seqlen_q / TILE), batch * heads)
    qk_scores_kernel[grid, (THREADS, THREADS)](
        kernel_array(q), kernel_array(k), kernel_array(s),
        np.float32(softmax_scale), bool(causal))
    return s


def softmax_rows(s, p=None, lse=None):
    """Kernel 2 alone: P (same shape as S) and lse (batch, heads, seqlen_q), float32."""
    batch, heads, seqlen_q, _ = s.shape
    if p is None:
        p = torch.empty_like(s)
    if lse is None:
        lse = torch.empty(batch, heads, seqlen_q, dtype=torch.float32, device=s.device)
    softmax_rows_kernel[(seqlen_q, heads, batch), SOFTMAX_THREADS](
        kernel_array(s), kernel_array(p), kernel_array(lse))
    return p, lse


def pv(p, v, out):
    """Kernel 3 alone: out (batch, seqlen_q, heads, d) = P V."""
    batch, seqlen_q, heads, d = out.shape
    grid = (math.ceil(d / TILE), math.ceil(seqlen_q / TILE), batch * heads)
    pv_kernel[grid, (THREADS, THREADS)](
        kernel_array(p), kernel_array(v), kernel_array(out))
    return out


def standard_attention(q, k, v, softmax_scale: float | None = None, causal: bool = False,
                       out=None, return_sp: bool = False):
    """Attention with S and P materialized: returns (out, lse), or (out, lse, S, P).

    out: (batch, seqlen_q, heads, d) in q's dtype (pass ``out=`` to write into a
    preallocated tensor); lse: (batch, heads, seqlen_q) float32, +inf for empty rows.
    """
    scale = check_inputs(q, k, v, softmax_scale)
    batch, seqlen_q, heads, d = q.shape
    seqlen_k = k.shape[1]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}")
    lse = torch.empty(batch, heads, seqlen_q, dtype=torch.float32, device=q.device)
    if batch * heads * seqlen_q == 0:  # nothing to compute: no launch
        return (out, lse, None, None) if return_sp else (out, lse)
    if seqlen_k == 0:  # no keys at all: every row is empty
        out.zero_()
        lse.fill_(math.inf)
        return (out, lse, None, None) if return_sp else (out, lse)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    s = scores(q, k, scale, causal)
    p, lse = softmax_rows(s, lse=lse)
    pv(p, v, out)
    return (out, lse, s, p) if return_sp else (out, lse)
