"""FlashAttention-2 in Triton: the kernels, forward and backward.

The public functions are flash-attn 2.8.3's, in flash_attn_interface.py (also importable
from here, as with flash-attn: ``from flash_attn import flash_attn_func``):

    out = flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                          window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                          deterministic=False, return_attn_probs=False)

q (batch, seqlen_q, heads_q, headdim), k and v (batch, seqlen_k, heads_k, headdim), heads_q a
multiple of heads_k (MQA/GQA); varlen takes packed (total_tokens, heads, headdim) tensors and
int32 cumulative lengths. float16/bfloat16, any headdim 1..256 (padded to a power of two
inside the kernels). Differentiable: dq, dk, dv (dk and dv summed over each group of query
heads). Causal is aligned bottom-right; a query row that sees no key outputs zeros and has
lse = +inf.

flash-attn 2.8.3's options are in the kernels, with its semantics (the public interface with
them is flash_attn_interface.py; ``_Problem`` normalises them as flash_api.cpp does): a
sliding window (key blocks outside it are never loaded: O(n * window)), softcap
(S = c * tanh(S / c), its derivative in the backward), ALiBi slopes, and cu_seqlens that are
clamped on the device, so that no value can make a kernel read or write outside its tensors.
Each option is a constexpr flag: without it the kernel compiles to the plain code.

The algorithm (Dao, 2023), in the names of the paper:

* forward: one program owns BLOCK_M query rows of one (sequence, head) and walks the K/V
  blocks, keeping the running row max ``m_i``, the running sum ``l_i`` and the unnormalised
  output ``acc`` on chip; it divides by ``l_i`` once at the end and stores
  ``lse = m_i + log(l_i)`` for the backward pass;
* backward: a pre-pass computes ``delta = rowsum(dO * O)``; one kernel owns a block of keys
  and walks the query blocks to accumulate dK and dV (recomputing P from Q, K and lse);
  a second kernel owns a block of queries and walks the keys for dQ (no atomics).

Speed on Hopper (each measured in ``main.py --ablation`` and docs/flash_attention/04):
exp2 with log2(e) folded into the scale; causal blocks above the diagonal skipped and the
diagonal handled in a separate masked stage; tensor descriptors (TMA) built in the kernel;
tiles and pipelining autotuned per (seqlen, headdim, causal).

Runs on the GPU (triton 3.6) and under the Triton interpreter (triton 3.9; no block
pointers anywhere). Under the interpreter bf16 ``tl.dot`` is broken, so the dots are
computed in float32 there (``DOT_FP32``); tests run that path.
"""

from __future__ import annotations

import functools
import os

from common import runtime  # selects GPU or interpreter before triton is imported

import torch
import triton
import triton.language as tl

INTERPRET = runtime.is_emulated()
MAX_HEADDIM = 256  # any head dim 1..256 (flash-attn's limit), padded inside the kernels
SUPPORTED_HEADDIMS = (32, 64, 96, 128, 256)  # the tuned and benchmarked ones (GPU tests)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453    # ln(2):   log(x) == log2(x) * LN2
# FLASH_ATTN_AUTOTUNE=0 uses the first (default) config of each table below, no tuning:
# the GPU tests set it so that each test compiles one kernel, not the whole config set.
AUTOTUNE = os.environ.get("FLASH_ATTN_AUTOTUNE", "1") != "0"
# The forward's unmasked stage issues the next Q K^T before the current softmax
# (_fwd_inner_early_qk). Off until measured to help on the GPU.
EARLY_QK = False


def _allocator(size: int, alignment: int, stream):
    """Global scratch for tensor descriptors made inside a kernel (128 bytes each)."""
    return torch.empty(size, dtype=torch.int8, device=runtime.torch_device())


# ======================================================================================
# Small helpers shared by the kernels
# ======================================================================================

@triton.jit
def _load_block(src, start, n_rows, stride, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Rows [start, start + BLOCK_R) of a (n_rows, HEAD_DIM) matrix, zero past its edges.

    With USE_TMA ``src`` is a tensor descriptor: the copy engine fetches the tile and fills
    out-of-bounds rows and columns (headdim 96 in a 128-wide tile) with zeros for free.
    Otherwise ``src`` is a pointer to row 0 and the masks do the same work.
    """
    if USE_TMA:
        x = src.load([start, 0])
    else:
        rows = start + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        ptrs = src + rows[:, None] * stride + cols[None, :]
        if MASK_ROWS:
            if BLOCK_D == HEAD_DIM:
                x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
            else:
                x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM),
                            other=0.0)
        else:  # a full block: no row mask, so the loads vectorise and pipeline freely
            if BLOCK_D == HEAD_DIM:
                x = tl.load(ptrs)
            else:
                x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_block(dst, x, start, n_rows, stride, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Store rows [start, start + BLOCK_R) of x, dropping rows >= n_rows and padded columns."""
    if USE_TMA:
        dst.store([start, 0], x)
    else:
        rows = start + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        tl.store(dst + rows[:, None] * stride + cols[None, :], x,
                 mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _make_src(base, n_rows, stride, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """A tensor descriptor over one (sequence, head) slice, or the plain pointer."""
    if USE_TMA:
        src = tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride, 1],
                                        block_shape=[BLOCK_R, BLOCK_D])
    else:
        src = base
    return src


@triton.jit
def _sequence(pid_b, CU, seqlen, total, stride_b, stride_s, IS_VARLEN: tl.constexpr):
    """(offset of the sequence's first row in elements, its length).

    Batched tensors: sequence b starts at b * stride_b. Packed (varlen) tensors: it starts
    at row cu_seqlens[b] and its length is cu_seqlens[b + 1] - cu_seqlens[b], clamped so
    that no value of cu_seqlens can reach outside the tensor's ``total`` rows: the start
    into [0, total], the end into [start, total], the length to ``seqlen`` (max_seqlen;
    rows past it are not computed). Valid cu_seqlens pass unchanged; the interface
    reports invalid ones (on the device, without a host sync).
    """
    if IS_VARLEN:
        start = tl.minimum(tl.maximum(tl.load(CU + pid_b), 0), total)
        end = tl.minimum(tl.maximum(tl.load(CU + pid_b + 1), start), total)
        length = tl.minimum(end - start, seqlen)
        offset = start.to(tl.int64) * stride_s
    else:
        length = seqlen
        offset = pid_b.to(tl.int64) * stride_b
    return offset, length


@triton.jit
def _row_offset(pid_b, CU, total, stride_lb, IS_VARLEN: tl.constexpr):
    """Offset of a sequence's first entry in lse/delta: (b, h, s) batched, (h, total) packed."""
    if IS_VARLEN:
        off = tl.minimum(tl.maximum(tl.load(CU + pid_b), 0), total).to(tl.int64)
    else:
        off = pid_b.to(tl.int64) * stride_lb
    return off


@triton.jit
def _query_block_bounds(start_m, seqlen_q, seqlen_k, window_left, window_right,
                        CAUSAL: tl.constexpr, LOCAL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of the query rows [start_m, start_m + BLOCK_M): (lo, mid_lo, mid_hi, hi).

    Keys [mid_lo, mid_hi) are seen by every row of the block and are whole BLOCK_N blocks:
    no mask. Keys [lo, mid_lo) and [mid_hi, hi) need a mask (the causal diagonal, the two
    edges of a sliding window, the ragged end of the keys). Keys outside [lo, hi) are seen
    by no row and never loaded: that is what makes local attention O(n * window).
    Row i sees keys i + diag - window_left <= j <= i + diag + window_right, with
    diag = seqlen_k - seqlen_q (bottom-right); causal is window (inf, 0).
    Every bound is a multiple of BLOCK_N, or hi (the end of an empty or masked range).
    """
    if LOCAL:
        diag = seqlen_k - seqlen_q
        first = start_m + diag                                  # first row's diagonal key
        last = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1 + diag  # last real row's
        hi = tl.minimum(tl.maximum(last + window_right + 1, 0), seqlen_k)
        lo = tl.minimum((tl.maximum(first - window_left, 0) // BLOCK_N) * BLOCK_N, hi)
        # keys every row sees: [last - window_left, first + window_right]
        full_lo = tl.maximum(last - window_left, 0)
        full_hi = tl.maximum(tl.minimum(first + window_right + 1, seqlen_k), 0)
        mid_lo = tl.minimum(tl.maximum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo), hi)
        mid_hi = tl.minimum(tl.maximum((full_hi // BLOCK_N) * BLOCK_N, mid_lo), hi)
    else:
        if CAUSAL:
            diag = seqlen_k - seqlen_q
            hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + diag), 0)
            full = tl.maximum(tl.minimum(seqlen_k, start_m + diag + 1), 0)
        else:
            hi = seqlen_k
            full = seqlen_k
        lo = 0
        mid_lo = 0
        mid_hi = (full // BLOCK_N) * BLOCK_N
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _key_block_bounds(start_n, seqlen_q, seqlen_k, window_left, window_right,
                      CAUSAL: tl.constexpr, LOCAL: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query rows that see the keys [start_n, start_n + BLOCK_N): (lo, mid_lo, mid_hi, hi).

    Rows [mid_lo, mid_hi) see every key of the block (no mask); [lo, mid_lo) and
    [mid_hi, hi) are masked; rows outside [lo, hi) see none of these keys (skipped).
    Key j is seen by rows j - diag - window_right <= i <= j - diag + window_left.
    """
    if LOCAL:
        diag = seqlen_k - seqlen_q
        first = start_n - diag                                  # row whose diagonal is key start_n
        last = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1 - diag
        hi = tl.minimum(tl.maximum(last + window_left + 1, 0), seqlen_q)
        lo = tl.minimum((tl.maximum(first - window_right, 0) // BLOCK_M) * BLOCK_M, hi)
        full_lo = tl.maximum(last - window_right, 0)
        full_hi = tl.maximum(tl.minimum(first + window_left + 1, seqlen_q), 0)
        mid_lo = tl.minimum(tl.maximum(((full_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo), hi)
        mid_hi = tl.minimum(tl.maximum((full_hi // BLOCK_M) * BLOCK_M, mid_lo), hi)
    else:
        if CAUSAL:
            # causal rows i >= j - diag: [lo, mid_lo) straddle the diagonal (masked),
            # [mid_lo, seqlen_q) see every key of the block (no mask)
            diag = seqlen_k - seqlen_q
            first = tl.maximum(start_n - diag, 0)
            lo = (first // BLOCK_M) * BLOCK_M
            all_seen = tl.maximum(tl.minimum(start_n + BLOCK_N, seqlen_k) - 1 - diag, 0)
            mid_lo = tl.maximum(((all_seen + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
        else:
            lo = 0
            mid_lo = 0
        mid_hi = seqlen_q
        hi = seqlen_q
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _tanh(x):
    """tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no libdevice (which the
    interpreter lacks). 2.885... = 2 * log2(e)."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _alibi(i, j, diag, slope2, CAUSAL: tl.constexpr):
    """ALiBi bias in log2 units for rows i and keys j (broadcast), as flash-attn adds it:
    +slope * j with the causal mask (a row constant away from the documented form, so the
    same softmax), -slope * |i + diag - j| otherwise."""
    if CAUSAL:
        b = slope2 * j.to(tl.float32)
    else:
        b = -slope2 * tl.abs(i + diag - j).to(tl.float32)
    return b


# ======================================================================================
# Forward
# ======================================================================================

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs, lo, hi,
               offs_m, seqlen_q, seqlen_k, qk_scale,
               window_left, window_right, cap_in, cap_out, slope2,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
               DOT_FP32: tl.constexpr, WARP_SPEC: tl.constexpr, LOCAL: tl.constexpr,
               SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Walk keys [lo, hi) for one block of queries: the online softmax of FlashAttention-2."""
    dt = tl.float32 if DOT_FP32 else q.dtype
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    diag = seqlen_k - seqlen_q
    if not USE_TMA:  # plain pointers to the first tile, advanced by BLOCK_N rows a step
        k_ptrs = k_src + (lo + offs_n)[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_src + (lo + offs_n)[:, None] * stride_vs + offs_d[None, :]
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # K_j: the copy engine (TMA) zero-fills past the edges; pointers need masks on the
        # ragged block (MASKED) and on padded head dims (96 in a 128-wide tile) only
        if USE_TMA:
            k = k_src.load([start_n, 0])
        elif MASKED:
            k = tl.load(k_ptrs, mask=(cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM),
                        other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q.to(dt), tl.trans(k.to(dt)))          # S_ij = Q_i K_j^T (unscaled)
        if MASKED or SOFTCAP or HAS_ALIBI:
            if SOFTCAP:  # softcap * tanh(scale * S / softcap), in log2 units
                qk = _tanh(qk * cap_in) * cap_out
            else:
                qk = qk * qk_scale
            if HAS_ALIBI:
                qk = qk + _alibi(offs_m[:, None], cols[None, :], diag, slope2, CAUSAL)
            if MASKED:
                keep = cols[None, :] < seqlen_k
                if CAUSAL:
                    keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
                if LOCAL:
                    keep = keep & (cols[None, :] <= offs_m[:, None] + (diag + window_right))
                    keep = keep & (cols[None, :] >= offs_m[:, None] + (diag - window_left))
                qk = tl.where(keep, qk, float("-inf"))
                m_ij = tl.maximum(m_i, tl.max(qk, 1))
                # a row with no visible key so far has m = -inf; subtract 0 instead (no NaN)
                m_use = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            else:
                m_ij = tl.maximum(m_i, tl.max(qk, 1))
                m_use = m_ij
            p = tl.math.exp2(qk - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
        else:
            # the scale is applied to the row max (BLOCK_M values) and fused with the
            # subtraction into one FMA per score: fewer non-matmul FLOPs
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)             # rescales what was accumulated
        l_ij = tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = v_src.load([start_n, 0])
        elif MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM),
                        other=0.0)
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(dt), v.to(dt), acc)               # acc += P_ij V_j, P in 16 bits
        l_i = l_i * alpha + l_ij
        m_i = m_ij
        if not USE_TMA:
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs
    return acc, l_i, m_i


@triton.jit
def _fwd_inner_early_qk(acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs, lo, hi,
                        qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, DOT_FP32: tl.constexpr):
    """Stage 1 (whole, unmasked key blocks [lo, hi)) as a software pipeline: the next
    block's S = Q K^T is issued *before* this block's softmax.

    On Hopper a wgmma runs asynchronously: while the tensor cores compute S_{j+1}, the
    warps can compute exp2 for S_j (FlashAttention-3's intra-warpgroup overlap, written
    by hand instead of by warp specialization). The price: one more S tile live in
    registers, and one Q K^T too many at the end (of the block after the last).
    """
    dt = tl.float32 if DOT_FP32 else q.dtype
    k = _load_block(k_src, lo, hi, stride_ks, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA, True)
    qk = tl.dot(q.to(dt), tl.trans(k.to(dt)))
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        # rows past hi read zeros (pointers) or the next keys (TMA): never used
        k_next = _load_block(k_src, start_n + BLOCK_N, hi, stride_ks, BLOCK_N, HEAD_DIM,
                             BLOCK_D, USE_TMA, True)
        qk_next = tl.dot(q.to(dt), tl.trans(k_next.to(dt)))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_block(v_src, start_n, hi, stride_vs, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA,
                        False)
        acc = tl.dot(p.to(dt), v.to(dt), acc)
        m_i = m_ij
        qk = qk_next
    return acc, l_i, m_i




# The options of flash-attn beyond causal, as trailing arguments with defaults (off): a
# call without them (main.py's sweep, the ablation) compiles the plain kernel unchanged.
#   total_q, total_k: packed row counts (varlen clamping); window_left/right: the sliding
#   window (LOCAL, both >= 0 after _Problem's normalisation); cap_in = scale / softcap and
#   cap_out = softcap * log2(e) (SOFTCAP); ALIBI: float32 slopes, stride_ab their batch
#   stride (0 for (nheads,)) (HAS_ALIBI).

@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, num_heads_q, qk_scale,
    SEQLEN_KEY,  # bucketed max(seqlen_q, seqlen_k): the autotuner's key, unused here
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_FP32: tl.constexpr, WARP_SPEC: tl.constexpr, EARLY_QK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    total_q=0, total_k=0, window_left=0, window_right=0, cap_in=0.0, cap_out=0.0,
    ALIBI=None, stride_ab=0,
    LOCAL: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False,
):
    # Program (i, bh) owns query rows [i*BLOCK_M, (i+1)*BLOCK_M) of sequence b, head h.
    # The last query blocks have the most keys to walk when causal: launch them first so
    # that the short ones fill the tail of the grid (load balancing).
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_b = pid_bh // num_heads_q
    pid_h = pid_bh % num_heads_q
    pid_hk = pid_h // GROUP                          # GQA: the K/V head this head reads

    q_off, seqlen_q = _sequence(pid_b, CU_Q, seqlen_q, total_q, stride_qb, stride_qs, IS_VARLEN)
    k_off, seqlen_k = _sequence(pid_b, CU_K, seqlen_k, total_k, stride_kb, stride_ks, IS_VARLEN)
    v_off, _ = _sequence(pid_b, CU_K, seqlen_k, total_k, stride_vb, stride_vs, IS_VARLEN)
    o_off, _ = _sequence(pid_b, CU_Q, seqlen_q, total_q, stride_ob, stride_os, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if IS_VARLEN:  # this sequence may be shorter than the longest one: nothing to do
        if start_m >= seqlen_q:
            return

    q_src = _make_src(Q + q_off + pid_h.to(tl.int64) * stride_qh, seqlen_q, stride_qs,
                      BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
    k_src = _make_src(K + k_off + pid_hk.to(tl.int64) * stride_kh, seqlen_k, stride_ks,
                      BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    v_src = _make_src(V + v_off + pid_hk.to(tl.int64) * stride_vh, seqlen_k, stride_vs,
                      BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    o_dst = _make_src(O + o_off + pid_h.to(tl.int64) * stride_oh, seqlen_q, stride_os,
                      BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)   # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)        # unnormalised output
    if HAS_ALIBI:  # this (sequence, head)'s slope, in log2 units
        slope2 = tl.load(ALIBI + pid_b * stride_ab + pid_h) * 1.4426950408889634
    else:
        slope2 = 0.0
    # Q stays on chip for the whole walk over K and V
    q = _load_block(q_src, start_m, seqlen_q, stride_qs, BLOCK_M, HEAD_DIM, BLOCK_D,
                    USE_TMA, True)

    lo, mid_lo, mid_hi, hi = _query_block_bounds(start_m, seqlen_q, seqlen_k, window_left,
                                                 window_right, CAUSAL, LOCAL, BLOCK_M, BLOCK_N)
    if LOCAL:  # stage 0: the left edge of the sliding window - masked
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs, lo,
                                   mid_lo, offs_m, seqlen_q, seqlen_k, qk_scale, window_left,
                                   window_right, cap_in, cap_out, slope2, HEAD_DIM, BLOCK_D,
                                   BLOCK_N, CAUSAL, True, USE_TMA, DOT_FP32, False, LOCAL,
                                   SOFTCAP, HAS_ALIBI)
    # stage 1: whole key blocks every row sees - no mask, no bounds checks
    if EARLY_QK:  # (the host turns it off with softcap or ALiBi)
        acc, l_i, m_i = _fwd_inner_early_qk(acc, l_i, m_i, q, k_src, v_src, stride_ks,
                                            stride_vs, mid_lo, mid_hi, qk_scale, HEAD_DIM,
                                            BLOCK_D, BLOCK_N, USE_TMA, DOT_FP32)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs,
                                   mid_lo, mid_hi, offs_m, seqlen_q, seqlen_k, qk_scale,
                                   window_left, window_right, cap_in, cap_out, slope2,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False, USE_TMA,
                                   DOT_FP32, WARP_SPEC, LOCAL, SOFTCAP, HAS_ALIBI)
    # stage 2: the diagonal (causal), the right edge of a window and the ragged last key
    # block - masked
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs, mid_hi,
                               hi, offs_m, seqlen_q, seqlen_k, qk_scale, window_left,
                               window_right, cap_in, cap_out, slope2, HEAD_DIM, BLOCK_D,
                               BLOCK_N, CAUSAL, True, USE_TMA, DOT_FP32, False, LOCAL,
                               SOFTCAP, HAS_ALIBI)

    # epilogue: the one division of deferred normalisation; empty rows give 0 and +inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    lse_ptrs = (LSE + _row_offset(pid_b, CU_Q, total_q, stride_lb, IS_VARLEN)
                + pid_h * stride_lh + offs_m)
    tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)
    _store_block(o_dst, acc.to(O.dtype.element_ty), start_m, seqlen_q, stride_os, BLOCK_M,
                 HEAD_DIM, BLOCK_D, USE_TMA)


# ======================================================================================
# Backward
# ======================================================================================

@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh, seqlen_q, num_heads_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    total_q=0,
):
    """delta_i = sum_d dO_id * O_id  (= rowsum(dP * P), the softmax backward's correction)."""
    pid_bh = tl.program_id(1)
    pid_b = pid_bh // num_heads_q
    pid_h = pid_bh % num_heads_q
    o_off, seqlen_q = _sequence(pid_b, CU_Q, seqlen_q, total_q, stride_ob, stride_os, IS_VARLEN)
    do_off, _ = _sequence(pid_b, CU_Q, seqlen_q, total_q, stride_dob, stride_dos, IS_VARLEN)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= seqlen_q:
        return
    o = _load_block(O + o_off + pid_h.to(tl.int64) * stride_oh, start_m, seqlen_q, stride_os,
                    BLOCK_M, HEAD_DIM, BLOCK_D, False, True)
    do = _load_block(DO + do_off + pid_h.to(tl.int64) * stride_doh, start_m, seqlen_q,
                     stride_dos, BLOCK_M, HEAD_DIM, BLOCK_D, False, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    ptrs = (DELTA + _row_offset(pid_b, CU_Q, total_q, stride_lb, IS_VARLEN) + pid_h * stride_lh
            + offs_m)
    tl.store(ptrs, delta, mask=offs_m < seqlen_q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qs, stride_dos,
                start_n, lo, hi, seqlen_q, seqlen_k, qk_scale,
                window_left, window_right, cap_in, cap_out, slope2,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
                DOT_FP32: tl.constexpr, CAUSAL: tl.constexpr, LOCAL: tl.constexpr,
                SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Walk query rows [lo, hi) for one block of keys, accumulating dK and dV.

    Computed transposed (keys are the rows here): S^T = K Q^T, P^T = exp2(S^T - lse),
    dV += P^T dO, dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dK += dS^T Q.
    Query rows past seqlen_q load as zeros with lse = +inf, so their P is 0: no mask needed.
    With softcap S = c * tanh(scale * QK^T / c): dS_raw = dS * (1 - tanh^2) (chain rule).
    """
    dt = tl.float32 if DOT_FP32 else k.dtype
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    diag = seqlen_k - seqlen_q
    if not USE_TMA:
        q_ptrs = q_src + (lo + tl.arange(0, BLOCK_M))[:, None] * stride_qs + offs_d[None, :]
        do_ptrs = do_src + (lo + tl.arange(0, BLOCK_M))[:, None] * stride_dos + offs_d[None, :]
    for start_m in tl.range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen_q
        if USE_TMA:
            q = q_src.load([start_m, 0])
        else:
            q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        lse2 = tl.load(lse_ptr + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        sT = tl.dot(k.to(dt), tl.trans(q.to(dt)))
        if SOFTCAP:
            tT = _tanh(sT * cap_in)
            sT = tT * cap_out
        else:
            sT = sT * qk_scale
        if HAS_ALIBI:
            sT = sT + _alibi(offs_m[None, :], offs_n[:, None], diag, slope2, CAUSAL)
        pT = tl.math.exp2(sT - lse2[None, :])
        if MASKED:
            if LOCAL:  # key j is seen by row i iff i + diag - left <= j <= i + diag + right
                keep = offs_n[:, None] <= offs_m[None, :] + (diag + window_right)
                keep = keep & (offs_n[:, None] >= offs_m[None, :] + (diag - window_left))
            else:  # causal diagonal: key j is seen by row i iff j <= i + diag
                keep = offs_n[:, None] <= offs_m[None, :] + diag
            pT = tl.where(keep, pT, 0.0)
        if USE_TMA:
            do = do_src.load([start_m, 0])
        else:
            do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        dv = tl.dot(pT.to(dt), do.to(dt), dv)
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        dpT = tl.dot(v.to(dt), tl.trans(do.to(dt)))
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = tl.dot(dsT.to(dt), q.to(dt), dk)
        if not USE_TMA:
            q_ptrs += BLOCK_M * stride_qs
            do_ptrs += BLOCK_M * stride_dos
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, num_heads_k, qk_scale, softmax_scale,
    SEQLEN_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    total_q=0, total_k=0, window_left=0, window_right=0, cap_in=0.0, cap_out=0.0,
    ALIBI=None, stride_ab=0,
    LOCAL: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False,
):
    # Program (j, bh) owns keys [j*BLOCK_N, (j+1)*BLOCK_N) of sequence b, K/V head h_k, and
    # sums the contributions of the GROUP query heads that read that K/V head (GQA).
    pid_bh = tl.program_id(1)
    pid_b = pid_bh // num_heads_k
    pid_hk = pid_bh % num_heads_k
    q_off, seqlen_q = _sequence(pid_b, CU_Q, seqlen_q, total_q, stride_qb, stride_qs, IS_VARLEN)
    do_off, _ = _sequence(pid_b, CU_Q, seqlen_q, total_q, stride_dob, stride_dos, IS_VARLEN)
    k_off, seqlen_k = _sequence(pid_b, CU_K, seqlen_k, total_k, stride_kb, stride_ks, IS_VARLEN)
    v_off, _ = _sequence(pid_b, CU_K, seqlen_k, total_k, stride_vb, stride_vs, IS_VARLEN)
    dk_off, _ = _sequence(pid_b, CU_K, seqlen_k, total_k, stride_dkb, stride_dks, IS_VARLEN)
    dv_off, _ = _sequence(pid_b, CU_K, seqlen_k, total_k, stride_dvb, stride_dvs, IS_VARLEN)
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= seqlen_k:
        return
    row_off = _row_offset(pid_b, CU_Q, total_q, stride_lb, IS_VARLEN)

    k_src = _make_src(K + k_off + pid_hk.to(tl.int64) * stride_kh, seqlen_k, stride_ks,
                      BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    v_src = _make_src(V + v_off + pid_hk.to(tl.int64) * stride_vh, seqlen_k, stride_vs,
                      BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    # K and V of this block stay on chip while all query blocks stream past
    k = _load_block(k_src, start_n, seqlen_k, stride_ks, BLOCK_N, HEAD_DIM, BLOCK_D,
                    USE_TMA, True)
    v = _load_block(v_src, start_n, seqlen_k, stride_vs, BLOCK_N, HEAD_DIM, BLOCK_D,
                    USE_TMA, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query rows that see this key block: [lo, mid_lo) and [mid_hi, hi) masked (the causal
    # diagonal, the window's edges), [mid_lo, mid_hi) see every key (no mask)
    lo, mid_lo, mid_hi, hi = _key_block_bounds(start_n, seqlen_q, seqlen_k, window_left,
                                               window_right, CAUSAL, LOCAL, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        pid_h = pid_hk * GROUP + g
        q_src = _make_src(Q + q_off + pid_h.to(tl.int64) * stride_qh, seqlen_q, stride_qs,
                          BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
        do_src = _make_src(DO + do_off + pid_h.to(tl.int64) * stride_doh, seqlen_q, stride_dos,
                           BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
        lse_ptr = LSE + row_off + pid_h * stride_lh
        delta_ptr = DELTA + row_off + pid_h * stride_lh
        if HAS_ALIBI:
            slope2 = tl.load(ALIBI + pid_b * stride_ab + pid_h) * 1.4426950408889634
        else:
            slope2 = 0.0
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qs,
                             stride_dos, start_n, lo, tl.minimum(mid_lo, seqlen_q), seqlen_q,
                             seqlen_k, qk_scale, window_left, window_right, cap_in, cap_out,
                             slope2, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, USE_TMA,
                             DOT_FP32, CAUSAL, LOCAL, SOFTCAP, HAS_ALIBI)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qs,
                             stride_dos, start_n, mid_lo, mid_hi, seqlen_q, seqlen_k, qk_scale,
                             window_left, window_right, cap_in, cap_out, slope2, HEAD_DIM,
                             BLOCK_D, BLOCK_M, BLOCK_N, False, USE_TMA, DOT_FP32, CAUSAL,
                             LOCAL, SOFTCAP, HAS_ALIBI)
        if LOCAL:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, stride_qs,
                                 stride_dos, start_n, mid_hi, hi, seqlen_q, seqlen_k, qk_scale,
                                 window_left, window_right, cap_in, cap_out, slope2, HEAD_DIM,
                                 BLOCK_D, BLOCK_M, BLOCK_N, True, USE_TMA, DOT_FP32, CAUSAL,
                                 LOCAL, SOFTCAP, HAS_ALIBI)
    dk = dk * softmax_scale  # S = scale * Q K^T, so dK = scale * dS^T Q
    dk_dst = _make_src(DK + dk_off + pid_hk.to(tl.int64) * stride_dkh, seqlen_k, stride_dks,
                       BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    dv_dst = _make_src(DV + dv_off + pid_hk.to(tl.int64) * stride_dvh, seqlen_k, stride_dvs,
                       BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    _store_block(dk_dst, dk.to(DK.dtype.element_ty), start_n, seqlen_k, stride_dks, BLOCK_N,
                 HEAD_DIM, BLOCK_D, USE_TMA)
    _store_block(dv_dst, dv.to(DV.dtype.element_ty), start_n, seqlen_k, stride_dvs, BLOCK_N,
                 HEAD_DIM, BLOCK_D, USE_TMA)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_ks, stride_vs, lo, hi, offs_m,
              seqlen_q, seqlen_k, qk_scale, window_left, window_right, cap_in, cap_out, slope2,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
              DOT_FP32: tl.constexpr, LOCAL: tl.constexpr, SOFTCAP: tl.constexpr,
              HAS_ALIBI: tl.constexpr):
    """Walk keys [lo, hi) for one block of queries: dQ += dS K with dS = P * (dP - delta)."""
    dt = tl.float32 if DOT_FP32 else q.dtype
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    diag = seqlen_k - seqlen_q
    if not USE_TMA:
        k_ptrs = k_src + (lo + offs_n)[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_src + (lo + offs_n)[:, None] * stride_vs + offs_d[None, :]
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if USE_TMA:
            k = k_src.load([start_n, 0])
            v = v_src.load([start_n, 0])
        elif MASKED:
            kv_ok = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q.to(dt), tl.trans(k.to(dt)))
        if SOFTCAP:
            t = _tanh(s * cap_in)
            s = t * cap_out
        else:
            s = s * qk_scale
        if HAS_ALIBI:
            s = s + _alibi(offs_m[:, None], cols[None, :], diag, slope2, CAUSAL)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            keep = cols[None, :] < seqlen_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            if LOCAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + (diag + window_right))
                keep = keep & (cols[None, :] >= offs_m[:, None] + (diag - window_left))
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do.to(dt), tl.trans(v.to(dt)))
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(dt), k.to(dt), dq)
        if not USE_TMA:
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, num_heads_q, qk_scale, softmax_scale,
    SEQLEN_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    total_q=0, total_k=0, window_left=0, window_right=0, cap_in=0.0, cap_out=0.0,
    ALIBI=None, stride_ab=0,
    LOCAL: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False,
):
    # Same decomposition as the forward: program (i, bh) owns BLOCK_M query rows.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_b = pid_bh // num_heads_q
    pid_h = pid_bh % num_heads_q
    pid_hk = pid_h // GROUP
    q_off, seqlen_q = _sequence(pid_b, CU_Q, seqlen_q, total_q, stride_qb, stride_qs, IS_VARLEN)
    do_off, _ = _sequence(pid_b, CU_Q, seqlen_q, total_q, stride_dob, stride_dos, IS_VARLEN)
    dq_off, _ = _sequence(pid_b, CU_Q, seqlen_q, total_q, stride_dqb, stride_dqs, IS_VARLEN)
    k_off, seqlen_k = _sequence(pid_b, CU_K, seqlen_k, total_k, stride_kb, stride_ks, IS_VARLEN)
    v_off, _ = _sequence(pid_b, CU_K, seqlen_k, total_k, stride_vb, stride_vs, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    q_src = _make_src(Q + q_off + pid_h.to(tl.int64) * stride_qh, seqlen_q, stride_qs,
                      BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
    do_src = _make_src(DO + do_off + pid_h.to(tl.int64) * stride_doh, seqlen_q, stride_dos,
                       BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
    k_src = _make_src(K + k_off + pid_hk.to(tl.int64) * stride_kh, seqlen_k, stride_ks,
                      BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    v_src = _make_src(V + v_off + pid_hk.to(tl.int64) * stride_vh, seqlen_k, stride_vs,
                      BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ptr = (_row_offset(pid_b, CU_Q, total_q, stride_lb, IS_VARLEN) + pid_h * stride_lh
               + offs_m)
    q = _load_block(q_src, start_m, seqlen_q, stride_qs, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA, True)
    do = _load_block(do_src, start_m, seqlen_q, stride_dos, BLOCK_M, HEAD_DIM, BLOCK_D,
                     USE_TMA, True)
    lse2 = tl.load(LSE + row_ptr, mask=offs_m < seqlen_q, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_ptr, mask=offs_m < seqlen_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + pid_b * stride_ab + pid_h) * 1.4426950408889634
    else:
        slope2 = 0.0

    lo, mid_lo, mid_hi, hi = _query_block_bounds(start_m, seqlen_q, seqlen_k, window_left,
                                                 window_right, CAUSAL, LOCAL, BLOCK_M, BLOCK_N)
    if LOCAL:
        dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_ks, stride_vs, lo, mid_lo,
                       offs_m, seqlen_q, seqlen_k, qk_scale, window_left, window_right, cap_in,
                       cap_out, slope2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True, USE_TMA,
                       DOT_FP32, LOCAL, SOFTCAP, HAS_ALIBI)
    dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_ks, stride_vs, mid_lo, mid_hi,
                   offs_m, seqlen_q, seqlen_k, qk_scale, window_left, window_right, cap_in,
                   cap_out, slope2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False, USE_TMA,
                   DOT_FP32, LOCAL, SOFTCAP, HAS_ALIBI)
    dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_ks, stride_vs, mid_hi, hi,
                   offs_m, seqlen_q, seqlen_k, qk_scale, window_left, window_right, cap_in,
                   cap_out, slope2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True, USE_TMA,
                   DOT_FP32, LOCAL, SOFTCAP, HAS_ALIBI)
    dq = dq * softmax_scale
    dq_dst = _make_src(DQ + dq_off + pid_h.to(tl.int64) * stride_dqh, seqlen_q, stride_dqs,
                       BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
    _store_block(dq_dst, dq.to(DQ.dtype.element_ty), start_m, seqlen_q, stride_dqs, BLOCK_M,
                 HEAD_DIM, BLOCK_D, USE_TMA)


# ======================================================================================
# Configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages), pruned per BLOCK_D (the head
# dim rounded up to a power of two, at least 16: 80 and 96 use the 128 tiles, 8 the 16).
# The first entry of each list is the default (FLASH_ATTN_AUTOTUNE=0). Chosen from the
# sweep in `main.py --sweep` on an H100 (numbers in docs/flash_attention/04_optimization.md).
# ======================================================================================

_INTERPRETER_TILES = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}

FWD_TILES = {
    32: [(128, 64, 4, 3), (128, 128, 4, 3), (64, 64, 4, 3)],
    64: [(128, 64, 4, 3), (128, 128, 4, 3), (64, 64, 4, 3), (256, 64, 8, 3)],
    128: [(128, 64, 4, 2), (256, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
    256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
}
# dK/dV: BLOCK_M is the query block streamed past, BLOCK_N the key block held on chip
DKDV_TILES = {
    32: [(32, 64, 4, 3), (64, 64, 4, 2), (32, 128, 4, 2)],
    64: [(32, 64, 4, 3), (32, 128, 4, 2), (64, 64, 4, 2)],
    128: [(64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 2)],
    256: [(32, 64, 4, 2), (64, 64, 8, 1), (16, 64, 4, 2)],
}
DQ_TILES = {
    32: [(64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 2)],
    64: [(64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 8, 2)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2)],
    256: [(64, 32, 4, 2), (64, 64, 8, 1), (32, 32, 4, 2)],
}
for _table in (FWD_TILES, DKDV_TILES, DQ_TILES):  # head dims 1..16: the 32 tiles
    _table[16] = _table[32]
TILES = {"fwd": FWD_TILES, "dkdv": DKDV_TILES, "dq": DQ_TILES}


def _config(tile) -> triton.Config:
    bm, bn, w, s = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def _tile_of(cfg: triton.Config):
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        wanted = TILES[kind][args["BLOCK_D"]]
        if not AUTOTUNE:
            wanted = wanted[:1]
        return [c for c in configs if _tile_of(c) in wanted]
    return prune


def _all_configs(kind: str):
    tiles = sorted({t for lst in TILES[kind].values() for t in lst})
    return [_config(t) for t in tiles]


_KEY = ["SEQLEN_KEY", "HEAD_DIM", "CAUSAL", "IS_VARLEN", "USE_TMA", "LOCAL", "SOFTCAP",
        "HAS_ALIBI"]


def _quick_bench(fn, quantiles):
    """The autotuner's timer: a few ms per config is enough to rank 3-4 tiles."""
    return triton.testing.do_bench(fn, warmup=10, rep=50, quantiles=quantiles)



if INTERPRET:  # autotuning needs a driver; the interpreter launches the raw kernels
    _fwd_tuned = _dkdv_tuned = _dq_tuned = None
else:
    _fwd_tuned = triton.autotune(_all_configs("fwd"), key=_KEY,
                                 prune_configs_by={"early_config_prune": _pruner("fwd")},
                                 do_bench=_quick_bench)(_attn_fwd_kernel)
    _dkdv_tuned = triton.autotune(_all_configs("dkdv"), key=_KEY,
                                  prune_configs_by={"early_config_prune": _pruner("dkdv")},
                                 do_bench=_quick_bench)(_attn_bwd_dkdv_kernel)
    _dq_tuned = triton.autotune(_all_configs("dq"), key=_KEY,
                                prune_configs_by={"early_config_prune": _pruner("dq")},
                                 do_bench=_quick_bench)(_attn_bwd_dq_kernel)


def _launch(kind, raw, tuned, grid, args, consts, block_d, tile=None):
    """Launch with an explicit tile, the interpreter's tile, or the autotuner's choice."""
    # Triton keeps the allocator in a context variable: set it in the launching thread
    # (autograd runs the backward pass in a thread of its own)
    triton.set_allocator(_allocator)
    if tile is None and (INTERPRET or not AUTOTUNE):
        tile = _INTERPRETER_TILES[kind] if INTERPRET else TILES[kind][block_d][0]
    if tile is None:
        tuned[grid](*args, **consts)
        return
    bm, bn, w, s = tile
    raw[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)


def best_tiles() -> dict:
    """What the autotuner chose so far: {kind: {key: (BLOCK_M, BLOCK_N, warps, stages)}}."""
    out = {}
    for kind, tuned in (("fwd", _fwd_tuned), ("dkdv", _dkdv_tuned), ("dq", _dq_tuned)):
        if tuned is not None:
            out[kind] = {str(k): _tile_of(c) for k, c in tuned.cache.items()}
    return out


# ======================================================================================
# Host side: validation, launches, autograd
# ======================================================================================

def _seqlen_key(n: int) -> int:
    return min(triton.next_power_of_2(max(int(n), 1)), 16384)


@functools.lru_cache(maxsize=None)
def _is_hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.lru_cache(maxsize=None)
def _dummy_cu(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def _tma_ok(*tensors) -> bool:
    """Tensor descriptors need sm_90+, 16-byte aligned bases and 16-byte multiple strides."""
    if INTERPRET or not _is_hopper_or_newer(tensors[0].device.index or 0):
        return False
    for t in tensors:
        if t.data_ptr() % 16 or any((s * t.element_size()) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _check_common(q, k, v, nd: int, what: str):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != nd:
            raise ValueError(f"{name} must be {nd}-D {what}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {q.dtype} is not supported: use torch.float16 or torch.bfloat16")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != runtime.torch_device():
        raise ValueError(f"tensors are on {q.device.type}, but this runtime launches on "
                         f"{runtime.torch_device()}")
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"head dims differ: q {d}, k {k.shape[-1]}, v {v.shape[-1]}")
    if not 1 <= d <= MAX_HEADDIM:
        raise ValueError(f"headdim {d} is not supported (1 to {MAX_HEADDIM})")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v head counts differ: {k.shape[-2]} vs {v.shape[-2]}")
    hq, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or hq % hk:
        raise ValueError(f"heads_q={hq} is not a multiple of heads_k={hk}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), "
                             f"got strides {t.stride()}")


# Every buffer a kernel must fully write is allocated here (the tests swap in NaN-filled
# buffers to prove that no element is left unwritten).
_empty = torch.empty


class _Problem:
    """Shapes and strides of one call, batched or packed, in the kernels' terms."""

    def __init__(self, q, k, v, softmax_scale, causal, cu_q=None, cu_k=None,
                 max_sq=None, max_sk=None, *, window=(-1, -1), softcap=0.0,
                 alibi_slopes=None):
        self.varlen = cu_q is not None
        self.d = q.shape[-1]
        # 96 -> 128, 40 -> 64, 8 -> 16 (tl.dot needs K >= 16): masks/TMA pad the tile
        self.block_d = max(16, triton.next_power_of_2(self.d))
        self.hq, self.hk = q.shape[-2], k.shape[-2]
        self.group = self.hq // self.hk
        if self.varlen:
            self.batch = cu_q.numel() - 1
            self.sq, self.sk = int(max_sq), int(max_sk)
        else:
            self.batch, self.sq, self.sk = q.shape[0], q.shape[1], k.shape[1]
        self.scale = float(self.d ** -0.5 if softmax_scale is None else softmax_scale)
        # flash-attn 2.8.3's host normalisation (flash_api.cpp mha_fwd/mha_varlen_fwd, then
        # set_params_fprop); seqlen_k is max_seqlen_k for varlen
        wl, wr = (int(w) for w in window)
        if wl >= self.sk:
            wl = -1
        if wr >= self.sk:
            wr = -1
        if self.sq == 1 and alibi_slopes is None:  # the same mask, and the faster kernel
            causal = False
        if causal:
            wr = 0
        self.causal = wl < 0 and wr == 0         # causal and window (-1, 0) are one mask
        self.local = (wl >= 0 or wr >= 0) and not self.causal
        if wl < 0 and wr >= 0:                   # one side unbounded: seqlen_k wide
            wl = self.sk
        if wl >= 0 and wr < 0:
            wr = self.sk
        self.window = (wl, wr)
        self.softcap = float(softcap) if softcap > 0 else 0.0   # <= 0: off
        self.alibi = alibi_slopes
        dummy = _dummy_cu(q.device)
        self.cu_q = cu_q if self.varlen else dummy
        self.cu_k = cu_k if self.varlen else dummy
        self.key = _seqlen_key(max(self.sq, self.sk))

    def strides(self, t):
        """(batch, seq, head) strides; packed tensors have no batch stride."""
        return (0, t.stride(0), t.stride(1)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def lse_strides(self, lse):
        return (0, lse.stride(0)) if self.varlen else (lse.stride(0), lse.stride(1))

    def consts(self, use_tma):
        return dict(HEAD_DIM=self.d, BLOCK_D=self.block_d, GROUP=self.group, CAUSAL=self.causal,
                    IS_VARLEN=self.varlen, USE_TMA=use_tma, DOT_FP32=INTERPRET,
                    LOCAL=self.local, SOFTCAP=self.softcap > 0,
                    HAS_ALIBI=self.alibi is not None)

    def options(self, q, k):
        """The kernels' trailing arguments: packed row counts, window, softcap, ALiBi."""
        wl, wr = self.window
        cap = self.softcap
        alibi = self.alibi
        return dict(total_q=q.shape[0] if self.varlen else 0,
                    total_k=k.shape[0] if self.varlen else 0,
                    window_left=max(wl, 0), window_right=max(wr, 0),
                    cap_in=self.scale / cap if cap > 0 else 0.0,
                    cap_out=cap * LOG2E if cap > 0 else 0.0,
                    ALIBI=alibi, stride_ab=alibi.stride(0) if alibi is not None and
                    alibi.dim() == 2 else 0)


def _flash_fwd(q, k, v, p: _Problem, use_tma=None, tile=None, warp_spec=False,
               early_qk=None):
    """out (q's shape, q's dtype) and lse (float32: (b, hq, sq) or (hq, total_q))."""
    out = _empty(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (p.hq, q.shape[0]) if p.varlen else (p.batch, p.hq, p.sq)
    lse = _empty(lse_shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if use_tma is None:
        use_tma = _tma_ok(q, k, v, out)
    args = (q, k, v, out, lse, p.cu_q, p.cu_k, *p.strides(q), *p.strides(k), *p.strides(v),
            *p.strides(out), *p.lse_strides(lse), p.sq, p.sk, p.hq, p.scale * LOG2E, p.key)
    grid = lambda meta: (triton.cdiv(p.sq, meta["BLOCK_M"]), p.batch * p.hq)  # noqa: E731
    early_qk = EARLY_QK if early_qk is None else early_qk
    early_qk = early_qk and not (p.softcap > 0 or p.alibi is not None)  # plain scores only
    _launch("fwd", _attn_fwd_kernel, _fwd_tuned, grid, args,
            {**p.consts(use_tma), **p.options(q, k), "WARP_SPEC": warp_spec,
             "EARLY_QK": early_qk}, p.block_d, tile)
    return out, lse


def _flash_bwd(do, q, k, v, out, lse, p: _Problem, use_tma=None, tiles=None):
    """dq, dk, dv in the inputs' dtype and shapes (dk, dv summed over GQA groups)."""
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = _empty(q.shape, dtype=q.dtype, device=q.device)
    dk = _empty(k.shape, dtype=k.dtype, device=k.device)
    dv = _empty(v.shape, dtype=v.dtype, device=v.device)
    if dk.numel() == 0 or dq.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if use_tma is None:
        use_tma = _tma_ok(q, k, v, do, dq, dk, dv)
    tiles = tiles or {}
    delta = _empty(lse.shape, dtype=torch.float32, device=lse.device)
    consts = {**p.consts(use_tma), **p.options(q, k)}
    pre_m = 64 if not INTERPRET else 32
    _attn_bwd_preprocess[(triton.cdiv(p.sq, pre_m), p.batch * p.hq)](
        out, do, delta, p.cu_q, *p.strides(out), *p.strides(do), *p.lse_strides(lse), p.sq, p.hq,
        HEAD_DIM=p.d, BLOCK_D=p.block_d, IS_VARLEN=p.varlen, BLOCK_M=pre_m,
        total_q=q.shape[0] if p.varlen else 0)
    common = (*p.strides(q), *p.strides(k), *p.strides(v), *p.strides(do))
    args = (q, k, v, do, lse, delta, dk, dv, p.cu_q, p.cu_k, *common, *p.strides(dk),
            *p.strides(dv), *p.lse_strides(lse), p.sq, p.sk, p.hk, p.scale * LOG2E, p.scale, p.key)
    grid = lambda meta: (triton.cdiv(p.sk, meta["BLOCK_N"]), p.batch * p.hk)  # noqa: E731
    _launch("dkdv", _attn_bwd_dkdv_kernel, _dkdv_tuned, grid, args, consts, p.block_d,
            tiles.get("dkdv"))
    args = (q, k, v, do, lse, delta, dq, p.cu_q, p.cu_k, *common, *p.strides(dq),
            *p.lse_strides(lse), p.sq, p.sk, p.hq, p.scale * LOG2E, p.scale, p.key)
    grid = lambda meta: (triton.cdiv(p.sq, meta["BLOCK_M"]), p.batch * p.hq)  # noqa: E731
    _launch("dq", _attn_bwd_dq_kernel, _dq_tuned, grid, args, consts, p.block_d, tiles.get("dq"))
    return dq, dk, dv


def __getattr__(name):
    """``from flash_attn import flash_attn_func`` keeps working, as with flash-attn itself:
    the public functions live in flash_attn_interface.py (imported lazily, since it imports
    this module)."""
    import flash_attn_interface
    if name in flash_attn_interface.__all__:
        return getattr(flash_attn_interface, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
