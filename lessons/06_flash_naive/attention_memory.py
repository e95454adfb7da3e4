"""What attention costs in memory: bytes moved to and from HBM, and peak memory.

Pure arithmetic, no GPU: the benchmark (``main.py --bench``) puts the measured numbers
(time per kernel, ``torch.cuda.max_memory_allocated``) beside these.

Counting convention (the FlashAttention paper's IO analysis): every load and store the
algorithm performs in global memory is counted once, at the size of its element. Caches
may serve some of them (the GPU has 50 MB of L2), so these are the bytes the algorithm
*asks* for; for standard attention at long sequence lengths they are also what the HBM
sees, because an N x N matrix of 64 MB per (batch, head) at N = 4096 outlives any cache.
"""

from __future__ import annotations

import math

F32 = 4  # S, P, lse, l, m are float32 whatever the input dtype


def standard_bytes(batch, seqlen_q, seqlen_k, heads, d, elem=4) -> dict:
    """HBM bytes of lesson 06's three kernels (Algorithm 0 of the paper), per kernel.

    scores:  read Q, K; write S                       (N x N float32)
    softmax: read S; write P and lse (one read of S per pass; the count assumes passes 2
             and 3 hit the cache, which they do: one row is 16 KB at N = 4096)
    pv:      read P, V; write O
    """
    bh = batch * heads
    nn = bh * seqlen_q * seqlen_k * F32
    q = batch * seqlen_q * heads * d * elem
    kv = batch * seqlen_k * heads * d * elem
    lse = bh * seqlen_q * F32
    out = {"scores": q + kv + nn, "softmax": 2 * nn + lse, "pv": nn + kv + q}
    out["total"] = sum(out.values())
    return out


def standard_peak_bytes(batch, seqlen_q, seqlen_k, heads, d, elem=4) -> int:
    """Memory alive at once: Q, K, V, O, S, P and lse (S and P are both allocated)."""
    bh = batch * heads
    return (2 * bh * seqlen_q * seqlen_k * F32
            + 2 * batch * seqlen_q * heads * d * elem + 2 * batch * seqlen_k * heads * d * elem
            + bh * seqlen_q * F32)


def minimal_bytes(batch, seqlen_q, seqlen_k, heads, d, elem=4) -> int:
    """The floor for any attention: read Q, K, V once, write O and lse once."""
    return (2 * batch * seqlen_q * heads * d + 2 * batch * seqlen_k * heads * d) * elem \
        + batch * heads * seqlen_q * F32


def max_seqlen_that_fits(memory_bytes, batch, heads, d, elem=4) -> int:
    """Largest N (seqlen_q = seqlen_k = N) whose standard attention fits in memory_bytes."""
    lo, hi = 1, 1
    while standard_peak_bytes(batch, hi, hi, heads, d, elem) <= memory_bytes:
        hi *= 2
    while lo < hi - 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        if standard_peak_bytes(batch, mid, mid, heads, d, elem) <= memory_bytes:
            lo = mid
        else:
            hi = mid
    return lo
