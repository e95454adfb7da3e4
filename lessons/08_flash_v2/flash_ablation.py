"""From FlashAttention v1 to v2, one measured step at a time (forward pass, in Triton).

Every step computes the same attention on q, k, v of shape (batch, seqlen, heads, headdim)
(seqlen_q == seqlen_k, no GQA: the ablation's shapes), so their times can be compared:

1. ``v1``: FlashAttention v1's loop order (Dao et al., 2022, Algorithm 1). One program per
   (batch, head); the outer loop walks K/V blocks, the inner loop walks Q blocks, and the
   output O with its running max m and sum l live in HBM: every inner step reads them,
   rescales, and writes them back.
2. ``v2_order``: FlashAttention-2's loop order. One program per (query block, batch, head),
   so seqlen/BLOCK_M times more programs fill the GPU; Q, O, m, l stay on chip while the
   program walks K/V. Still normalises O at every step as v1 did, uses exp, and masks
   every block.
3. ``deferred``: keep O unnormalised and divide by l once at the end; exp2 with log2(e)
   folded into the scale. Fewer non-matmul FLOPs per step.
4. ``skip``: causal blocks above the diagonal are never visited, and only the blocks that
   need a mask (the diagonal, the ragged end) pay for one: two loops, unmasked then masked.
5. tuned tiles and pipelining (the same kernel with a larger tile, more warps and
   ``num_stages`` > 1, so the loads of block j+1 overlap the math of block j).
6. Hopper's copy engine: tensor descriptors (TMA), in the lesson's production kernel
   (``flash_attn.py``), with the tile of step 5. (Warp specialization, the next Hopper
   step, does not compile for this kernel on sm_90 with Triton 3.6: see
   docs/flash_attention/04_optimization.md.)

``main.py --ablation`` times each step on the same shapes; docs/flash_attention/
02_v1_vs_v2.md explains the numbers.
"""

from __future__ import annotations

from common import runtime  # before triton

import torch
import triton
import triton.language as tl

import flash_attn

INTERPRET = runtime.is_emulated()
UNTUNED_TILE = (64, 64, 4, 1)  # BLOCK_M, BLOCK_N, num_warps, num_stages (no pipelining)


@triton.jit
def _v1_kernel(Q, K, V, O, L, M, stride_b, stride_s, stride_h, seqlen, num_heads, sm_scale,
               HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """FlashAttention v1: K/V outer, Q inner, O/l/m read and written in HBM every step.

    O is float32 (b, h, s, d), L and M float32 (b, h, s), initialised to 0, 0 and -inf.
    """
    pid_bh = tl.program_id(0)
    base = (pid_bh // num_heads).to(tl.int64) * stride_b + (pid_bh % num_heads) * stride_h
    o_base = pid_bh.to(tl.int64) * seqlen * HEAD_DIM
    l_base = pid_bh.to(tl.int64) * seqlen
    offs_d = tl.arange(0, HEAD_DIM)
    dt = tl.float32 if DOT_FP32 else Q.dtype.element_ty
    for start_n in range(0, seqlen, BLOCK_N):                    # outer: K_j, V_j
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_ok = cols[:, None] < seqlen
        k = tl.load(K + base + cols[:, None] * stride_s + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + base + cols[:, None] * stride_s + offs_d[None, :], mask=kv_ok, other=0.0)
        for start_m in range(0, seqlen, BLOCK_M):                # inner: Q_i, O_i, l_i, m_i
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = rows < seqlen
            q = tl.load(Q + base + rows[:, None] * stride_s + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)
            o_ptrs = O + o_base + rows[:, None] * HEAD_DIM + offs_d[None, :]
            o = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0)
            l_i = tl.load(L + l_base + rows, mask=row_ok, other=0.0)
            m_i = tl.load(M + l_base + rows, mask=row_ok, other=float("-inf"))
            s = tl.dot(q.to(dt), tl.trans(k.to(dt))) * sm_scale
            keep = cols[None, :] < seqlen
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = tl.where(keep, s, float("-inf"))
            m_ij = tl.max(s, 1)
            m_ij_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.exp(s - m_ij_safe[:, None])
            l_ij = tl.sum(p, 1)
            m_new = tl.maximum(m_i, m_ij)
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_new_safe)
            beta = tl.exp(m_ij_safe - m_new_safe)
            l_new = alpha * l_i + beta * l_ij
            l_div = tl.where(l_new == 0.0, 1.0, l_new)
            pv = tl.dot(p.to(dt), v.to(dt))
            o = ((l_i * alpha)[:, None] * o + beta[:, None] * pv) / l_div[:, None]
            tl.store(o_ptrs, o, mask=row_ok[:, None])
            tl.store(L + l_base + rows, l_new, mask=row_ok)
            tl.store(M + l_base + rows, m_new, mask=row_ok)


@triton.jit
def _v2_step(acc, l_i, m_i, q, K, V, base, stride_s, lo, hi, rows, seqlen, qk_scale,
             HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
             DEFERRED: tl.constexpr, EXP2: tl.constexpr, DOT_FP32: tl.constexpr,
             BLOCK_N: tl.constexpr):
    dt = tl.float32 if DOT_FP32 else q.dtype
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            k = tl.load(K + base + cols[:, None] * stride_s + offs_d[None, :],
                        mask=cols[:, None] < seqlen, other=0.0)
            v = tl.load(V + base + cols[:, None] * stride_s + offs_d[None, :],
                        mask=cols[:, None] < seqlen, other=0.0)
        else:
            k = tl.load(K + base + cols[:, None] * stride_s + offs_d[None, :])
            v = tl.load(V + base + cols[:, None] * stride_s + offs_d[None, :])
        s = tl.dot(q.to(dt), tl.trans(k.to(dt))) * qk_scale
        if MASKED:
            keep = cols[None, :] < seqlen
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        if EXP2:
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
        else:
            p = tl.exp(s - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
        l_new = l_i * alpha + tl.sum(p, 1)
        if DEFERRED:   # v2: rescale only; divide once after the loop
            acc = tl.dot(p.to(dt), v.to(dt), acc * alpha[:, None])
        else:          # v1's arithmetic: keep O normalised at every step
            l_div = tl.where(l_new == 0.0, 1.0, l_new)
            acc = acc * (l_i * alpha / l_div)[:, None]
            acc = tl.dot((p / l_div[:, None]).to(dt), v.to(dt), acc)
        l_i = l_new
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _v2_kernel(Q, K, V, O, stride_b, stride_s, stride_h, seqlen, num_heads, sm_scale,
               HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DEFERRED: tl.constexpr,
               EXP2: tl.constexpr, SKIP: tl.constexpr, DOT_FP32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """FlashAttention-2's loop order: one program per (query block, batch, head)."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    pid_bh = tl.program_id(1)
    base = (pid_bh // num_heads).to(tl.int64) * stride_b + (pid_bh % num_heads) * stride_h
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + rows[:, None] * stride_s + offs_d[None, :],
                mask=rows[:, None] < seqlen, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634 if EXP2 else sm_scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if SKIP:
        if CAUSAL:
            hi = tl.minimum(start_m + BLOCK_M, seqlen)
            mid = ((start_m + 1) // BLOCK_N) * BLOCK_N
        else:
            hi = seqlen
            mid = (seqlen // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _v2_step(acc, l_i, m_i, q, K, V, base, stride_s, 0, mid, rows, seqlen,
                                 qk_scale, HEAD_DIM, CAUSAL, False, DEFERRED, EXP2, DOT_FP32,
                                 BLOCK_N)
        acc, l_i, m_i = _v2_step(acc, l_i, m_i, q, K, V, base, stride_s, mid, hi, rows, seqlen,
                                 qk_scale, HEAD_DIM, CAUSAL, True, DEFERRED, EXP2, DOT_FP32,
                                 BLOCK_N)
    else:  # every key block, every one masked (causal above the diagonal computes zeros)
        acc, l_i, m_i = _v2_step(acc, l_i, m_i, q, K, V, base, stride_s, 0, seqlen, rows,
                                 seqlen, qk_scale, HEAD_DIM, CAUSAL, True, DEFERRED, EXP2,
                                 DOT_FP32, BLOCK_N)
    if DEFERRED:
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + base + rows[:, None] * stride_s + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=rows[:, None] < seqlen)


STEPS = ("v1", "v2_order", "deferred", "skip", "tuned", "tma")


def _check(q, k, v):
    if not (q.shape == k.shape == v.shape) or q.dim() != 4:
        raise ValueError("the ablation takes q, k, v of one shape (batch, seqlen, heads, headdim)")
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError("the ablation takes contiguous tensors")
    if q.shape[-1] not in (32, 64, 128):
        raise ValueError(f"the ablation kernels take headdim 32, 64 or 128, got {q.shape[-1]}")


def attention_step(step: str, q, k, v, causal: bool = False, tile=None):
    """Attention forward by one step of the ablation. Returns out (q's shape and dtype)."""
    _check(q, k, v)
    b, s, h, d = q.shape
    scale = d ** -0.5
    if tile is None:
        tile = UNTUNED_TILE if step in ("v1", "v2_order", "deferred", "skip") else None
    if INTERPRET:
        tile = (32, 16, 4, 1)
    if step == "tma":
        p = flash_attn._Problem(q, k, v, scale, causal)
        out, _ = flash_attn._flash_fwd(q, k, v, p, use_tma=True, tile=tile)
        return out
    if tile is None:
        raise ValueError(f"step {step!r} needs a tile")
    bm, bn, w, st = tile
    if step == "v1":
        o32 = torch.zeros(b, h, s, d, dtype=torch.float32, device=q.device)
        l = torch.zeros(b, h, s, dtype=torch.float32, device=q.device)
        m = torch.full((b, h, s), float("-inf"), dtype=torch.float32, device=q.device)
        _v1_kernel[(b * h,)](q, k, v, o32, l, m, q.stride(0), q.stride(1), q.stride(2), s, h,
                             scale, HEAD_DIM=d, CAUSAL=causal, DOT_FP32=INTERPRET,
                             BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
        return o32.transpose(1, 2).to(q.dtype)
    flags = {"v2_order": (False, False, False), "deferred": (True, True, False),
             "skip": (True, True, True), "tuned": (True, True, True)}
    if step not in flags:
        raise ValueError(f"unknown step {step!r}; steps: {STEPS}")
    deferred, exp2, skip = flags[step]
    out = torch.empty_like(q)
    _v2_kernel[(triton.cdiv(s, bm), b * h)](
        q, k, v, out, q.stride(0), q.stride(1), q.stride(2), s, h, scale, HEAD_DIM=d,
        CAUSAL=causal, DEFERRED=deferred, EXP2=exp2, SKIP=skip, DOT_FP32=INTERPRET,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    return out
