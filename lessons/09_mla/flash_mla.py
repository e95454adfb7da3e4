"""FlashMLA's decoding interface in Triton: split-KV attention over a paged MLA cache.

After the up-projections are absorbed (see ``mla_layer.py``), decoding one token of
Multi-head Latent Attention is multi-query attention: every query head reads the same
cache rows of 576 values (512 latent + 64 RoPE key), and the values are the first 512
channels of those same rows. This module serves that computation through the interface
of DeepSeek's FlashMLA, as of its commit 9241ae3 (2026-04-29):

    sched_meta, _ = get_mla_metadata()          # empty; one per set of lengths
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
                                      sched_meta, causal=...)   # the first call plans

(The 2025 form, ``plan_mla_splits``' two tensors in place of ``sched_meta``, still works.)
A plan and two kernels, in the order they run:

1. ``plan_mla_splits`` plans the work (a few small tensor ops on the device, no host
   sync): every sequence is cut into equal splits of at most ``chunk`` key blocks, and
   the splits are listed largest first. The hardware starts programs in that order, so
   the long pieces start early and the short ones fill the gaps at the end: one long and
   many short sequences finish together. ``chunk`` comes from a small model of the
   launch (waves of the programs that run at once, plus what each split's partial
   output costs). (FlashMLA's own plan, equal *shares* that may end inside a sequence,
   is ``plan="shares"``: ``_mla_shares_kernel``.)
2. ``_mla_decode_kernel``: program (m_block, kv head, row of the plan) walks the key
   blocks of its split, page by page. Its BLOCK_M query rows are (seqlen_q x heads of
   one kv head) folded together, so one 64 x 576 tile of the cache, loaded once from
   HBM, serves every head: that is what makes MLA decoding cheap. The first dot uses
   all 576 channels, the second reuses the first 512 of the same tile as V. A sequence
   with one split writes its output directly; otherwise it writes an fp32 partial
   output and its log-sum-exp.
3. ``_mla_combine_kernel``: merges the partial outputs of split sequences through their
   log-sum-exps, out = sum_i exp(lse_i - lse) * o_i with lse = log sum_i exp(lse_i).

Everything is masked by ``cache_seqlens`` *before* it is loaded: table slots and cache
rows that no sequence owns are never read (the tests fill them with NaN and garbage).
Whatever the values of cache_seqlens and block_table, every index is clamped into the
tensors given; a bad value clears a flag that ``torch._assert_async`` turns into an error
at the next sync (no host sync per call). ``course::mla_plan`` and ``course::mla_decode``
are custom ops, so ``torch.compile(fullgraph=True)`` traces through the wrapper.
Names follow FlashAttention-2: ``m_i`` running max, ``l_i`` running sum, ``acc`` the
unnormalised output, exp2 with log2(e) folded into the scale.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from common import runtime  # before triton: selects GPU or the interpreter

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer, smid

PAGE_SIZE = 64            # tokens per cache page (FlashMLA's block size); also BLOCK_N
HEAD_DIM_K = 576          # 512 latent + 64 RoPE key
HEAD_DIM_V = 512          # V = the latent = the first 512 channels of K
HEAD_DIM_ROPE = HEAD_DIM_K - HEAD_DIM_V
FIXED_OVERHEAD_NUM_BLOCKS = 5     # a sequence's fixed cost in the plan, in blocks (FlashMLA's)
TILE_SCHEDULER_METADATA_SIZE = 8  # int32 per split: sequence, first key, end key, slot, 4 unused
EMULATED_SM_COUNT = 8     # "SMs" under the interpreter: small, so plans still split
LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634


class MLAConfig(NamedTuple):
    """Tile sizes of the decode kernel (``main.py --sweep`` compares them)."""
    block_m: int = 64        # folded query rows per program (seqlen_q x heads per kv head)
    block_dv: int = 512      # output channels per program: 512, or 256 to halve registers
    num_warps: int = 8
    num_stages: int = 2
    parts_per_sm: int = 1    # shares of work per SM in the plan (2 if two programs fit)
    resident_per_sm: int = 1  # programs that run at once on one SM (shared memory, regs)
    split_cost: float | None = None  # a split's partial output, in key blocks of traffic;
                                     # None: splits of one share (no model)


def default_config(rows: int) -> MLAConfig:
    """The config for ``rows = seqlen_q * heads_q // heads_k`` folded query rows, chosen
    with ``main.py --sweep`` (results/config_sweep-*.json, H100, batch 128, cache length
    4096) and checked on the whole benchmark, varying lengths included.

    Up to 32 rows (memory-bound): small tiles on the mma.sync path with 4 warps, two
    programs per SM. 64 rows and more: BLOCK_M = 64 on Hopper's wgmma with 8
    warps (FlashMLA's tile); a 64 x 512 fp32 accumulator already takes 128 registers per
    thread, so 128 and 256 rows become 2 and 4 programs that read the same cache tiles
    (the later reads mostly hit L2). 32-row tiles at 64+ rows tie at fixed lengths in the
    sweep but lose 7-30% where lengths vary: twice the programs per split.

    The plan up to 64 rows picks its split size with a model of the launch
    (``_modeled_chunk``): each split writes BLOCK_M x 2 KB of fp32 partial output that
    the combine reads back, BLOCK_M x 4 KB of traffic, so ``split_cost`` = BLOCK_M / 18
    key blocks (a block is 64 x 576 x 2 B = 72 KB). Above 64 rows, where 2 or 4 programs
    of 64 rows read the same tiles, splits are one share each: the model lost 2-8% there
    with varying lengths at mean 4096/8192 (results/plan_model_64rows-*.json), and gained
    1-11% at 64 rows.

    resident_per_sm: 16- and 32-row programs take 92 and 112 KB of shared memory, so two
    run on each SM (timeline.py measures it: ``resident``); a 64-row program takes 216 KB.
    """
    if rows <= 16:
        return MLAConfig(16, 512, 4, 2, parts_per_sm=1, resident_per_sm=2, split_cost=16 / 18)
    if rows <= 32:
        return MLAConfig(32, 512, 4, 2, parts_per_sm=2, resident_per_sm=2, split_cost=32 / 18)
    return MLAConfig(64, 512, 8, 2, parts_per_sm=1, resident_per_sm=1,
                     split_cost=64 / 18 if rows <= 64 else None)


# ----------------------------------------------------------------------------------------
# 1. The plan: which program attends to which keys of which sequence.
#
# Each row of the metadata is one split, i.e. one program of the decode kernel:
# [sequence, first key, end key, slot, 0, 0, 0, 0]. `slot` is where the split's partial
# output goes; the splits of sequence b own slots num_splits[b] .. num_splits[b+1] - 1
# (FlashMLA's cumulative count), so the combine kernel finds them without the plan.
# The row order is free, and it is the order in which the hardware starts programs.

def _modeled_chunk(blocks: torch.Tensor, slots: int, split_cost: float):
    """The split size (in key blocks) that a model of the launch finds fastest.

    The model: the plan's pieces, sorted largest first, start in waves of `slots`
    programs (the programs that run at once), and each wave lasts as long as its largest
    piece; every piece of a split sequence adds `split_cost` blocks of partial-output
    traffic, shared by all slots. Candidates run from a quarter of a slot's fair share
    to twice it (28 sizes); the cheapest wins, the larger on a tie. With equal lengths
    this fills whole waves (batch 128 on 264 slots: two pieces per sequence, one wave
    97% full); with varying lengths it avoids a last wave that only a few pieces use.
    Tensor ops only (a sort, a cumsum and a searchsorted over the candidates): no host
    sync. ``timeline.py --variants`` compares it with other split sizes.
    """
    batch = blocks.shape[0]
    fair = torch.clamp((blocks.sum() + slots - 1) // slots, min=1)
    k = torch.arange(32, 3, -1, device=blocks.device)               # largest first
    cand = torch.clamp((fair * k + 15) // 16, min=1)                 # (K,) 2x .. 1/4 fair
    n = torch.clamp((blocks[None, :] + cand[:, None] - 1) // cand[:, None], min=1)  # (K, B)
    size = (blocks[None, :] + n - 1) // n                            # each sequence's piece
    size, order = torch.sort(size, dim=1, descending=True, stable=True)
    ends = torch.cumsum(torch.gather(n, 1, order), 1)                # pieces so far
    waves = (4 * slots + batch + slots - 1) // slots                 # at most this many
    first = torch.arange(waves, device=blocks.device)[None, :] * slots   # a wave's 1st piece
    seq = torch.searchsorted(ends, first.expand(len(cand), waves).contiguous(), right=True)
    wave_len = torch.gather(size, 1, seq.clamp(max=batch - 1)) * (first < ends[:, -1:])
    cost = wave_len.sum(1) + torch.where(n > 1, n, 0).sum(1) * (split_cost / slots)
    return cand.gather(0, torch.argmin(cost).view(1))    # (1,): gather, not .item()


def _plan_equal_splits(cache_seqlens: torch.Tensor, num_parts: int, slots: int,
                       split_cost: float | None, meta, num_splits, max_seqlen_k: int):
    """Equal splits, largest first (flash-decoding's cut, longest-processing-time order).

    chunk: the split size from :func:`_modeled_chunk` (up to 64 rows), or one share =
    (the batch's key blocks + a fixed cost per sequence) / num_parts (above).
    A sequence of `blocks` key blocks becomes ceil(blocks / chunk) splits of equal size
    (within one block); a sequence that fits in one chunk is not split, and the combine
    kernel skips it. Sorted by size, largest first, the long pieces start in the first
    wave and the short ones fill the SMs that free up first.
    Tensor ops only: the plan stays on the device, no host sync.
    """
    batch = cache_seqlens.shape[0]
    dev = cache_seqlens.device
    # Lengths clamped to [0, max_seqlen_k] (the decode kernel clamps the same way): a
    # negative or huge value cannot make more splits than the metadata has rows.
    lens = cache_seqlens.long().clamp(0, max_seqlen_k)
    blocks = (lens + PAGE_SIZE - 1) // PAGE_SIZE
    if split_cost is None:
        work = (blocks + FIXED_OVERHEAD_NUM_BLOCKS).sum()
        chunk = torch.clamp((work + num_parts - 1) // num_parts, min=1)
    else:
        chunk = _modeled_chunk(blocks, slots, split_cost)
    n_split = torch.clamp((blocks + chunk - 1) // chunk, min=1)    # an empty sequence: 1
    num_splits[1:] = torch.cumsum(n_split, 0)

    # Launch order: sequences by the size of their splits, largest first (stable, so
    # equal sizes keep the batch order); all splits of a sequence are adjacent rows.
    size = (blocks + n_split - 1) // n_split
    order = torch.sort(size, descending=True, stable=True).indices
    rows_end = torch.cumsum(n_split[order], 0)        # rows used by the first k of `order`
    row = torch.arange(meta.shape[0], device=dev)
    k = torch.searchsorted(rows_end, row, right=True)  # row -> position in `order`
    used = k < batch
    k = k.clamp(max=batch - 1)
    b = order[k]
    j = row - (rows_end[k] - n_split[b])               # which split of sequence b
    first = j * blocks[b] // n_split[b] * PAGE_SIZE
    end = torch.minimum((j + 1) * blocks[b] // n_split[b] * PAGE_SIZE, lens[b])
    slot = num_splits[b].long() + j
    none = torch.full_like(row, -1)
    meta[:, :4] = torch.stack([torch.where(used, x, none) for x in (b, first, end, slot)],
                              1).to(torch.int32)


@triton.jit
def _mla_shares_kernel(seqlens_ptr, meta_ptr, num_splits_ptr, batch, num_parts, max_rows,
                       BLOCK_N: tl.constexpr, OVERHEAD: tl.constexpr, BLOCK_B: tl.constexpr,
                       META: tl.constexpr):
    """FlashMLA's plan (``plan="shares"``), kept to compare: num_parts equal shares of
    work in batch order; a share that ends inside a sequence splits it. The lengths it
    gets are clamped to >= 0 (by the caller); counts are int64 and no row at or past
    max_rows is written, whatever the lengths."""
    # Total work in blocks of BLOCK_N keys, plus a fixed overhead per sequence (loading
    # its queries, writing its output) so that empty sequences still cost something.
    total = tl.full([], 0, tl.int64)
    for start in range(0, batch, BLOCK_B):
        offs = start + tl.arange(0, BLOCK_B)
        n = tl.load(seqlens_ptr + offs, mask=offs < batch, other=0).to(tl.int64)
        total += tl.sum(tl.where(offs < batch, (n + BLOCK_N - 1) // BLOCK_N + OVERHEAD, 0))
    payload = (total + num_parts - 1) // num_parts + OVERHEAD

    # Walk the sequences once, handing each part `payload` blocks. A part that cannot
    # take all of a sequence's remaining blocks takes what fits, and the sequence gets
    # one more split. Rows are in sequence order, so a split's slot is its row.
    now_idx = batch * 0                    # the sequence being handed out
    now_block = tl.full([], 0, tl.int64)   # its first block not yet handed out
    now_split = batch * 0                  # how many of its splits were handed out already
    cum_splits = batch * 0                 # splits of the sequences before it = its first row
    tl.store(num_splits_ptr, cum_splits)
    for part in range(num_parts):
        remain = payload
        go = now_idx < batch
        while go:
            seqlen = tl.load(seqlens_ptr + now_idx)
            rest = (seqlen + BLOCK_N - 1) // BLOCK_N - now_block
            slot = cum_splits + now_split
            row = meta_ptr + slot * META
            in_meta = slot < max_rows
            if remain >= rest + OVERHEAD:        # the rest of this sequence fits
                tl.store(row + 0, now_idx, mask=in_meta)
                tl.store(row + 1, now_block * BLOCK_N, mask=in_meta)
                tl.store(row + 2, seqlen, mask=in_meta)
                tl.store(row + 3, slot, mask=in_meta)
                cum_splits += now_split + 1
                tl.store(num_splits_ptr + now_idx + 1, cum_splits)
                remain -= rest + OVERHEAD
                now_idx += 1
                now_block = now_block * 0
                now_split = now_split * 0
                go = now_idx < batch
            else:                                # take what fits: one more split
                if remain - OVERHEAD > 0:
                    tl.store(row + 0, now_idx, mask=in_meta)
                    tl.store(row + 1, now_block * BLOCK_N, mask=in_meta)
                    tl.store(row + 2, (now_block + remain - OVERHEAD) * BLOCK_N, mask=in_meta)
                    tl.store(row + 3, slot, mask=in_meta)
                    now_block += remain - OVERHEAD
                    now_split += 1
                    remain = remain * 0
                go = now_idx < 0                 # i.e. False, as a tensor


def _num_sm(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return EMULATED_SM_COUNT


PLANS = ("equal", "shares")


def _plan_params(batch: int, rows: int, heads_k: int, device: torch.device,
                 num_sm_parts=None, num_slots=None, split_cost=None, plan="equal"):
    """The plan's knobs and its metadata's row count (what the fake op needs too)."""
    cfg = default_config(rows)
    m_blocks = triton.cdiv(rows, cfg.block_m)
    sms = _num_sm(device)
    if num_sm_parts is None:
        num_sm_parts = max(1, cfg.parts_per_sm * sms // heads_k // m_blocks)
    if num_slots is None:
        num_slots = max(1, cfg.resident_per_sm * sms // heads_k // m_blocks)
    if split_cost is None:
        split_cost = cfg.split_cost
    if num_sm_parts < 1 or num_slots < 1 or (split_cost is not None and split_cost < 0):
        raise ValueError("num_sm_parts and num_slots must be positive, split_cost >= 0")
    modeled = plan == "equal" and split_cost is not None
    max_splits = batch + (4 * num_slots if modeled else num_sm_parts)
    return num_sm_parts, num_slots, split_cost if modeled else None, max_splits


MAX_SEQLEN_K = 2 ** 31 - PAGE_SIZE    # no int32 length needs more (a page-aligned bound)


def plan_mla_splits(cache_seqlens: torch.Tensor, num_heads_per_head_k: int,
                    num_heads_k: int, *, num_sm_parts: int | None = None,
                    num_slots: int | None = None, split_cost: float | None = None,
                    plan: str = "equal", max_seqlen_k: int | None = None):
    """Plan the split-KV work. Returns ``(tile_scheduler_metadata, num_splits)`` tensors.

    This is what ``get_mla_metadata`` returned in FlashMLA's 2025 interface (and still
    may be passed to ``flash_mla_with_kvcache`` in its place); today
    :func:`flash_mla_with_kvcache` calls it on the first call that gets a fresh
    :class:`FlashMLASchedMeta`. Its options are for the lesson's experiments.

    cache_seqlens: int32 (batch,). num_heads_per_head_k = seqlen_q * heads_q // heads_k
    (the folded query rows of one kv head). ``plan="equal"`` (default) cuts each
    sequence into equal splits, listed largest first: up to 64 rows of the size that a
    model of the launch finds fastest (``_modeled_chunk``), above that of one share;
    ``plan="shares"`` is FlashMLA's plan, num_sm_parts equal shares in batch order (the
    README measures both).

    num_sm_parts: the shares (SMs x ``parts_per_sm`` / heads_k / m blocks); num_slots:
    how many programs of one (m block, kv head) pair run at once (SMs x
    ``resident_per_sm`` / heads_k / m blocks), the model's waves; split_cost: a split's
    partial output in key blocks of traffic (the model's penalty; ``None``, the config's
    choice above 64 rows, means splits of one share). All three come from
    ``default_config`` unless given (tests use them to force many splits).
    max_seqlen_k: lengths are clamped to [0, max_seqlen_k] for planning (the decode
    kernel clamps them to block_table.shape[1] x 64 the same way), so no value of
    cache_seqlens makes more splits than the metadata holds.

    num_splits: int32 (batch + 1,), cumulative: sequence b owns slots num_splits[b] to
    num_splits[b + 1] - 1 (FlashMLA's convention). tile_scheduler_metadata: int32
    (batch + 4 x num_slots with the model, else batch + num_sm_parts, 8): one row per
    split in launch order, [sequence, first key, end key, slot, 0, ...]; rows past the
    last split hold -1 (no plan makes more splits than that). FlashMLA's rows describe
    shares and its programs loop over them; ours give each split its own program, because
    a loop over sequences around the key loop made Triton spill registers (see the
    README). A few tensor ops (or one small kernel for "shares"): no host sync.
    """
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dim() != 1:
        raise ValueError("cache_seqlens must be a 1-D tensor (batch,)")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if num_heads_per_head_k < 1 or num_heads_k < 1:
        raise ValueError("num_heads_per_head_k and num_heads_k must be positive")
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    batch = cache_seqlens.shape[0]
    max_len = MAX_SEQLEN_K if max_seqlen_k is None else max(0, min(max_seqlen_k, MAX_SEQLEN_K))
    num_sm_parts, num_slots, model_cost, max_splits = _plan_params(
        batch, num_heads_per_head_k, num_heads_k, cache_seqlens.device, num_sm_parts,
        num_slots, split_cost, plan)
    dev = cache_seqlens.device
    meta = torch.full((max_splits, TILE_SCHEDULER_METADATA_SIZE), -1, dtype=torch.int32,
                      device=dev)
    meta[:, 4:] = 0
    num_splits = torch.zeros(batch + 1, dtype=torch.int32, device=dev)
    if batch > 0 and plan == "equal":
        _plan_equal_splits(cache_seqlens, num_sm_parts, num_slots, model_cost, meta,
                           num_splits, max_len)
    elif batch > 0:
        _mla_shares_kernel[(1,)](cache_seqlens.clamp(0, max_len).contiguous(), meta,
                                 num_splits, batch, num_sm_parts, max_splits,
                                 BLOCK_N=PAGE_SIZE, OVERHEAD=FIXED_OVERHEAD_NUM_BLOCKS,
                                 BLOCK_B=256, META=TILE_SCHEDULER_METADATA_SIZE, num_warps=1)
    return meta, num_splits


# ----------------------------------------------------------------------------------------
# 2. The decode kernel.

@triton.jit
def _attend_block(acc, m_i, l_i, n_bad, q_c, q_r, k_base, n, block_table_row, seqlen_k,
                  limit, num_pages, stride_kp, stride_kt, offs_n, offs_c, offs_r, offs_v,
                  qk_scale, BLOCK_N: tl.constexpr, D_LATENT: tl.constexpr,
                  BLOCK_DV: tl.constexpr, DOT_FP32: tl.constexpr):
    """One page of keys: s = q k^T, online softmax, acc += p v.

    ``n`` < the sequence's page count, so its table slot is owned. Rows of the last page
    past the sequence's end are not owned (they may hold NaN): their loads are pointed at
    the page's row 0, which is owned, and their scores are masked to -inf below, so
    p = 0 multiplies finite values. No load needs a mask, and one loop body serves
    every block. A table entry outside [0, num_pages) is counted in ``n_bad`` (the
    wrapper's device-side assert) and clamped, so even then nothing outside k_cache is
    read.
    """
    page = tl.load(block_table_row + n)
    n_bad += ((page < 0) | (page >= num_pages)).to(tl.int32)
    page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
    tok = n * BLOCK_N + offs_n
    row = tl.where(tok < seqlen_k, offs_n, 0)
    k_rows = k_base + page * stride_kp + row * stride_kt              # (BLOCK_N,) pointers
    k_c = tl.load(k_rows[:, None] + offs_c[None, :])                   # latent = V
    k_r = tl.load(k_rows[:, None] + D_LATENT + offs_r[None, :])       # RoPE key
    if DOT_FP32:  # the interpreter's bf16 dot is unreliable: same math in fp32
        s = tl.dot(q_c.to(tl.float32), tl.trans(k_c.to(tl.float32)), input_precision="ieee")
        s = tl.dot(q_r.to(tl.float32), tl.trans(k_r.to(tl.float32)), s, input_precision="ieee")
    else:
        s = tl.dot(q_c, tl.trans(k_c))
        s = tl.dot(q_r, tl.trans(k_r), s)
    # Scores in log2 units; keys past the end, or (causal) past the row's last visible
    # key, get -inf.
    s = tl.where(tok[None, :] < limit[:, None], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with no key yet: p = 0
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if BLOCK_DV == D_LATENT:
        v = k_c                      # the same tile, already on chip
    else:                            # a slice of it (a second read, from L1/L2)
        v = tl.load(k_rows[:, None] + offs_v[None, :])
    if DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i, n_bad


@triton.jit(do_not_specialize=["batch", "max_len", "num_pages", "max_splits"])
def _mla_decode_kernel(
        q_ptr, k_ptr, block_table_ptr, seqlens_ptr, meta_ptr, num_splits_ptr,
        out_ptr, lse_ptr, o_acc_ptr, lse_acc_ptr, trace_ptr, flags_ptr,
        batch, max_len, num_pages, max_splits,
        stride_qb, stride_qs, stride_qh,
        stride_kp, stride_kt, stride_kh,
        stride_bt,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_lh,
        stride_as, stride_ah,                       # o_acc (splits, hk, rows, 512), row 512
        seqlen_q, group, rows, qk_scale,
        CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        D_LATENT: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_DV: tl.constexpr,
        META: tl.constexpr, DOT_FP32: tl.constexpr, TRACE: tl.constexpr):
    NUM_DV: tl.constexpr = D_LATENT // BLOCK_DV
    pid_m = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)        # one program per row of the plan (and m/dv block)
    m_block = pid_m // NUM_DV
    dv_block = pid_m % NUM_DV
    if TRACE:                       # timeline.py: which SM ran this program, and when
        t_start = globaltimer()

    b = tl.load(meta_ptr + split * META + 0)
    if (b >= 0) & (b < batch):      # rows past the plan's last split hold -1
        # Whatever the values, nothing outside the tensors is read or written: the
        # length is clamped to the table's width (max_len = its columns x 64), the key
        # range to that length, table entries to the cache's pages (_attend_block) and
        # the slot to the split buffers. A bad length or table entry clears a flag that
        # the wrapper asserts on (torch._assert_async): an error at the next sync.
        seqlen_raw = tl.load(seqlens_ptr + b)
        if (seqlen_raw < 0) | (seqlen_raw > max_len):
            tl.store(flags_ptr, 0)
        seqlen_k = tl.minimum(tl.maximum(seqlen_raw, 0), max_len)
        n_lo = tl.maximum(tl.load(meta_ptr + split * META + 1) // BLOCK_N, 0)
        n_hi = tl.minimum(tl.cdiv(tl.load(meta_ptr + split * META + 2), BLOCK_N),
                          tl.cdiv(seqlen_k, BLOCK_N))
        n_splits = tl.load(num_splits_ptr + b + 1) - tl.load(num_splits_ptr + b)
        b64 = tl.full([], 0, tl.int64) + b     # 64-bit offsets: big caches pass 2**31

        # Folded query rows r = s * group + g: query position s, head hk * group + g.
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < rows
        s_idx = offs_m // group
        head = hk * group + offs_m % group
        offs_n = tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, D_LATENT)
        offs_r = tl.arange(0, D_ROPE)
        offs_v = dv_block * BLOCK_DV + tl.arange(0, BLOCK_DV)

        q_rows = q_ptr + b64 * stride_qb + s_idx * stride_qs + head * stride_qh
        q_c = tl.load(q_rows[:, None] + offs_c[None, :], mask=row_ok[:, None], other=0.0)
        q_r = tl.load(q_rows[:, None] + D_LATENT + offs_r[None, :], mask=row_ok[:, None],
                      other=0.0)

        # Keys j < limit[row] are visible to folded row `row`.
        if CAUSAL:
            limit = seqlen_k - seqlen_q + 1 + s_idx
        else:
            limit = seqlen_k + s_idx * 0
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        bt_row = block_table_ptr + b64 * stride_bt
        k_base = k_ptr + hk * stride_kh
        n_bad = seqlen_k * 0                    # table entries outside the cache
        for n in range(n_lo, n_hi):
            acc, m_i, l_i, n_bad = _attend_block(acc, m_i, l_i, n_bad, q_c, q_r, k_base, n,
                                                 bt_row, seqlen_k, limit, num_pages,
                                                 stride_kp, stride_kt, offs_n, offs_c,
                                                 offs_r, offs_v, qk_scale, BLOCK_N,
                                                 D_LATENT, BLOCK_DV, DOT_FP32)
        if n_bad > 0:
            tl.store(flags_ptr + 1, 0)

        empty = l_i == 0.0                      # no visible key in this range
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
        if n_splits == 1:                       # the whole sequence: final output
            out_rows = out_ptr + b64 * stride_ob + s_idx * stride_os + head * stride_oh
            tl.store(out_rows[:, None] + offs_v[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None])
            if dv_block == 0:
                tl.store(lse_ptr + b64 * stride_lb + head * stride_lh + s_idx,
                         tl.where(empty, float("inf"), lse), mask=row_ok)
        else:                                   # one split: fp32 partial + its lse
            slot = tl.minimum(tl.maximum(tl.load(meta_ptr + split * META + 3), 0),
                              max_splits - 1).to(tl.int64)
            acc_rows = o_acc_ptr + slot * stride_as + hk * stride_ah + offs_m * D_LATENT
            tl.store(acc_rows[:, None] + offs_v[None, :], o, mask=row_ok[:, None])
            if dv_block == 0:
                tl.store(lse_acc_ptr + (slot * tl.num_programs(1) + hk) * rows + offs_m,
                         tl.where(empty, float("-inf"), lse), mask=row_ok)
    if TRACE:   # [SM, start ns, end ns] per program, in grid order
        pid = (split * tl.num_programs(1) + hk) * tl.num_programs(0) + pid_m
        rec = trace_ptr + pid.to(tl.int64) * 3
        tl.store(rec, smid().to(tl.int64))
        tl.store(rec + 1, t_start)
        tl.store(rec + 2, globaltimer())


# ----------------------------------------------------------------------------------------
# 3. Combine the splits of each split sequence (slots num_splits[b] .. num_splits[b+1]-1).

@triton.jit(do_not_specialize=["max_splits"])
def _mla_combine_kernel(o_acc_ptr, lse_acc_ptr, num_splits_ptr, out_ptr, lse_ptr,
                        stride_as, stride_ah, stride_ob, stride_os, stride_oh,
                        stride_lb, stride_lh, heads_k, group, rows, max_splits,
                        D_V: tl.constexpr, BLOCK_R: tl.constexpr):
    r_block = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    b64 = tl.full([], 0, tl.int64) + b
    # slots clamped to the split buffers, whatever num_splits holds
    split_start = tl.minimum(tl.maximum(tl.load(num_splits_ptr + b), 0), max_splits)
    split_end = tl.minimum(tl.load(num_splits_ptr + b + 1), max_splits)
    n_splits = tl.maximum(split_end - split_start, 0)
    if n_splits > 1:            # sequences with one split were written by the decode kernel
        offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = offs_r < rows
        offs_d = tl.arange(0, D_V)
        # lse = log sum_i exp(lse_i); a split that saw no key has lse_i = -inf
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for i in range(n_splits):
            split = tl.full([], 0, tl.int64) + split_start + i
            lse_i = tl.load(lse_acc_ptr + (split * heads_k + hk) * rows + offs_r, mask=row_ok,
                            other=float("-inf"))
            m = tl.maximum(m, lse_i)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        l = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, D_V], tl.float32)
        for i in range(n_splits):
            split = tl.full([], 0, tl.int64) + split_start + i
            lse_i = tl.load(lse_acc_ptr + (split * heads_k + hk) * rows + offs_r, mask=row_ok,
                            other=float("-inf"))
            w = tl.exp(lse_i - m_use)
            o_i = tl.load(o_acc_ptr + split * stride_as + hk * stride_ah
                          + offs_r[:, None] * D_V + offs_d[None, :], mask=row_ok[:, None],
                          other=0.0)
            acc += w[:, None] * o_i
            l += w
        empty = l == 0.0
        out = acc / tl.where(empty, 1.0, l)[:, None]
        lse = tl.where(empty, float("inf"), m_use + tl.log(tl.where(empty, 1.0, l)))
        s_idx = offs_r // group
        head = hk * group + offs_r % group
        out_rows = out_ptr + b64 * stride_ob + s_idx * stride_os + head * stride_oh
        tl.store(out_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(lse_ptr + b64 * stride_lb + head * stride_lh + s_idx, lse,
                 mask=row_ok)


# ----------------------------------------------------------------------------------------
# The wrapper: FlashMLA's signature (its interface as of deepseek-ai/FlashMLA 9241ae3,
# 2026-04-29): a scheduler-metadata object that the first call fills with the plan.

def _empty(shape, dtype, device):
    """Every buffer the kernels write (the tests swap in a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


# Under the interpreter a bf16/fp16 tl.dot is unreliable (docs/environment.md): the kernel then
# computes its dots in fp32 on the same (upcast) values. A module flag, so a GPU test can
# run that path too.
_DOT_FP32 = runtime.is_emulated()
# The device-side value check (a flag the decode kernel clears, two torch._assert_async).
# Only main.py --bench turns it off, to time what it costs; the clamps stay either way.
_DEVICE_CHECKS = True

# torch._assert_async's messages (CUDA keeps at most 255 characters)
MSG_BAD_SEQLENS = ("flash_mla_with_kvcache: cache_seqlens has an entry < 0 or > "
                   "block_table.shape[1] * 64 (or k_cache has no pages); rerun with "
                   "debug_checks=True to see which")
MSG_BAD_TABLE = ("flash_mla_with_kvcache: block_table has an entry < 0 or >= "
                 "k_cache.shape[0] in a slot that a sequence uses; rerun with "
                 "debug_checks=True to see which")


class FlashMLAArgumentError(ValueError, AssertionError):
    """An argument (combination) that FlashMLA rejects with an ``assert``: raised here
    as a ValueError that is also an AssertionError, so code written for either works."""


@dataclasses.dataclass
class FlashMLASchedMeta:
    """FlashMLA's scheduler metadata: empty from :func:`get_mla_metadata`, filled with
    the plan by the first :func:`flash_mla_with_kvcache` call that gets it, reused by
    later calls (valid while the shapes and the *values* of cache_seqlens stay the same,
    FlashMLA's rule: e.g. one per decoding step, shared by all layers)."""

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: int | None
        extra_page_block_size: int | None
        extra_topk: int | None

    have_initialized: bool = False
    config: Config | None = None
    tile_scheduler_metadata: torch.Tensor | None = None   # ours: (splits, 8) int32
    num_splits: torch.Tensor | None = None                # ours: (batch + 1,) int32


_PLANNER_OPTIONS = ("num_sm_parts", "num_slots", "split_cost", "plan", "max_seqlen_k")


def get_mla_metadata(*args, **kwargs) -> tuple[FlashMLASchedMeta, None]:
    """An empty :class:`FlashMLASchedMeta` and None, as FlashMLA returns today: the plan
    is made by the first :func:`flash_mla_with_kvcache` call that receives it. Any
    arguments of the 2025 form (cache_seqlens, rows, heads_k, ...) are accepted and
    ignored, as FlashMLA does; our planner's options belong to :func:`plan_mla_splits`."""
    ours = [k for k in kwargs if k in _PLANNER_OPTIONS]
    if ours:
        raise TypeError(f"get_mla_metadata() no longer plans, so {', '.join(ours)} would be "
                        "ignored: pass them to plan_mla_splits(cache_seqlens, rows, heads_k, "
                        "...) and its two tensors to flash_mla_with_kvcache")
    return FlashMLASchedMeta(), None


def _reject_unsupported(causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
                        extra_indices_in_kvcache, topk_length, extra_topk_length,
                        block_table, cache_seqlens):
    """FlashMLA's rules for its sparse and FP8 arguments, and what we do not have yet."""
    if indices is not None:                           # sparse attention
        if causal:
            raise FlashMLAArgumentError("causal must be False when sparse attention is "
                                        "enabled (indices is not None)")
        if not is_fp8_kvcache:
            raise FlashMLAArgumentError("is_fp8_kvcache must be True when sparse "
                                        "attention is enabled (indices is not None)")
        raise NotImplementedError("sparse attention (indices, topk_length, attn_sink, "
                                  "extra_k_cache, ...) over an FP8 cache is not implemented "
                                  "in this lesson yet: only dense bf16/fp16 decoding is")
    given = [name for name, t in (("attn_sink", attn_sink), ("extra_k_cache", extra_k_cache),
                                  ("extra_indices_in_kvcache", extra_indices_in_kvcache),
                                  ("topk_length", topk_length),
                                  ("extra_topk_length", extra_topk_length)) if t is not None]
    if given:
        raise FlashMLAArgumentError(f"{', '.join(given)} must be None when dense attention "
                                    "is used (indices is None): FlashMLA takes them only "
                                    "with sparse attention")
    if block_table is None or cache_seqlens is None:
        raise FlashMLAArgumentError("block_table and cache_seqlens must be provided when "
                                    "dense attention is used")
    if is_fp8_kvcache:
        raise NotImplementedError("is_fp8_kvcache=True: the FP8 cache is not implemented "
                                  "in this lesson yet; pass a bf16/fp16 k_cache")


def _check_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, meta=None,
                  num_splits=None):
    """Shapes, dtypes, devices and layouts: host-side, before any launch. (The values of
    cache_seqlens and block_table are checked on the device, see _decode.)"""
    tensors = [("q", q), ("k_cache", k_cache), ("block_table", block_table),
               ("cache_seqlens", cache_seqlens)]
    if meta is not None:
        tensors += [("tile_scheduler_metadata", meta), ("num_splits", num_splits)]
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (batch, seqlen_q, heads_q, {HEAD_DIM_K}), "
                         f"got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be 4-D (num_pages, {PAGE_SIZE}, heads_k, "
                         f"{HEAD_DIM_K}), got shape {tuple(k_cache.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"q must be bfloat16 or float16, got {q.dtype}")
    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache dtype {k_cache.dtype} differs from q dtype {q.dtype}")
    if q.shape[-1] != HEAD_DIM_K:
        raise ValueError(f"q's last dim must be {HEAD_DIM_K} (512 latent + 64 RoPE), "
                         f"got {q.shape[-1]}")
    if k_cache.shape[-1] != q.shape[-1]:
        raise ValueError(f"k_cache's last dim {k_cache.shape[-1]} differs from q's "
                         f"{q.shape[-1]}")
    if head_dim_v != HEAD_DIM_V:
        raise ValueError(f"head_dim_v must be {HEAD_DIM_V} (V = the latent part of K), "
                         f"got {head_dim_v}")
    if k_cache.shape[1] != PAGE_SIZE:
        raise ValueError(f"the page size (k_cache.shape[1]) must be {PAGE_SIZE}, "
                         f"got {k_cache.shape[1]}")
    batch, _, heads_q, _ = q.shape
    heads_k = k_cache.shape[2]
    if heads_k < 1 or heads_q % heads_k != 0:
        raise ValueError(f"heads_q={heads_q} must be a multiple of heads_k={heads_k}")
    for name, t in tensors[2:]:
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be (batch={batch}, max_pages), "
                         f"got {tuple(block_table.shape)}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must be (batch={batch},), got "
                         f"{tuple(cache_seqlens.shape)}")
    if meta is not None:
        if num_splits.shape != (batch + 1,):
            raise ValueError(f"num_splits must be (batch + 1 = {batch + 1},), got "
                             f"{tuple(num_splits.shape)}: pass what plan_mla_splits returned "
                             "for these cache_seqlens")
        if meta.dim() != 2 or meta.shape[1] != TILE_SCHEDULER_METADATA_SIZE \
                or meta.shape[0] < batch:
            raise ValueError(f"tile_scheduler_metadata must be (batch + num_sm_parts, "
                             f"{TILE_SCHEDULER_METADATA_SIZE}), got {tuple(meta.shape)}: "
                             "pass what plan_mla_splits returned for these cache_seqlens")
    for name, t in tensors[1:]:
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: "
                             "every tensor must be on the same device")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or (block_table.numel()
                                                          and block_table.stride(1) != 1):
        raise ValueError("q, k_cache and block_table need a contiguous last dimension")
    if not cache_seqlens.is_contiguous() or (meta is not None and (
            not meta.is_contiguous() or not num_splits.is_contiguous())):
        raise ValueError("cache_seqlens, tile_scheduler_metadata and num_splits must be "
                         "contiguous")


def _check_lengths(block_table, cache_seqlens, num_pages):
    """debug_checks=True: the value checks on the host, with detailed messages (one
    small reduction read back: a host sync). The same conditions as the device check."""
    lens = cache_seqlens.long()
    pages_needed = (lens + PAGE_SIZE - 1) // PAGE_SIZE
    owned = (torch.arange(block_table.shape[1], device=lens.device)[None, :]
             < pages_needed[:, None])
    bad_entry = owned & ((block_table < 0) | (block_table >= num_pages))
    stats = torch.stack([lens.min(), lens.argmin(), pages_needed.max(), lens.argmax(),
                         bad_entry.any(1).long().argmax(), bad_entry.any().long()]).tolist()
    min_len, shortest, max_pages_needed, longest, first_bad, any_bad = stats
    if min_len < 0:
        raise ValueError(f"cache_seqlens[{shortest}] is negative ({min_len})")
    if max_pages_needed > block_table.shape[1]:
        raise ValueError(
            f"block_table is too short: cache_seqlens[{longest}] = "
            f"{int(cache_seqlens[longest])} needs {max_pages_needed} pages of {PAGE_SIZE}, "
            f"block_table has {block_table.shape[1]} columns")
    if any_bad:
        col = int(bad_entry[first_bad].long().argmax())
        raise ValueError(f"block_table[{first_bad}, {col}] = {int(block_table[first_bad, col])}"
                         f" points outside k_cache's {num_pages} pages, in a slot that "
                         f"sequence {first_bad} uses")


def _decode(q, k_cache, block_table, cache_seqlens, meta, num_splits, head_dim_v, scale,
            causal, cfg, trace=None, device_checks=True):
    """The launches: decode kernel, combine kernel, and the device-side value check."""
    batch, seqlen_q, heads_q, _ = q.shape
    num_pages, _, heads_k, _ = k_cache.shape
    group = heads_q // heads_k
    rows = seqlen_q * group
    out = _empty((batch, seqlen_q, heads_q, head_dim_v), q.dtype, q.device)
    lse = _empty((batch, heads_q, seqlen_q), torch.float32, q.device)
    if batch == 0 or seqlen_q == 0 or heads_q == 0:
        return out, lse
    grid = decode_grid(rows, heads_k, meta.shape[0], cfg)
    if trace is not None:
        if runtime.is_emulated():
            raise RuntimeError("trace reads the GPU's SM id and clock: it needs a GPU")
        if trace.dtype != torch.int64 or trace.device != q.device or not trace.is_contiguous() \
                or trace.numel() < 3 * grid[0] * grid[1] * grid[2]:
            raise ValueError(f"trace must be a contiguous int64 tensor on {q.device} with at "
                             f"least {3 * grid[0] * grid[1] * grid[2]} elements")
    # Lengths past the table's width are clamped to it (no cache at all: to 0).
    max_len = min(block_table.shape[1] * PAGE_SIZE, MAX_SEQLEN_K) if num_pages > 0 else 0
    max_splits = meta.shape[0]                       # at most this many splits
    o_acc = _empty((max_splits, heads_k, rows, head_dim_v), torch.float32, q.device)
    lse_acc = _empty((max_splits, heads_k, rows), torch.float32, q.device)
    # [lengths ok, table ok]: 1 until a decode program finds a bad value
    flags = (torch.ones if device_checks else torch.empty)(2, dtype=torch.int32,
                                                             device=q.device)
    _mla_decode_kernel[grid](
        q, k_cache, block_table, cache_seqlens, meta, num_splits,
        out, lse, o_acc, lse_acc, lse if trace is None else trace, flags,
        batch, max_len, num_pages, max_splits,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        o_acc.stride(0), o_acc.stride(1),
        seqlen_q, group, rows, scale * LOG2E,
        CAUSAL=bool(causal) and seqlen_q > 1, BLOCK_M=cfg.block_m, BLOCK_N=PAGE_SIZE,
        D_LATENT=HEAD_DIM_V, D_ROPE=HEAD_DIM_ROPE, BLOCK_DV=cfg.block_dv,
        META=TILE_SCHEDULER_METADATA_SIZE, DOT_FP32=_DOT_FP32, TRACE=trace is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    block_r = 4
    _mla_combine_kernel[(triton.cdiv(rows, block_r), heads_k, batch)](
        o_acc, lse_acc, num_splits, out, lse,
        o_acc.stride(0), o_acc.stride(1), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), heads_k, group, rows, max_splits,
        D_V=head_dim_v, BLOCK_R=block_r, num_warps=4)
    if device_checks:   # no sync: raises at the next one (on the CPU: right here)
        torch._assert_async(flags[0], MSG_BAD_SEQLENS)
        torch._assert_async(flags[1], MSG_BAD_TABLE)
    return out, lse


# torch.compile: the plan and the decode as custom ops (the Triton launches are opaque
# to the tracer; the fake versions give the output shapes). Eager calls skip the
# dispatcher (~20 us of host time per call) and run the same functions directly.

@torch.library.custom_op("course::mla_plan", mutates_args=(),
                         schema="(Tensor cache_seqlens, int rows, int heads_k, "
                                "int max_seqlen_k) -> (Tensor, Tensor)")
def _mla_plan_op(cache_seqlens, rows, heads_k, max_seqlen_k):
    return plan_mla_splits(cache_seqlens, rows, heads_k, max_seqlen_k=max_seqlen_k)


@_mla_plan_op.register_fake
def _(cache_seqlens, rows, heads_k, max_seqlen_k):
    batch = cache_seqlens.shape[0]
    max_splits = _plan_params(batch, rows, heads_k, cache_seqlens.device)[3]
    return (cache_seqlens.new_empty((max_splits, TILE_SCHEDULER_METADATA_SIZE)),
            cache_seqlens.new_empty((batch + 1,)))


@torch.library.custom_op("course::mla_decode", mutates_args=(),
                         schema="(Tensor q, Tensor k_cache, Tensor block_table, "
                                "Tensor cache_seqlens, Tensor tile_scheduler_metadata, "
                                "Tensor num_splits, int head_dim_v, float softmax_scale, "
                                "bool causal, int[] tile, bool device_checks) "
                                "-> (Tensor, Tensor)")
def _mla_decode_op(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                   num_splits, head_dim_v, softmax_scale, causal, tile, device_checks):
    return _decode(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
                   num_splits, head_dim_v, softmax_scale, causal, MLAConfig(*tile),
                   device_checks=device_checks)


@_mla_decode_op.register_fake
def _(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
      head_dim_v, softmax_scale, causal, tile, device_checks):
    batch, seqlen_q, heads_q, _ = q.shape
    return (q.new_empty((batch, seqlen_q, heads_q, head_dim_v)),
            q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32))


def _sched_config(q, k_cache, causal, is_fp8_kvcache):
    return FlashMLASchedMeta.Config(q.shape[0], q.shape[1], q.shape[2], k_cache.shape[1],
                                    k_cache.shape[2], causal, is_fp8_kvcache, None, None,
                                    None)


def _check_sched_config(have: FlashMLASchedMeta.Config, want: FlashMLASchedMeta.Config):
    """FlashMLA's consistency checks of a reused sched meta, field by field."""
    names = {"b": "batch_size", "s_q": "seq_len_q", "h_q": "num_heads_q",
             "page_block_size": "page_block_size", "h_k": "num_heads_k", "causal": "causal",
             "is_fp8_kvcache": "is_fp8_kvcache", "topk": "the last dim of indices",
             "extra_page_block_size": "the page_block_size of extra_k_cache",
             "extra_topk": "the last dim of extra_indices_in_kvcache"}
    for field, what in names.items():
        if getattr(have, field) != getattr(want, field):
            raise FlashMLAArgumentError(
                f"sched_meta.config.{field} must be equal to {what} (planned for "
                f"{getattr(have, field)!r}, this call has {getattr(want, field)!r}). Your "
                "input arguments are inconsistent with sched_meta: use one sched_meta (from "
                "get_mla_metadata()) per set of shapes and cache_seqlens values")


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor,
                           block_table: torch.Tensor | None,
                           cache_seqlens: torch.Tensor | None, head_dim_v: int,
                           tile_scheduler_metadata: FlashMLASchedMeta | torch.Tensor,
                           num_splits: torch.Tensor | None = None,
                           softmax_scale: float | None = None, causal: bool = False,
                           is_fp8_kvcache: bool = False, indices: torch.Tensor | None = None,
                           attn_sink: torch.Tensor | None = None,
                           extra_k_cache: torch.Tensor | None = None,
                           extra_indices_in_kvcache: torch.Tensor | None = None,
                           topk_length: torch.Tensor | None = None,
                           extra_topk_length: torch.Tensor | None = None, *,
                           debug_checks: bool = False, config: MLAConfig | None = None,
                           trace: torch.Tensor | None = None):
    """Attention of q over a paged MLA cache (FlashMLA's interface). Returns (out, lse).

    q: (batch, seqlen_q, heads_q, 576) bf16/fp16; k_cache: (num_pages, 64, heads_k, 576);
    V is the first head_dim_v = 512 channels of K; block_table: int32 (batch, max_pages);
    cache_seqlens: int32 (batch,). out: (batch, seqlen_q, heads_q, 512) in q's dtype; lse:
    float32 (batch, heads_q, seqlen_q). causal (seqlen_q > 1): query i sees keys
    j <= cache_seqlens - seqlen_q + i; a query that sees no key gives zeros, lse = +inf.

    tile_scheduler_metadata: a :class:`FlashMLASchedMeta` from ``get_mla_metadata()``
    (num_splits must then be None, FlashMLA's rule): the first call plans into it, later
    calls reuse the plan and are checked against its config. The 2025 form also works:
    the two int32 tensors of :func:`plan_mla_splits`.
    is_fp8_kvcache, indices, attn_sink, extra_*, topk_length: FlashMLA's FP8 and sparse
    modes, not implemented here yet (NotImplementedError; FlashMLAArgumentError for the
    combinations FlashMLA itself rejects).

    Shapes, dtypes and devices are checked on the host before any launch. The *values* of
    cache_seqlens and block_table are checked on the device, without a host sync: the
    kernels clamp every index they read, so no value makes them read or write outside
    the tensors given, and a length < 0 or > block_table.shape[1] * 64, or a table entry
    outside [0, num_pages) in a slot a sequence uses, raises at the next synchronisation
    (torch._assert_async). Ours, keyword-only: ``debug_checks=True`` checks the values
    on the host first, with detailed messages (a host sync per call); ``config`` picks
    the tile sizes; ``trace`` (GPU only, for ``timeline.py``): an int64 tensor of 3
    elements per program of :func:`decode_grid`; each decode program writes its
    [SM id, start ns, end ns] at 3 x its linear program id.
    Under torch.compile the plan and the decode are custom ops (course::mla_plan,
    course::mla_decode): no graph break, CUDA graphs welcome (not with debug_checks or
    trace).
    """
    sched = tile_scheduler_metadata
    if isinstance(sched, FlashMLASchedMeta):
        if num_splits is not None:
            raise FlashMLAArgumentError("num_splits must be None when tile_scheduler_metadata"
                                        " is a FlashMLASchedMeta (it holds the plan)")
        meta = ns = None
    elif isinstance(sched, torch.Tensor):           # the 2025 form: plan_mla_splits' tensors
        if not isinstance(num_splits, torch.Tensor):
            raise TypeError("with a tensor tile_scheduler_metadata (plan_mla_splits' 2025 "
                            "form), num_splits must be its int32 tensor too")
        meta, ns = sched, num_splits
    else:
        raise TypeError("tile_scheduler_metadata must be of type FlashMLASchedMeta (from "
                        "get_mla_metadata()), or the tensor that plan_mla_splits returned, "
                        f"got {type(sched).__name__}")
    _reject_unsupported(causal, is_fp8_kvcache, indices, attn_sink, extra_k_cache,
                        extra_indices_in_kvcache, topk_length, extra_topk_length,
                        block_table, cache_seqlens)
    _check_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, meta, ns)
    batch, seqlen_q, heads_q, d = q.shape
    heads_k = k_cache.shape[2]
    rows = seqlen_q * heads_q // heads_k
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    if debug_checks:
        _check_lengths(block_table, cache_seqlens, k_cache.shape[0])
    compiling = torch.compiler.is_compiling()
    if meta is None:
        want = _sched_config(q, k_cache, causal, is_fp8_kvcache)
        if not sched.have_initialized:     # the first call plans (device ops, no sync)
            max_len = block_table.shape[1] * PAGE_SIZE
            if compiling:
                meta, ns = torch.ops.course.mla_plan(cache_seqlens, rows, heads_k, max_len)
            else:
                meta, ns = plan_mla_splits(cache_seqlens, rows, heads_k, max_seqlen_k=max_len)
            sched.have_initialized = True
            sched.config = want
            sched.tile_scheduler_metadata, sched.num_splits = meta, ns
        else:
            if sched.config != want:     # one tuple comparison; the details on mismatch
                _check_sched_config(sched.config, want)
            meta, ns = sched.tile_scheduler_metadata, sched.num_splits
    cfg = config or default_config(rows)
    if trace is not None or not compiling:
        return _decode(q, k_cache, block_table, cache_seqlens, meta, ns, head_dim_v, scale,
                       causal, cfg, trace, _DEVICE_CHECKS)
    return torch.ops.course.mla_decode(q, k_cache, block_table, cache_seqlens, meta, ns,
                                       head_dim_v, scale, bool(causal), list(cfg[:4]),
                                       _DEVICE_CHECKS)


def decode_grid(rows: int, heads_k: int, plan_rows: int, cfg: MLAConfig):
    """The decode kernel's grid: (m blocks x dv blocks, kv heads, rows of the plan)."""
    return (triton.cdiv(rows, cfg.block_m) * (HEAD_DIM_V // cfg.block_dv), heads_k, plan_rows)


def pack_pages(kv: torch.Tensor, cache_seqlens: torch.Tensor | None = None,
               generator: torch.Generator | None = None):
    """A contiguous cache (batch, seqlen, heads_k, d) as pages of 64 tokens in random order.

    Returns (k_cache (num_pages, 64, heads_k, d), block_table int32, cache_seqlens int32):
    what a paged serving engine would hold. Used by main.py and the tests.
    """
    batch, seqlen, heads_k, d = kv.shape
    if cache_seqlens is None:
        cache_seqlens = torch.full((batch,), seqlen, dtype=torch.int32)
    pages = triton.cdiv(seqlen, PAGE_SIZE)
    padded = torch.zeros(batch, pages * PAGE_SIZE, heads_k, d, dtype=kv.dtype, device=kv.device)
    padded[:, :seqlen] = kv
    perm = torch.randperm(batch * pages, generator=generator).to(kv.device)
    k_cache = torch.empty(batch * pages, PAGE_SIZE, heads_k, d, dtype=kv.dtype, device=kv.device)
    k_cache[perm] = padded.view(batch * pages, PAGE_SIZE, heads_k, d)
    block_table = perm.view(batch, pages).to(torch.int32)
    return k_cache, block_table, cache_seqlens.to(kv.device, torch.int32)
