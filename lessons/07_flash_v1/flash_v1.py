"""FlashAttention (v1) forward, Algorithm 1 of Dao et al. (2022), in Numba-CUDA.

The paper's algorithm, for one (batch, head), with tiles of Br query rows and Bc key rows:

    2  O = 0, l = 0, m = -inf  in HBM
    5  for j in 1..Tc:                                   K/V tiles, the OUTER loop
    6      load K_j, V_j to SRAM (shared memory)
    7      for i in 1..Tr:                               Q tiles, the INNER loop
    8          load Q_i, O_i, l_i, m_i from HBM
    9          S_ij = scale * Q_i K_j^T
    10         m~_ij = rowmax(S_ij); P~_ij = exp(S_ij - m~_ij); l~_ij = rowsum(P~_ij)
    11         m_new = max(m_i, m~_ij); l_new = e^(m_i - m_new) l_i + e^(m~_ij - m_new) l~_ij
    12         O_i = diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~_ij - m_new) P~_ij V_j)
    13         write O_i, l_new, m_new to HBM

``flash_v1_kernel`` below carries these line numbers in its comments. Two kernels around
it: ``init_kernel`` (line 2) and ``finalize_kernel`` (lse = m + log l, and the float32
accumulator cast to float16 when the inputs are float16).

Parallelism. A literal reading gives one thread block per (batch, head) that walks every
(j, i) pair: ``q_tiles_per_block=None``. At the paper's benchmark shape (batch * heads =
128 at N = 4096) that is 128 blocks for 132 SMs, one small block per SM, and each block
keeps re-reading a 1 MB O from HBM. The inner loop's iterations are independent (they
touch different rows of O, l, m), so ``q_tiles_per_block=g`` splits the Tr Q tiles into
groups of g and gives each group its own block; each block still runs Algorithm 1 (K/V
outer, its Q tiles inner, O/l/m read and written every step), just over fewer rows. The
default g = 2 (Tr / 2 x batch x heads blocks) measured fastest on the H100 at N = 4096:
3.2x faster than one block per (b, h), 7% faster than g = 1 (README.md, "parallelism").

Precision: inputs float32 or float16, everything on chip in float32, O kept in HBM in
float32 between steps (FlashAttention's own v1 CUDA code kept such an ``o_tmp`` too:
rounding O to float16 Tc times would add Tc rounding errors).

Tiles: K_j, V_j, Q_i and P~_ij all live in shared memory, in float32; Numba allocates
shared memory statically, and a block may use 48 KB of it, which decides Br and Bc
(``TileConfig``). Each thread computes a TM x TN micro-tile of S_ij and a TM x TD
micro-tile of O_i in registers (rows ty + a*threads_m, columns tx + c*threads_n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from common import runtime
from numba import cuda, float32, uint32
from common.checks import check_attention_inputs
from common.numba_torch import kernel_array

SUPPORTED_HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16)
SHARED_MEMORY_LIMIT = 48 * 1024  # bytes of static shared memory per block
NEG_INF = float32(-math.inf)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the kernel. block_m = Br (query rows), block_n = Bc (key rows);
    the block has threads_m x threads_n threads."""

    block_m: int
    block_n: int
    threads_m: int
    threads_n: int

    def check(self, d: int) -> None:
        if self.block_m % self.threads_m or self.block_n % self.threads_n or d % self.threads_n:
            raise ValueError(f"{self}: block_m must divide by threads_m, block_n and d={d} "
                             "by threads_n")
        if self.block_m > self.threads_m * self.threads_n:
            raise ValueError(f"{self}: needs block_m <= number of threads (one thread per row)")
        if self.shared_bytes(d) > SHARED_MEMORY_LIMIT:
            raise ValueError(f"{self} needs {self.shared_bytes(d)} bytes of shared memory for "
                             f"d={d}, more than {SHARED_MEMORY_LIMIT}")

    def shared_bytes(self, d: int) -> int:
        qp = self.block_m * (max(d, self.block_n) + 1)      # Q_i, then P~_ij
        kv = self.block_n * (d + 1) + self.block_n * d      # K_j (padded), V_j
        stats = self.block_m * self.threads_n + 5 * self.block_m
        return 4 * (qp + kv + stats)


# Chosen for the H100 under the 48 KB limit (README.md, "tiles"): 128 threads, 4 x 4
# micro-tiles for d = 64. Under the simulator every thread is an OS thread: small tiles.
GPU_CONFIGS = {32: TileConfig(64, 64, 16, 8), 64: TileConfig(32, 64, 8, 16),
               128: TileConfig(16, 32, 8, 16)}
EMULATION_CONFIGS = {32: TileConfig(16, 16, 4, 8), 64: TileConfig(16, 16, 4, 8),
                     128: TileConfig(16, 16, 4, 8)}


def default_config(d: int) -> TileConfig:
    return (GPU_CONFIGS if runtime.is_gpu() else EMULATION_CONFIGS)[d]


# ----------------------------------------------------------------------------------------
# The kernels. One compiled kernel per (head dim, tile config): Numba freezes the closure's
# integers into the machine code as constants, so loops over them can be unrolled and the
# per-thread arrays kept in registers.

@lru_cache(maxsize=None)
def build_kernel(d: int, cfg: TileConfig, ablate_o_traffic: bool = False):
    """Compile (lazily, at first launch) Algorithm 1 for head dim ``d`` and tiles ``cfg``.

    ``ablate_o_traffic`` is for the benchmark only: O_i is then neither read from nor
    written to HBM in the loop (the result is WRONG); the time saved is what lines 8 and
    13's O traffic cost.
    """
    cfg.check(d)
    ABLATE_O = ablate_o_traffic
    BR, BC, NTY, NTX = cfg.block_m, cfg.block_n, cfg.threads_m, cfg.threads_n
    D = d
    TM, TN, TD = BR // NTY, BC // NTX, D // NTX   # per-thread micro-tiles
    NT = NTY * NTX
    QP_STRIDE = max(D, BC) + 1   # odd row strides: threads reading one column of
    K_STRIDE = D + 1             # different rows hit different shared-memory banks

    @cuda.jit
    def flash_v1_kernel(q, k, v, o, l, m, softmax_scale, causal, q_tiles_per_block):
        """grid = (ceil(Tr / q_tiles_per_block), batch * heads), block = (threads_n, threads_m).

        q, k, v: (batch, seqlen, heads, D) float32 or float16; o: (batch, seqlen_q,
        heads, D) float32, l and m: (batch, heads, seqlen_q) float32, all read and
        written every step.
        """
        seqlen_q = q.shape[1]
        heads = q.shape[2]
        seqlen_k = k.shape[1]
        bh = cuda.blockIdx.y
        b = bh // heads
        h = bh - b * heads
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * NTX + tx
        # The two inner loops index shared memory with UNSIGNED integers. For a signed
        # index Numba emits Python's negative-index wraparound (if i < 0: i += n), which
        # here also kept the compiler from folding the micro-tile's rows into constant
        # offsets: ~3x more integer instructions than FMAs in the first version, whose
        # time was bound by instruction issue (README.md: "what limits the kernel").
        # Keep unsigned and signed apart: Numba turns uint + int64 into float64.
        tyu = uint32(ty)
        txu = uint32(tx)
        # The K/V staging loop's indices are unsigned too (about half the instructions of
        # the signed version). Not Q's: there it pushed the kernel from 99 to 146 registers,
        # one block less per SM; at 128 (this version) 4 blocks fit, as shared memory allows.
        bu = uint32(b)
        hu = uint32(h)
        seqlen_ku = uint32(seqlen_k)

        k_s = cuda.shared.array((BC, K_STRIDE), float32)    # K_j
        v_s = cuda.shared.array((BC, D), float32)           # V_j
        qp_s = cuda.shared.array((BR, QP_STRIDE), float32)  # Q_i, then P~_ij in its place
        part_s = cuda.shared.array((BR, NTX), float32)      # per-thread row max / row sum
        m_old_s = cuda.shared.array(BR, float32)            # m_i as loaded
        l_old_s = cuda.shared.array(BR, float32)            # l_i as loaded
        m_tile_s = cuda.shared.array(BR, float32)           # m~_ij
        alpha_s = cuda.shared.array(BR, float32)            # l_i e^(m_i - m_new) / l_new
        beta_s = cuda.shared.array(BR, float32)             # e^(m~_ij - m_new) / l_new

        s_acc = cuda.local.array((TM, TN), float32)         # registers: S_ij micro-tile
        o_acc = cuda.local.array((TM, TD), float32)         # registers: P~_ij V_j micro-tile
        a_reg = cuda.local.array(TM, float32)
        b_reg = cuda.local.array(TN, float32)
        d_reg = cuda.local.array(TD, float32)

        n_q_tiles = (seqlen_q + BR - 1) // BR
        n_kv_tiles = (seqlen_k + BC - 1) // BC
        i_begin = cuda.blockIdx.x * q_tiles_per_block
        i_end = min(n_q_tiles, i_begin + q_tiles_per_block)
        diag = seqlen_k - seqlen_q       # causal: query r sees keys c <= r + diag
        last_row_of_group = min(i_end * BR, seqlen_q) - 1

        for j in range(n_kv_tiles):                                   # line 5
            col0 = j * BC
            if causal and col0 > last_row_of_group + diag:
                break  # this and every later K/V tile is masked for all my rows
            # line 6: K_j, V_j -> shared memory (rows past seqlen_k = 0, so 0 * 0 later)
            col0u = uint32(col0)
            for t in range(tid, BC * D, NT):
                tu = uint32(t)
                c = tu // uint32(D)   # consecutive threads: consecutive x (coalesced)
                x = tu % uint32(D)
                if col0u + c < seqlen_ku:
                    k_s[c, x] = float32(k[bu, col0u + c, hu, x])
                    v_s[c, x] = float32(v[bu, col0u + c, hu, x])
                else:
                    k_s[c, x] = float32(0.0)
                    v_s[c, x] = float32(0.0)
            cuda.syncthreads()

            for i in range(i_begin, i_end):                           # line 7
                row0 = i * BR
                if causal and col0 > min(row0 + BR, seqlen_q) - 1 + diag:
                    continue  # K_j is entirely above this tile's diagonal (uniform: no sync hazard)
                # line 8: Q_i -> shared; l_i, m_i -> shared (O_i is read in registers below)
                for t in range(tid, BR * D, NT):
                    r = t // D
                    x = t - r * D
                    if row0 + r < seqlen_q:
                        qp_s[r, x] = float32(q[b, row0 + r, h, x])
                    else:
                        qp_s[r, x] = float32(0.0)
                if tid < BR:
                    if row0 + tid < seqlen_q:
                        m_old_s[tid] = m[b, h, row0 + tid]
                        l_old_s[tid] = l[b, h, row0 + tid]
                    else:
                        m_old_s[tid] = NEG_INF
                        l_old_s[tid] = float32(0.0)
                cuda.syncthreads()

                # line 9: S_ij = scale * Q_i K_j^T, a TM x TN micro-tile per thread
                for a in range(TM):
                    for c in range(TN):
                        s_acc[a, c] = float32(0.0)
                for x in range(D):
                    xu = uint32(x)  # unsigned indices: see "tyu" above
                    for a in range(TM):
                        a_reg[a] = qp_s[tyu + uint32(a * NTY), xu]
                    for c in range(TN):
                        b_reg[c] = k_s[txu + uint32(c * NTX), xu]
                    for a in range(TM):
                        for c in range(TN):
                            s_acc[a, c] += a_reg[a] * b_reg[c]
                # scale, mask (past seqlen_k; causal), and this thread's share of rowmax
                for a in range(TM):
                    r = row0 + ty + a * NTY
                    mx = NEG_INF
                    for c in range(TN):
                        col = col0 + tx + c * NTX
                        val = s_acc[a, c] * softmax_scale
                        if col >= seqlen_k or (causal and col > r + diag):
                            val = NEG_INF
                        s_acc[a, c] = val
                        mx = max(mx, val)
                    part_s[ty + a * NTY, tx] = mx
                cuda.syncthreads()  # all partial maxima written; all reads of Q_i done

                # line 10: m~_ij = rowmax(S_ij), one thread per row over the partials
                if tid < BR:
                    mx = NEG_INF
                    for t in range(NTX):
                        mx = max(mx, part_s[tid, t])
                    m_tile_s[tid] = mx
                cuda.syncthreads()
                # line 10: P~_ij = exp(S_ij - m~_ij) into shared memory (over Q_i, no
                # longer needed), and this thread's share of l~_ij = rowsum(P~_ij)
                for a in range(TM):
                    rr = ty + a * NTY
                    mt = m_tile_s[rr]
                    sm = float32(0.0)
                    for c in range(TN):
                        pv = float32(0.0)
                        if mt != NEG_INF:  # a row with no visible key in K_j: P~ = 0
                            pv = math.exp(s_acc[a, c] - mt)
                        qp_s[rr, tx + c * NTX] = pv
                        sm += pv
                    part_s[rr, tx] = sm
                cuda.syncthreads()

                # lines 10-11, 13: l~_ij, m_new, l_new; write l_i, m_i back to HBM
                if tid < BR:
                    lt = float32(0.0)
                    for t in range(NTX):
                        lt += part_s[tid, t]
                    mt = m_tile_s[tid]
                    mo = m_old_s[tid]
                    lo = l_old_s[tid]
                    mn = max(mo, mt)
                    if mn == NEG_INF:  # no visible key so far: O stays 0
                        ln = float32(0.0)
                        alpha_s[tid] = float32(0.0)
                        beta_s[tid] = float32(0.0)
                    else:
                        e_old = math.exp(mo - mn)   # exp(-inf) = 0 on a row's first step
                        e_new = math.exp(mt - mn)
                        ln = e_old * lo + e_new * lt  # >= 1: the max term contributes 1
                        alpha_s[tid] = e_old * lo / ln
                        beta_s[tid] = e_new / ln
                    if row0 + tid < seqlen_q:
                        l[b, h, row0 + tid] = ln                      # line 13
                        m[b, h, row0 + tid] = mn
                cuda.syncthreads()

                # line 12: O_i = alpha * O_i + beta * (P~_ij V_j), TM x TD per thread
                for a in range(TM):
                    for e in range(TD):
                        o_acc[a, e] = float32(0.0)
                for c in range(BC):
                    cu = uint32(c)
                    for a in range(TM):
                        a_reg[a] = qp_s[tyu + uint32(a * NTY), cu]
                    for e in range(TD):
                        d_reg[e] = v_s[cu, txu + uint32(e * NTX)]
                    for a in range(TM):
                        for e in range(TD):
                            o_acc[a, e] += a_reg[a] * d_reg[e]
                for a in range(TM):
                    rr = ty + a * NTY
                    r = row0 + rr
                    if r < seqlen_q:
                        al = alpha_s[rr]
                        be = beta_s[rr]
                        for e in range(TD):
                            x = tx + e * NTX
                            if ABLATE_O:  # never true (be >= 0): keeps the work, drops the traffic
                                if be < float32(0.0):
                                    o[b, r, h, x] = o_acc[a, e]
                            else:
                                o[b, r, h, x] = al * o[b, r, h, x] + be * o_acc[a, e]  # line 8 + 13
                cuda.syncthreads()  # before the next Q tile overwrites qp_s and the stats
            cuda.syncthreads()      # before the next K/V tile overwrites k_s, v_s

    return flash_v1_kernel


@cuda.jit
def init_kernel(o_flat, l_flat, m_flat):
    """Line 2: O = 0, l = 0, m = -inf (grid-stride over the flattened arrays)."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for t in range(start, o_flat.shape[0], stride):
        o_flat[t] = float32(0.0)
    for t in range(start, l_flat.shape[0], stride):
        l_flat[t] = float32(0.0)
        m_flat[t] = NEG_INF


@cuda.jit
def finalize_kernel(l_flat, m_flat, lse_flat, o_acc_flat, out_flat, cast_out):
    """lse = m + log(l) (+inf for a row that saw no key), and out = O cast to the input
    dtype when O was accumulated in a separate float32 buffer (``cast_out``)."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for t in range(start, l_flat.shape[0], stride):
        lv = l_flat[t]
        lse_flat[t] = m_flat[t] + math.log(lv) if lv > float32(0.0) else float32(math.inf)
    if cast_out:
        for t in range(start, o_acc_flat.shape[0], stride):
            out_flat[t] = o_acc_flat[t]


# ----------------------------------------------------------------------------------------
# Host side



def check_inputs(q, k, v, softmax_scale, q_tiles_per_block):
    """Every check before any launch; returns the softmax scale as a float."""
    scale = check_attention_inputs(q, k, v, softmax_scale, dtypes=SUPPORTED_DTYPES,
                                   head_dims=SUPPORTED_HEAD_DIMS)
    if q.shape[0] * q.shape[2] > 65535:
        raise ValueError("batch * heads must be <= 65535 (the grid's y dimension)")
    if q_tiles_per_block is not None and (not isinstance(q_tiles_per_block, int)
                                          or q_tiles_per_block < 1):
        raise ValueError(f"q_tiles_per_block must be a positive int or None, got {q_tiles_per_block!r}")
    return scale


def flash_attn_v1(q, k, v, softmax_scale: float | None = None, causal: bool = False, *,
                  q_tiles_per_block: int | None = 2, config: TileConfig | None = None,
                  out=None, _ablate_o_traffic: bool = False):
    """FlashAttention v1 forward: returns (out, lse).

    q: (batch, seqlen_q, heads, d), k and v: (batch, seqlen_k, heads, d), float32 or
    float16, d in (32, 64, 128), CUDA tensors on a GPU (CPU tensors under the simulator).
    out: (batch, seqlen_q, heads, d) in q's dtype; lse: (batch, heads, seqlen_q) float32
    natural-log, +inf for a query that sees no key. ``causal`` is bottom-right aligned.
    ``q_tiles_per_block``: Q tiles per thread block (None: all, one block per (b, h), the
    paper's Algorithm 1 read literally; 2, the default, measured fastest).
    """
    scale = check_inputs(q, k, v, softmax_scale, q_tiles_per_block)
    batch, seqlen_q, heads, d = q.shape
    seqlen_k = k.shape[1]
    cfg = config or default_config(d)
    kernel = build_kernel(d, cfg, _ablate_o_traffic)  # validates cfg for d
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(q.shape)} {q.dtype} tensor on {q.device}")
    lse = torch.empty(batch, heads, seqlen_q, dtype=torch.float32, device=q.device)
    if batch * heads * seqlen_q == 0:
        return out, lse
    if seqlen_k == 0:  # no key at all: zeros and +inf, nothing to launch
        out.zero_()
        lse.fill_(math.inf)
        return out, lse
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()

    # O accumulates in float32 in HBM; for float32 inputs that buffer is `out` itself.
    o_acc = out if out.dtype == torch.float32 else torch.empty(q.shape, dtype=torch.float32,
                                                               device=q.device)
    l = torch.empty(batch, heads, seqlen_q, dtype=torch.float32, device=q.device)
    m = torch.empty_like(l)
    n_q_tiles = math.ceil(seqlen_q / cfg.block_m)
    g = n_q_tiles if q_tiles_per_block is None else min(q_tiles_per_block, n_q_tiles)

    elementwise_grid = (min(4096, math.ceil(o_acc.numel() / 256)), 1)
    init_kernel[elementwise_grid[0], 256](kernel_array(o_acc.view(-1)),
                                          kernel_array(l.view(-1)), kernel_array(m.view(-1)))
    kernel[(math.ceil(n_q_tiles / g), batch * heads), (cfg.threads_n, cfg.threads_m)](
        kernel_array(q), kernel_array(k), kernel_array(v), kernel_array(o_acc),
        kernel_array(l), kernel_array(m), np.float32(scale), bool(causal), g)
    finalize_kernel[elementwise_grid[0], 256](
        kernel_array(l.view(-1)), kernel_array(m.view(-1)), kernel_array(lse.view(-1)),
        kernel_array(o_acc.view(-1)), kernel_array(out.view(-1)), o_acc is not out)
    return out, lse


# ----------------------------------------------------------------------------------------
# What the kernel moves and holds (the README's and the benchmark's analytic columns)

F32 = 4


def hbm_bytes(batch, seqlen_q, seqlen_k, heads, d, cfg: TileConfig, elem=4,
              q_tiles_per_block=2, causal=False) -> dict:
    """Global-memory bytes the kernels request, by kind (README.md: "bytes moved").

    Per (i, j) step: read Q_i (elem bytes), read and write O_i (float32), l_i, m_i.
    Each block reads every K_j, V_j it visits once. Causal: only tiles with a visible key.
    """
    bh = batch * heads
    br, bc = cfg.block_m, cfg.block_n
    tr, tc = math.ceil(seqlen_q / br), math.ceil(seqlen_k / bc)
    g = tr if q_tiles_per_block is None else min(q_tiles_per_block, tr)
    diag = seqlen_k - seqlen_q

    def kv_tiles(last_row):  # K/V tiles with at least one key visible to rows <= last_row
        return tc if not causal else min(tc, max(0, (last_row + diag) // bc + 1))

    steps = sum(kv_tiles(min((i + 1) * br, seqlen_q) - 1) for i in range(tr))
    kv_loads = sum(kv_tiles(min((gi + g) * br, seqlen_q) - 1) for gi in range(0, tr, g))
    out = {
        "kv": bh * kv_loads * 2 * bc * d * elem,
        "q": bh * steps * br * d * elem,
        "o_l_m": bh * steps * br * (2 * d + 4) * F32,
        "init_final": bh * seqlen_q * (d + 2) * F32 + bh * seqlen_q * 3 * F32
                      + (bh * seqlen_q * d * (F32 + elem) if elem != F32 else 0),
    }
    out["total"] = sum(out.values())
    return out


def peak_bytes(batch, seqlen_q, seqlen_k, heads, d, elem=4) -> int:
    """Q, K, V, O, l, m, lse, and the float32 O accumulator for float16 inputs."""
    io = 2 * batch * seqlen_q * heads * d * elem + 2 * batch * seqlen_k * heads * d * elem
    acc = batch * seqlen_q * heads * d * F32 if elem != F32 else 0
    return io + acc + 3 * batch * heads * seqlen_q * F32
