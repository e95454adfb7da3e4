"""The online softmax and FlashAttention's algorithm as plain NumPy loops.

Nothing here is fast: every function is written so that a learner can step through it in
a debugger and watch the running max ``m``, the running sum ``l`` and the output ``O``
change. Each one is checked against ``torch.softmax`` or ``common.reference.attention_ref``
in ``test_online_softmax.py``. The order of the file is the order of the lesson:

1. ``softmax_naive``         exp(x) / sum(exp(x)): overflows for x > 88 in float32.
2. ``softmax_safe``          subtract the max first: three passes over x.
3. ``softmax_online``        the max and the sum in ONE pass (Milakov & Gimelshein, 2018):
                             when the max grows, rescale the sum seen so far.
4. ``softmax_online_blocks`` the same, a block of elements at a time (what a GPU tile does).
5. ``attention_online_row``  one query row: the output is rescaled like the sum, so the
                             whole of attention needs a single pass over the keys.
6. ``flash_attention_v1_loops``  Algorithm 1 of FlashAttention (Dao et al., 2022): outer loop
                             over K/V blocks, inner loop over Q blocks; O, l, m live in
                             "HBM" (NumPy arrays) and are read and written every step.
7. ``flash_attention_v2_loops``  FlashAttention-2's order (Dao, 2023): outer loop over Q
                             blocks, inner over K/V blocks; O, l, m stay "on chip" (locals)
                             and O is divided by l once at the end.

All work on one head: q (seqlen_q, d), k and v (seqlen_k, d), float64 by default.
``causal`` is bottom-right aligned: query i sees key j iff j <= i + seqlen_k - seqlen_q.
Rows that see no key return zeros and lse = +inf (``attention_ref``'s convention).
"""

from __future__ import annotations

import math

import numpy as np


# ----------------------------------------------------------------------------------------
# 1-4: softmax of one vector

def softmax_naive(x: np.ndarray) -> np.ndarray:
    """exp(x_j) / sum_k exp(x_k): the definition. exp(89) is inf in float32, so a score of
    89 turns the whole row into nan (inf / inf)."""
    e = np.exp(x)
    return e / e.sum()


def softmax_safe(x: np.ndarray) -> np.ndarray:
    """The safe softmax: softmax(x) = softmax(x - c) for any c; with c = max(x) every
    exponent is <= 0, so nothing overflows. Three passes over x (lesson 06's GPU kernel
    ``softmax_rows_kernel`` does exactly these three loops)."""
    m = -math.inf
    for xj in x:              # pass 1: the max
        m = max(m, xj)
    l = 0.0
    for xj in x:              # pass 2: the sum of exp(x - m)
        l += math.exp(xj - m)
    return np.array([math.exp(xj - m) / l for xj in x], dtype=x.dtype)  # pass 3


def softmax_online(x: np.ndarray) -> np.ndarray:
    """Max and sum in one pass. Invariant after element j: m = max(x[:j+1]) and
    l = sum_{k<=j} exp(x_k - m). When x_j raises the max from m to m_new, every term
    already in l was computed against the old m: multiplying l by exp(m - m_new) moves
    them all to the new reference at once (exp(a - m) * exp(m - m_new) = exp(a - m_new))."""
    m, l = -math.inf, 0.0
    for xj in x:              # pass 1: running max and running sum together
        m_new = max(m, xj)
        l = l * math.exp(m - m_new) + math.exp(xj - m_new)
        m = m_new
    return np.array([math.exp(xj - m) / l for xj in x], dtype=x.dtype)  # pass 2


def softmax_online_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """The online softmax a block at a time: each block's local max m_b and local sum
    l_b are merged into the running (m, l) with the same rescaling. This is the form a
    GPU tile computes: the block is the tile, the merge is one line per row."""
    m, l = -math.inf, 0.0
    for start in range(0, len(x), block):
        xb = x[start:start + block]
        m_b = float(xb.max())                       # local statistics of the block
        l_b = float(np.exp(xb - m_b).sum())
        m_new = max(m, m_b)                         # merge
        l = l * math.exp(m - m_new) + l_b * math.exp(m_b - m_new)
        m = m_new
    return np.exp(x - m) / l


# ----------------------------------------------------------------------------------------
# 5: attention for one query row, one pass over the keys

def _visible(i: int, j: int, seqlen_q: int, seqlen_k: int, causal: bool) -> bool:
    return (not causal) or j <= i + seqlen_k - seqlen_q


def attention_online_row(q_row, k, v, softmax_scale, causal=False, row=0, seqlen_q=1):
    """o = softmax(scale * q k^T) v for one query, keys visited one at a time.

    The output is a weighted sum with the softmax weights, and the weights' denominator
    is only known at the end. Keep o unnormalized (o = sum_j exp(s_j - m) v_j) and rescale
    it exactly like l when m grows; divide by l once at the end. Returns (o, lse).
    """
    seqlen_k, d = k.shape
    m, l = -math.inf, 0.0
    o = np.zeros(v.shape[1], dtype=np.float64)
    for j in range(seqlen_k):
        if not _visible(row, j, seqlen_q, seqlen_k, causal):
            continue
        s_j = softmax_scale * float(q_row @ k[j])
        m_new = max(m, s_j)
        alpha = math.exp(m - m_new)              # rescales what was accumulated so far
        p_j = math.exp(s_j - m_new)
        l = l * alpha + p_j
        o = o * alpha + p_j * v[j]
        m = m_new
    if l == 0.0:                                 # no visible key
        return np.zeros_like(o), math.inf
    return o / l, m + math.log(l)


def attention_rowwise(q, k, v, softmax_scale=None, causal=False):
    """``attention_online_row`` for every query row of one head: (o, lse)."""
    seqlen_q, d = q.shape
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    o = np.zeros((seqlen_q, v.shape[1]))
    lse = np.zeros(seqlen_q)
    for i in range(seqlen_q):
        o[i], lse[i] = attention_online_row(q[i], k, v, scale, causal, row=i, seqlen_q=seqlen_q)
    return o, lse


# ----------------------------------------------------------------------------------------
# 6: FlashAttention (v1), Algorithm 1 of the paper, line by line

def _masked_scores(q_i, k_j, scale, rows, cols, seqlen_q, seqlen_k, causal):
    """S_ij = scale * Q_i K_j^T with -inf where a query may not see a key."""
    s = scale * (q_i @ k_j.T)
    if causal:
        s = np.where(cols[None, :] > rows[:, None] + seqlen_k - seqlen_q, -np.inf, s)
    return s


def _rowmax(s):
    """max over each row; -inf for a row with no visible key (no warning, no nan)."""
    return s.max(axis=1) if s.shape[1] else np.full(s.shape[0], -np.inf)


def _exp_diff(a, m):
    """exp(a - m) elementwise, and 0 where m = -inf: a row that has seen no visible key
    yet has m = -inf and a = -inf, and exp(-inf - (-inf)) would be nan. GPU kernels need
    the same guard (lesson 07's kernel has it, on the same rows)."""
    with np.errstate(invalid="ignore"):
        return np.where(np.isneginf(m), 0.0, np.exp(a - m))


def _exp_shifted(s, m):
    """exp(S - m) with one m per row (0 for rows whose m is -inf)."""
    return _exp_diff(s, m[:, None])


def flash_attention_v1_loops(q, k, v, softmax_scale=None, causal=False,
                             block_m=16, block_n=16):
    """Algorithm 1 (FlashAttention forward), for one head. Returns (O, lse).

    The comments quote the paper's line numbers. Br = block_m query rows and Bc = block_n
    key rows form a tile; the paper picks them from the SRAM size M (Bc = ceil(M / 4d),
    Br = min(Bc, d)); any sizes give the same result.
    """
    seqlen_q, d = q.shape
    seqlen_k = k.shape[0]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    # line 2: O = 0, l = 0, m = -inf "in HBM"
    O = np.zeros((seqlen_q, v.shape[1]))
    l = np.zeros(seqlen_q)
    m = np.full(seqlen_q, -np.inf)
    # line 3-4: split Q, O, l, m into Tr blocks of Br rows, K, V into Tc blocks of Bc rows
    for c0 in range(0, seqlen_k, block_n):                       # line 5: for j = 1..Tc
        cols = np.arange(c0, min(c0 + block_n, seqlen_k))
        K_j, V_j = k[cols], v[cols]                              # line 6: load K_j, V_j
        for r0 in range(0, seqlen_q, block_m):                   # line 7: for i = 1..Tr
            rows = np.arange(r0, min(r0 + block_m, seqlen_q))
            Q_i, O_i, l_i, m_i = q[rows], O[rows], l[rows], m[rows]  # line 8: load
            S_ij = _masked_scores(Q_i, K_j, scale, rows, cols,
                                  seqlen_q, seqlen_k, causal)    # line 9
            m_ij = _rowmax(S_ij)                                 # line 10: rowmax
            P_ij = _exp_shifted(S_ij, m_ij)                      #          exp(S - m~)
            l_ij = P_ij.sum(axis=1)                              #          rowsum
            m_new = np.maximum(m_i, m_ij)                        # line 11: m_new
            e_old = _exp_diff(m_i, m_new)                        #   e^{m_i - m_new}
            e_new = _exp_diff(m_ij, m_new)                       #   e^{m~_ij - m_new}
            l_new = e_old * l_i + e_new * l_ij                   #   l_new
            # line 12: O_i = diag(l_new)^-1 (diag(l_i) e^{m_i - m_new} O_i + e^{m~_ij - m_new} P~_ij V_j)
            # (a row with l_new = 0 has seen no key: it stays 0)
            inv = np.where(l_new > 0, 1.0 / np.where(l_new > 0, l_new, 1.0), 0.0)
            O[rows] = inv[:, None] * ((l_i * e_old)[:, None] * O_i + e_new[:, None] * (P_ij @ V_j))
            l[rows], m[rows] = l_new, m_new                      # line 13: write l_i, m_i
    lse = np.where(l > 0, m + np.log(np.where(l > 0, l, 1.0)), np.inf)
    return O, lse                                                # line 16: return O


# ----------------------------------------------------------------------------------------
# 7: FlashAttention-2's loop order, for comparison

def flash_attention_v2_loops(q, k, v, softmax_scale=None, causal=False,
                             block_m=16, block_n=16):
    """Algorithm 1 of FlashAttention-2, for one head. Returns (O, lse).

    Swapped loops: each Q block is loaded once and walks all K/V blocks, so O_i, l_i,
    m_i never leave "on-chip" locals (no HBM traffic for them), O_i stays unnormalized
    (only the e^{m_old - m_new} rescale per step, no division), and the Q blocks are
    independent: on a GPU each becomes its own thread block (parallel over seqlen).
    """
    seqlen_q, d = q.shape
    seqlen_k = k.shape[0]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    O = np.zeros((seqlen_q, v.shape[1]))
    lse = np.full(seqlen_q, np.inf)
    for r0 in range(0, seqlen_q, block_m):                       # for i = 1..Tr (parallel)
        rows = np.arange(r0, min(r0 + block_m, seqlen_q))
        Q_i = q[rows]                                            # load Q_i once
        acc = np.zeros((len(rows), v.shape[1]))                  # on chip: O_i, l_i, m_i
        l_i = np.zeros(len(rows))
        m_i = np.full(len(rows), -np.inf)
        for c0 in range(0, seqlen_k, block_n):                   # for j = 1..Tc
            cols = np.arange(c0, min(c0 + block_n, seqlen_k))
            S_ij = _masked_scores(Q_i, k[cols], scale, rows, cols, seqlen_q, seqlen_k, causal)
            m_new = np.maximum(m_i, _rowmax(S_ij))
            P_ij = _exp_shifted(S_ij, m_new)                     # exp(S - m_new) directly
            alpha = _exp_diff(m_i, m_new)                        # e^{m_old - m_new}
            l_i = alpha * l_i + P_ij.sum(axis=1)
            acc = alpha[:, None] * acc + P_ij @ v[cols]          # unnormalized
            m_i = m_new
        seen = l_i > 0
        O[rows] = np.where(seen[:, None], acc / np.where(seen, l_i, 1.0)[:, None], 0.0)  # once
        lse[rows] = np.where(seen, m_i + np.log(np.where(seen, l_i, 1.0)), np.inf)
    return O, lse


# ----------------------------------------------------------------------------------------
# Batched helpers: (batch, seqlen, heads, d) arrays, flash-attn's layout

def per_head(fn, q, k, v, softmax_scale=None, causal=False, **kw):
    """Apply a one-head function to every (batch, head): returns O (b, sq, h, d) and
    lse (b, h, sq) as float64 arrays, the shapes ``attention_ref`` returns."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, seqlen_q, heads, _ = q.shape
    O = np.zeros((batch, seqlen_q, heads, v.shape[3]))
    lse = np.zeros((batch, heads, seqlen_q))
    for b in range(batch):
        for h in range(heads):
            O[b, :, h], lse[b, h] = fn(q[b, :, h], k[b, :, h], v[b, :, h],
                                       softmax_scale, causal, **kw)
    return O, lse
