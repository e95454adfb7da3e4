"""flash_mla against the paged reference, FlashMLA's test made adversarial.

Every problem puts its pages in random order, fills every cache row no sequence owns
(unused pages, and the rows past each sequence's end in its last page) with NaN, and
every block_table slot no sequence uses with garbage indices: a kernel that reads one of
them produces NaN or faults, and the comparison fails. Outputs and the split buffers start
as NaN, so an element the kernels forget to write fails too.

Tolerances. The reference is float32 attention on the same (upcast) inputs. out is held
to flash-attn's rule (assert_error_within): at most 2x the error of the same attention
computed by PyTorch in the input dtype, plus a slack of half an output ulp for the final
rounding to bf16/fp16 (the kernel accumulates in fp32, so its error is mostly that
rounding). lse is float32 and computed from fp32 dot products of exact bf16/fp16 products
(tensor cores) or from the fp32 interpreter path: 1e-3 absolute covers the fp32
summation order over up to 16k keys.
"""

import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from common import runtime
from common.checks import assert_close, assert_error_within, poisoned
from common.reference import paged_mla_decode_ref

import flash_mla
from flash_mla import (HEAD_DIM_K, HEAD_DIM_V, PAGE_SIZE, FlashMLAArgumentError,
                       FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata,
                       plan_mla_splits)
from problems import flashmla_lens

DEV = runtime.torch_device()
SLACK = {torch.bfloat16: 2 ** -9, torch.float16: 2 ** -12}   # half an ulp at 1.0


GUARD = 256            # elements on either side of every buffer the kernels write
SENTINEL = -7.0


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN (torch.empty may hand out zeros) and
    lies inside a larger one whose guard elements must still hold SENTINEL at the end:
    a write outside a buffer, whatever the inputs' values, fails the test."""
    parents = []

    def guarded(shape, dtype, device):
        n = 1
        for x in shape:
            n *= x
        parent = poisoned((n + 2 * GUARD,), dtype, device)
        parent[:GUARD] = SENTINEL
        parent[-GUARD:] = SENTINEL
        parents.append(parent)
        return parent[GUARD:GUARD + n].view(shape)

    monkeypatch.setattr(flash_mla, "_empty", guarded)
    yield
    for parent in parents:
        guards = torch.cat([parent[:GUARD], parent[-GUARD:]])
        assert (guards == SENTINEL).all(), "a kernel wrote outside its output buffer"


def make_problem(lens, seqlen_q, heads_q, heads_k, dtype, seed, spare_pages=3, spare_slots=2,
                 device=DEV):
    """A paged cache in random page order; NaN and garbage wherever no sequence owns."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [(n + PAGE_SIZE - 1) // PAGE_SIZE for n in lens]
    num_pages = sum(pages_per_seq) + spare_pages
    max_pages = max(pages_per_seq + [0]) + spare_slots
    perm = torch.randperm(num_pages, generator=gen)
    k_cache = torch.randn(num_pages, PAGE_SIZE, heads_k, HEAD_DIM_K, generator=gen)
    owned = torch.zeros(num_pages, PAGE_SIZE, dtype=torch.bool)
    # unused slots: indices far outside the cache, negative ones, and real pages of others
    block_table = torch.randint(-2**30, 2**30, (len(lens), max_pages), generator=gen,
                                dtype=torch.int32)
    nxt = 0
    for b, n in enumerate(lens):
        for p in range(pages_per_seq[b]):
            block_table[b, p] = perm[nxt]
            owned[perm[nxt], :min(PAGE_SIZE, n - p * PAGE_SIZE)] = True
            nxt += 1
    k_cache[~owned] = float("nan")
    q = torch.randn(len(lens), seqlen_q, heads_q, HEAD_DIM_K, generator=gen)
    return (q.to(device, dtype), k_cache.to(device, dtype), block_table.to(device),
            torch.tensor(lens, dtype=torch.int32, device=device))


def run_and_check(lens, seqlen_q, heads_q, heads_k, causal, dtype, seed, num_sm_parts=None,
                  softmax_scale=None, config=None, plan="equal"):
    q, k_cache, block_table, cache_seqlens = make_problem(lens, seqlen_q, heads_q, heads_k,
                                                          dtype, seed)
    if num_sm_parts is None and plan == "equal":    # today's form: the call plans
        meta, num_splits = get_mla_metadata()
    else:                                           # the 2025 form: our planner's tensors
        meta, num_splits = plan_mla_splits(cache_seqlens, seqlen_q * heads_q // heads_k,
                                           heads_k, num_sm_parts=num_sm_parts, plan=plan)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V,
                                      meta, num_splits, softmax_scale=softmax_scale,
                                      causal=causal, config=config)
    if isinstance(meta, FlashMLASchedMeta):
        num_splits = meta.num_splits
    assert out.shape == (len(lens), seqlen_q, heads_q, HEAD_DIM_V) and out.dtype == dtype
    assert lse.shape == (len(lens), heads_q, seqlen_q) and lse.dtype == torch.float32
    ref_out, ref_lse = paged_mla_decode_ref(q, k_cache, block_table, cache_seqlens,
                                            HEAD_DIM_V, softmax_scale, causal)
    base_out, _ = paged_mla_decode_ref(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V,
                                       softmax_scale, causal, compute_dtype=dtype)
    assert not torch.isnan(out).any(), "NaN in out: a row never written, or garbage read"
    assert_error_within(out, base_out.to(dtype), ref_out, factor=2, slack=SLACK[dtype])
    assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4, name="lse")
    return out, lse, num_splits


# ----------------------------------------------------------------------------------------
# Under the interpreter (and on the GPU): small caches, the real 576/512 head dims.

CASES = [
    # lens (incl. 0 and 1), seqlen_q, heads_q, heads_k, causal, dtype, num_sm_parts
    ([1, 0, 130, 200, 65], 1, 16, 1, False, torch.bfloat16, 3),
    ([1, 0, 130, 200, 65], 2, 16, 1, True, torch.float16, 4),
    ([100, 64], 1, 32, 1, False, torch.float16, None),
    ([129, 40], 2, 64, 1, True, torch.bfloat16, 3),
    ([70], 1, 128, 1, False, torch.bfloat16, 2),
    ([70, 3], 2, 128, 1, True, torch.bfloat16, 2),        # 256 rows: the 32-row tiles
    ([33, 5], 1, 3, 1, False, torch.bfloat16, None),
    ([45, 191], 2, 24, 1, True, torch.float16, 3),
    ([77, 3, 190], 4, 8, 2, True, torch.bfloat16, 5),
    ([3, 1, 2], 4, 4, 1, True, torch.bfloat16, None),     # lengths < seqlen_q: empty rows
]


@pytest.mark.parametrize("lens,sq,hq,hk,causal,dtype,parts", CASES,
                         ids=lambda x: str(x).replace("torch.", "").replace(" ", ""))
def test_matches_reference(lens, sq, hq, hk, causal, dtype, parts):
    out, lse, num_splits = run_and_check(lens, sq, hq, hk, causal, dtype,
                                         seed=sum(lens) + hq, num_sm_parts=parts)
    if causal and sq > min(lens) + 1:
        assert torch.isposinf(lse).any(), "expected rows with no visible key"


def test_empty_rows_are_zero_with_inf_lse():
    """Length 0, and causal rows before the first key: zeros and lse = +inf."""
    out, lse, _ = run_and_check([0, 2], 4, 16, 1, True, torch.bfloat16, seed=5)
    assert torch.all(out[0] == 0) and torch.isposinf(lse[0]).all()
    assert torch.all(out[1, :2] == 0) and torch.isposinf(lse[1, :, :2]).all()
    assert torch.isfinite(lse[1, :, 2:]).all() and (out[1, 2:] != 0).any()


@pytest.mark.parametrize("plan", flash_mla.PLANS)
def test_custom_scale_and_many_splits(plan):
    """Every sequence cut into several splits, merged by the combine kernel; both plans."""
    _, _, num_splits = run_and_check([300, 129, 250, 0], 2, 16, 1, True, torch.bfloat16,
                                     seed=9, num_sm_parts=20, softmax_scale=0.05, plan=plan)
    per_seq = (num_splits[1:] - num_splits[:-1]).tolist()
    assert per_seq[3] == 1                        # the empty sequence: one (empty) split
    assert min(per_seq[:3]) >= 2 if plan == "equal" else max(per_seq) >= 2


def test_a_nan_the_kernel_must_read_fails_the_check():
    """The NaN planted elsewhere could be invisible only if the kernel reads no cache at
    all: put one in a row the sequence owns, and it must reach the output."""
    q, k_cache, bt, lens = make_problem([70], 1, 16, 1, torch.bfloat16, seed=2)
    k_cache[bt[0, 1], 3, 0, 7] = float("nan")             # token 67, owned
    meta, _ = get_mla_metadata()
    out, _ = flash_mla_with_kvcache(q, k_cache, bt, lens, HEAD_DIM_V, meta)
    assert torch.isnan(out).all()


# ----------------------------------------------------------------------------------------
# The plans, against plain-Python statements of the same algorithms.

def modeled_chunk_spec(blocks, slots, split_cost):
    """The model in words: for each candidate split size c (2x down to 1/4 of a slot's
    fair share, in steps of 1/16), list the pieces largest first; waves of `slots`
    pieces each last as long as their first piece; every piece of a split sequence adds
    split_cost / slots. The cheapest c wins, the larger on a tie."""
    fair = max(1, -(-sum(blocks) // slots))
    best = None
    for k in range(32, 3, -1):
        c = max(1, -(-fair * k // 16))
        n = [max(1, -(-b // c)) for b in blocks]
        pieces = sorted((size for b, m in zip(blocks, n) for size in [-(-b // m)] * m),
                        reverse=True)
        cost = sum(pieces[w] for w in range(0, len(pieces), slots))
        cost += sum(m for m in n if m > 1) * split_cost / slots
        if best is None or cost < best[0] - 1e-9:
            best = (cost, c)
    return best[1]


def equal_splits_spec(lens, num_parts, slots, split_cost, block=PAGE_SIZE, overhead=5):
    """Rows (sequence, first key, end key, slot) in launch order, and num_splits."""
    blocks = [(n + block - 1) // block for n in lens]
    if split_cost is None:                      # one share per split
        chunk = max(1, -(-sum(b + overhead for b in blocks) // num_parts))
    else:
        chunk = modeled_chunk_spec(blocks, slots, split_cost)
    n_split = [max(1, -(-b // chunk)) for b in blocks]
    num_splits = [0]
    for n in n_split:
        num_splits.append(num_splits[-1] + n)
    size = [-(-b // n) for b, n in zip(blocks, n_split)]
    order = sorted(range(len(lens)), key=lambda i: -size[i])   # stable: ties in batch order
    rows = []
    for i in order:
        for j in range(n_split[i]):
            rows.append((i, j * blocks[i] // n_split[i] * block,
                         min((j + 1) * blocks[i] // n_split[i] * block, lens[i]),
                         num_splits[i] + j))
    return rows, num_splits


def shares_spec(lens, num_parts, slots=None, split_cost=None, block=PAGE_SIZE, overhead=5):
    """FlashMLA's plan: rows in batch order, a split's slot is its row."""
    blocks = [(n + block - 1) // block for n in lens]
    payload = -(-sum(b + overhead for b in blocks) // num_parts) + overhead
    rows, num_splits = [], [0]
    idx, first, nsplit = 0, 0, 0
    for _ in range(num_parts):
        remain = payload
        while idx < len(lens):
            rest = blocks[idx] - first
            if remain >= rest + overhead:
                rows.append((idx, first * block, lens[idx], len(rows)))
                num_splits.append(num_splits[-1] + nsplit + 1)
                remain -= rest + overhead
                idx, first, nsplit = idx + 1, 0, 0
            else:
                if remain - overhead > 0:
                    rows.append((idx, first * block, (first + remain - overhead) * block,
                                 len(rows)))
                    first += remain - overhead
                    nsplit += 1
                break
    assert idx == len(lens), "the plan must hand out every sequence"
    return rows, num_splits


@pytest.mark.parametrize("plan,spec", [("equal", equal_splits_spec), ("shares", shares_spec)])
@pytest.mark.parametrize("seed", range(6))
def test_plan_matches_spec_and_covers_every_key_once(plan, spec, seed):
    rnd = random.Random(seed)
    batch = rnd.choice([1, 5, 33, 300])
    spread = rnd.choice([0, 500])                  # equal lengths, or N(700, 500)
    lens = [max(0, int(rnd.gauss(700, spread))) for _ in range(batch)]
    parts = rnd.choice([1, 3, 8, 132])
    slots = rnd.choice([1, 7, 16, 264])
    cost = rnd.choice([None, 0.0, 16 / 18, 4.0]) if plan == "equal" else None
    rows_q = 128 if cost is None else 16         # 128 rows: the config's rule is one share
    meta, num_splits = plan_mla_splits(torch.tensor(lens, dtype=torch.int32, device=DEV),
                                       rows_q, 1, num_sm_parts=parts, num_slots=slots,
                                       split_cost=cost, plan=plan)
    rows, spec_splits = spec(lens, parts, slots, cost)
    assert num_splits.tolist() == spec_splits
    modeled = plan == "equal" and cost is not None
    assert meta.shape == (batch + (4 * slots if modeled else parts), 8)
    assert [tuple(r) for r in meta[:len(rows), :4].tolist()] == rows
    assert (meta[len(rows):, :4] == -1).all() and (meta[:, 4:] == 0).all()
    # Whatever the row order, the slots of sequence b are num_splits[b] .. [b+1]-1, in
    # key order, and they tile [0, len) exactly once.
    by_slot = sorted(rows, key=lambda r: r[3])
    assert [r[3] for r in by_slot] == list(range(spec_splits[-1]))
    for b, n in enumerate(lens):
        own = by_slot[spec_splits[b]:spec_splits[b + 1]]
        assert all(r[0] == b for r in own)
        assert own[0][1] == 0 and own[-1][2] == n
        assert all(own[i][2] == own[i + 1][1] for i in range(len(own) - 1))


@pytest.mark.parametrize("batch,length,slots,expect", [
    (128, 4096, 264, 2),     # 256 programs: one wave of 264, 97% full (3: 1.45 waves)
    (128, 8192, 264, 2),
    (128, 4096, 132, 1),     # 132 slots: 128 programs, one wave
    (100, 8192, 264, 5),     # 500 programs, 2 waves of 26 blocks (2: one wave of 64)
    (128, 1000, 264, 2),     # 16 blocks: two waves' worth of 8-block pieces in one wave
])
def test_equal_lengths_fill_whole_waves(batch, length, slots, expect):
    """With every length the same, the model cuts every sequence the same way, into the
    count whose programs fill their waves (the expectations are worked out by hand)."""
    lens = torch.full((batch,), length, dtype=torch.int32, device=DEV)
    meta, num_splits = plan_mla_splits(lens, 16, 1, num_slots=slots, split_cost=16 / 18)
    per_seq = (num_splits[1:] - num_splits[:-1]).tolist()
    assert per_seq == [expect] * batch


def test_model_avoids_a_nearly_empty_last_wave():
    """Varying lengths ~ N(8192, 4096) at 32 rows on 264 slots (the benchmark's shape):
    the tensor code picks the plain-Python model's split size, and its pieces fill the
    last wave at least half (the earlier rule, a sixth of a share, made 602 pieces: 2.28
    waves, and measured 10% slower)."""
    rnd = random.Random(7)
    lens = [max(1, int(rnd.gauss(8192, 4096))) for _ in range(128)]
    blocks = [-(-n // 64) for n in lens]
    _, num_splits = plan_mla_splits(torch.tensor(lens, dtype=torch.int32, device=DEV),
                                    32, 1, num_slots=264, split_cost=32 / 18)
    chunk = modeled_chunk_spec(blocks, 264, 32 / 18)
    assert (num_splits[1:] - num_splits[:-1]).tolist() == [-(-b // chunk) for b in blocks]
    pieces = int(num_splits[-1])
    assert pieces % 264 == 0 or pieces % 264 > 264 // 2, pieces


def test_equal_plan_balances_one_long_and_many_short():
    """The point of the default plan: the long sequence (last in the batch) is cut into
    splits about the size of the short ones, which stay whole, and the largest splits
    are launched first. (FlashMLA's shares cut short sequences too, in batch order.)"""
    lens = [64 * 20] * 31 + [64 * 400]
    meta, num_splits = plan_mla_splits(torch.tensor(lens, dtype=torch.int32, device=DEV),
                                       128, 1, num_sm_parts=32)  # 128 rows: one-share splits
    rows = meta[:int(num_splits[-1])].tolist()
    sizes = [(r[2] - r[1] + 63) // 64 for r in rows]
    per_seq = (num_splits[1:] - num_splits[:-1]).tolist()
    assert per_seq[:31] == [1] * 31 and per_seq[31] > 1
    assert all(r[0] == 31 for r in rows[:per_seq[31]]), "the long sequence's splits first"
    assert max(sizes) <= -(-(400 + 31 * 20 + 32 * 5) // 32)      # at most one chunk
    # largest first (a sequence's equal splits may differ by one block)
    assert all(later <= earlier + 1 for earlier, later in zip(sizes, sizes[1:]))


# ----------------------------------------------------------------------------------------
# Bad input: a clear error, and no kernel launched.

class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched for bad input")


@pytest.fixture
def no_launch(monkeypatch):
    for name in ("_mla_decode_kernel", "_mla_combine_kernel"):
        monkeypatch.setattr(flash_mla, name, _NoLaunch())


def _good():
    q, k_cache, bt, lens = make_problem([70, 5], 2, 16, 1, torch.bfloat16, seed=1)
    meta, ns = get_mla_metadata()
    return dict(q=q, k_cache=k_cache, block_table=bt, cache_seqlens=lens, head_dim_v=512,
                tile_scheduler_metadata=meta, num_splits=ns)


def _legacy(a, rows=32):
    """The 2025 form: our planner's two tensors in place of the sched meta."""
    a["tile_scheduler_metadata"], a["num_splits"] = plan_mla_splits(a["cache_seqlens"], rows, 1)


def _lens(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEV)


BAD = [
    ("q last dim", lambda a: a.update(q=a["q"][..., :512]), ValueError, "576"),
    ("k last dim", lambda a: a.update(k_cache=a["k_cache"][..., :512]), ValueError, "576"),
    ("q and k dims differ", lambda a: a.update(q=torch.cat([a["q"], a["q"][..., :64]], -1)),
     ValueError, "576"),
    ("head_dim_v", lambda a: a.update(head_dim_v=256), ValueError, "head_dim_v"),
    ("page size", lambda a: a.update(k_cache=a["k_cache"][:, :32]), ValueError, "page size"),
    ("dtype mismatch", lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "differs"),
    ("float32 q", lambda a: a.update(q=a["q"].float(), k_cache=a["k_cache"].float()),
     TypeError, "bfloat16 or float16"),
    ("int64 table", lambda a: a.update(block_table=a["block_table"].long()), TypeError,
     "int32"),
    ("int64 lengths", lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError,
     "int32"),
    ("heads not a multiple", lambda a: a.update(
        k_cache=a["k_cache"].expand(-1, -1, 3, -1).contiguous()), ValueError, "multiple"),
    ("batch mismatch", lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), ValueError,
     "batch"),
    ("stale metadata (2025 form)", lambda a: (_legacy(a), a.update(
        num_splits=a["num_splits"][:2])), ValueError, "num_splits"),
    ("2025 form without num_splits", lambda a: (_legacy(a), a.update(num_splits=None)),
     TypeError, "num_splits"),
    ("not a sched meta", lambda a: a.update(tile_scheduler_metadata={}), TypeError,
     "FlashMLASchedMeta"),
    ("device mismatch", lambda a: a.update(block_table=a["block_table"].to("meta")),
     ValueError, "device"),
    # FlashMLA's own rules (it asserts; FlashMLAArgumentError is also an AssertionError)
    ("num_splits with a sched meta", lambda a: a.update(
        num_splits=torch.zeros(3, dtype=torch.int32, device=DEV)), FlashMLAArgumentError,
     "num_splits must be None"),
    ("attn_sink with dense", lambda a: a.update(
        attn_sink=torch.zeros(16, device=DEV)), FlashMLAArgumentError, "attn_sink must be None"),
    ("extra cache with dense", lambda a: a.update(
        extra_k_cache=a["k_cache"], topk_length=a["cache_seqlens"]), FlashMLAArgumentError,
     "extra_k_cache, topk_length must be None"),
    ("no block_table", lambda a: a.update(block_table=None), FlashMLAArgumentError,
     "must be provided"),
    ("sparse and causal", lambda a: a.update(
        indices=torch.zeros(2, 2, 8, dtype=torch.int32, device=DEV), is_fp8_kvcache=True,
        causal=True), FlashMLAArgumentError, "causal must be False"),
    ("sparse without fp8", lambda a: a.update(
        indices=torch.zeros(2, 2, 8, dtype=torch.int32, device=DEV)), FlashMLAArgumentError,
     "is_fp8_kvcache must be True"),
    # not here yet (a later issue)
    ("sparse", lambda a: a.update(indices=torch.zeros(2, 2, 8, dtype=torch.int32, device=DEV),
                                  is_fp8_kvcache=True), NotImplementedError, "sparse"),
    ("fp8 cache", lambda a: a.update(is_fp8_kvcache=True), NotImplementedError, "FP8"),
]

# Bad *values*: found by the device-side check (default) or, with debug_checks=True, on
# the host before any launch with a detailed message.
BAD_VALUES = [
    ("short table", lambda a: a.update(block_table=a["block_table"][:, :1]),
     "cache_seqlens", "too short"),
    ("table entry past the cache", lambda a: a["block_table"].__setitem__(
        (0, 1), a["k_cache"].shape[0]), "block_table", r"block_table\[0, 1\] = \d+ points outside"),
    ("negative table entry", lambda a: a["block_table"].__setitem__((1, 0), -1),
     "block_table", "outside"),
    ("negative length", lambda a: a.update(cache_seqlens=_lens(70, -1)), "cache_seqlens",
     r"cache_seqlens\[1\] is negative"),
    ("huge length", lambda a: a.update(cache_seqlens=_lens(2**31 - 1, 5)), "cache_seqlens",
     "too short"),
]


@pytest.mark.parametrize("what,mutate,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_before_launch(no_launch, what, mutate, exc, match):
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=match):
        flash_mla_with_kvcache(**args)
    sched = args["tile_scheduler_metadata"]
    if isinstance(sched, FlashMLASchedMeta):     # a rejected call plans nothing
        assert not sched.have_initialized and sched.tile_scheduler_metadata is None


@pytest.mark.parametrize("what,mutate,arg,match", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_debug_checks_reject_bad_values_before_launch(no_launch, what, mutate, arg, match):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        flash_mla_with_kvcache(**args, debug_checks=True)


@pytest.mark.skipif(not runtime.is_emulated(), reason="on a GPU the device assert kills the "
                    "process: test_gpu_device_check_raises runs it in a subprocess")
@pytest.mark.parametrize("what,mutate,arg,match,form", [
    b + ("sched meta",) for b in BAD_VALUES] + [b + ("2025",) for b in BAD_VALUES[1:4:2]],
    ids=[b[0] for b in BAD_VALUES] + [b[0] + " (2025 form)" for b in BAD_VALUES[1:4:2]])
def test_device_check_raises_on_bad_values(what, mutate, arg, match, form):
    """Without debug_checks no value is read back: the kernels clear a flag, and
    torch._assert_async raises (on the CPU at once, on a GPU at the next sync)."""
    args = _good()
    mutate(args)
    if form == "2025":
        _legacy(args)
    msg = flash_mla.MSG_BAD_SEQLENS if arg == "cache_seqlens" else flash_mla.MSG_BAD_TABLE
    with pytest.raises(RuntimeError, match=re.escape(msg[:60])):
        flash_mla_with_kvcache(**args)


def test_device_check_passes_flashmla_unused_slots():
    """FlashMLA's test data: 2147480000 in every unused table slot, NaN in unused rows."""
    q, k_cache, bt, lens = make_problem([70, 5, 0, 129], 2, 16, 1, torch.bfloat16, seed=8)
    used = torch.arange(bt.shape[1], device=DEV)[None, :] < ((lens + 63) // 64)[:, None]
    bt = torch.where(used, bt, torch.full_like(bt, 2147480000))
    meta, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, causal=True)
    ref_out, ref_lse = paged_mla_decode_ref(q, k_cache, bt, lens, 512, causal=True)
    assert_close(out, ref_out, dtype=torch.bfloat16, name="out")
    assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4, name="lse")


@pytest.mark.parametrize("seqlen_q,causal", [(1, False), (2, False), (3, True)])
def test_lengths_that_fill_the_table_exactly_pass_the_check(seqlen_q, causal):
    """The largest legal length, block_table.shape[1] x 64 (no spare table slot), on a
    page boundary, beside lengths one either side of one: the device check accepts it
    (a bound off by one rejects a full table) and the result is the reference's. With
    seqlen_q > 1 and causal=False every query row sees every key (no per-row limit)."""
    q, k_cache, bt, lens = make_problem([2 * PAGE_SIZE, PAGE_SIZE + 1, PAGE_SIZE - 1],
                                        seqlen_q, 16, 1, torch.bfloat16, seed=11,
                                        spare_slots=0)
    assert int(lens.max()) == bt.shape[1] * PAGE_SIZE
    meta, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(q, k_cache, bt, lens, HEAD_DIM_V, meta, causal=causal)
    ref_out, ref_lse = paged_mla_decode_ref(q, k_cache, bt, lens, HEAD_DIM_V, causal=causal)
    base_out, _ = paged_mla_decode_ref(q, k_cache, bt, lens, HEAD_DIM_V, causal=causal,
                                       compute_dtype=torch.bfloat16)
    assert_error_within(out, base_out.to(out.dtype), ref_out, factor=2,
                        slack=SLACK[torch.bfloat16])
    assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4, name="lse")


@pytest.mark.parametrize("plan", flash_mla.PLANS)
def test_a_plan_for_longer_lengths_reads_only_the_current_keys(plan):
    """The 2025 form: metadata planned for longer sequences (one of them since emptied to
    length 0) and used with the current lengths. The decode kernel clamps every split's
    key range to the current length, so the splits past it are empty (the combine merges
    their -inf lse) and no key past the end is read (those rows hold NaN)."""
    now = [100, 0, 5, 64]
    q, k_cache, bt, lens = make_problem(now, 2, 16, 1, torch.bfloat16, seed=12)
    before = _lens(3 * PAGE_SIZE + 1, 2 * PAGE_SIZE, PAGE_SIZE + 7, 2 * PAGE_SIZE)
    meta, ns = plan_mla_splits(before, 32, 1, num_sm_parts=20, plan=plan)
    assert (ns[1:] - ns[:-1]).max() >= 2, "some sequence must be split"
    out, lse = flash_mla_with_kvcache(q, k_cache, bt, lens, HEAD_DIM_V, meta, ns, causal=True)
    ref_out, ref_lse = paged_mla_decode_ref(q, k_cache, bt, lens, HEAD_DIM_V, causal=True)
    assert not torch.isnan(out).any(), "NaN in out: a key past the length was read"
    assert_close(out, ref_out, dtype=torch.bfloat16, name="out")
    assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4, name="lse")
    assert torch.all(out[1] == 0) and torch.isposinf(lse[1]).all()


@pytest.mark.parametrize("plan", flash_mla.PLANS)
def test_a_plan_without_spare_rows(plan):
    """The 2025 form with metadata of exactly num_splits[-1] rows (the planner's rows cut
    to those it used): the last split's slot is the last row of the split buffers, and
    the kernels' clamps of the slot to the buffers must not move it."""
    lens = [2 * PAGE_SIZE + 1, PAGE_SIZE - 1, 3 * PAGE_SIZE]
    q, k_cache, bt, cache_seqlens = make_problem(lens, 1, 16, 1, torch.bfloat16, seed=13)
    meta, ns = plan_mla_splits(cache_seqlens, 16, 1, num_sm_parts=20, split_cost=0.0,
                               plan=plan)
    used = int(ns[-1])
    assert used > len(lens) and (meta[used:, 0] == -1).all()
    meta = meta[:used].contiguous()
    out, lse = flash_mla_with_kvcache(q, k_cache, bt, cache_seqlens, HEAD_DIM_V, meta, ns)
    ref_out, ref_lse = paged_mla_decode_ref(q, k_cache, bt, cache_seqlens, HEAD_DIM_V)
    assert_close(out, ref_out, dtype=torch.bfloat16, name="out")
    assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4, name="lse")


def views_in_poison(lens, seqlen_q=1, heads_q=16, seed=0, extra_cols=3):
    """q, k_cache and block_table as views inside larger NaN-filled buffers. Every row
    of every page in the view is finite, so a read that stays inside the tensors given
    gives finite numbers, and one outside gives NaN. Unused table slots hold FlashMLA's
    2147480000; the table's parent has extra columns of valid-looking page numbers, past
    block_table.shape[1]."""
    gen = torch.Generator().manual_seed(seed)
    pages = [(n + 63) // 64 for n in lens]
    num_pages, width = sum(pages) + 2, max(pages)
    k_parent = torch.full((num_pages + 4, 64, 1, HEAD_DIM_K), float("nan"))
    k_parent[2:2 + num_pages] = torch.randn(num_pages, 64, 1, HEAD_DIM_K, generator=gen)
    k_cache = k_parent.to(DEV, torch.bfloat16)[2:2 + num_pages]
    bt_parent = torch.randint(0, num_pages, (len(lens) + 2, width + extra_cols),
                              generator=gen, dtype=torch.int32)
    perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
    start = 0
    for b, p in enumerate(pages):
        bt_parent[1 + b, :p] = perm[start:start + p]
        bt_parent[1 + b, p:width] = 2147480000
        start += p
    block_table = bt_parent.to(DEV)[1:1 + len(lens), :width]
    q_parent = torch.full((len(lens), seqlen_q, heads_q + 3, HEAD_DIM_K + 64), float("nan"))
    q_parent[:, :, 1:1 + heads_q, :HEAD_DIM_K] = torch.randn(len(lens), seqlen_q, heads_q,
                                                            HEAD_DIM_K, generator=gen)
    q = q_parent.to(DEV, torch.bfloat16)[:, :, 1:1 + heads_q, :HEAD_DIM_K]
    assert not q.is_contiguous() and not block_table.is_contiguous()
    return q, k_cache, block_table, _lens(*lens)


@pytest.mark.parametrize("bad,form", [
    ("entry past the cache", "sched meta"), ("negative entry", "sched meta"),
    ("long length", "sched meta"), ("negative length", "sched meta"), ("none", "sched meta"),
    ("entry past the cache", "2025"), ("long length", "2025")])
def test_bad_values_read_nothing_outside(monkeypatch, bad, form):
    """With the device check off (to see the outputs), a bad value in one sequence: the
    other sequences' outputs are the reference's, and the bad one reads only inside the
    tensors given: its length is clamped to [0, block_table.shape[1] x 64] and its table
    entries to [0, num_pages), which is what the reference is given for it."""
    monkeypatch.setattr(flash_mla, "_DEVICE_CHECKS", False)
    lens = [70, 130, 5]
    q, k_cache, bt, cache_seqlens = views_in_poison(lens, seed=3)
    num_pages, width = k_cache.shape[0], bt.shape[1]
    clamped_bt, clamped_lens = bt.clone(), cache_seqlens.clone()
    if bad == "entry past the cache":
        bt[1, 2] = num_pages                   # the parent holds NaN there
        clamped_bt[1, 2] = num_pages - 1
    elif bad == "negative entry":
        bt[1, 0] = -2
        clamped_bt[1, 0] = 0
    elif bad == "long length":                 # the table's parent has more columns
        cache_seqlens[1] = width * 64 + 100
        clamped_lens[1] = width * 64
    elif bad == "negative length":
        cache_seqlens[1] = -5
        clamped_lens[1] = 0
    if form == "2025":
        meta, ns = plan_mla_splits(cache_seqlens, 16, 1, num_sm_parts=5)
    else:
        meta, ns = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(q, k_cache, bt, cache_seqlens, 512, meta, ns)
    for what, t in (("NaN", out), ("lse NaN", lse)):
        assert not torch.isnan(t).any(), f"{what}: a read outside the tensors given"
    ref_out, ref_lse = paged_mla_decode_ref(q, k_cache, clamped_bt, clamped_lens.clamp(min=0),
                                            512)
    assert_close(out, ref_out, dtype=torch.bfloat16, name="out")
    assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4, name="lse")


def test_garbage_metadata_stays_inside_the_buffers():
    """The 2025 form takes metadata from the caller: whatever it holds (sequences, key
    ranges and slots out of range, a num_splits that is not cumulative), the kernels
    neither fault nor write outside their buffers (the autouse fixture's guards)."""
    q, k_cache, bt, lens = make_problem([70, 5, 130], 1, 16, 1, torch.bfloat16, seed=4)
    meta, ns = plan_mla_splits(lens, 16, 1, num_sm_parts=4)
    gen = torch.Generator().manual_seed(0)
    garbage = torch.randint(-2**31, 2**31 - 1, meta.shape, generator=gen, dtype=torch.int32)
    garbage[::2, 0] = torch.randint(-1, 4, (garbage[::2].shape[0],), generator=gen,
                                    dtype=torch.int32)      # some rows name real sequences
    ns_garbage = torch.tensor([0, 7, -3, 2**30], dtype=torch.int32)
    out, lse = flash_mla_with_kvcache(q, k_cache, bt, lens, 512, garbage.to(DEV),
                                      ns_garbage.to(DEV))
    assert out.shape == (3, 1, 16, 512)


def test_plan_survives_any_lengths():
    """Negative, zero and near-2^31 lengths: every plan stays inside its metadata (the
    rows it fills and the slots it hands out), and covers each clamped length once."""
    lens = [-5, 0, 2**31 - 1, 3000, -2**31, 2**31 - 64, 1]
    t = torch.tensor(lens, dtype=torch.int32, device=DEV)
    for kw in ({}, {"plan": "shares"}, {"split_cost": 0.5}, {"max_seqlen_k": 64 * 50}):
        meta, ns = plan_mla_splits(t, 16, 1, num_slots=7, num_sm_parts=5, **kw)
        ns = ns.tolist()
        assert ns[0] == 0 and all(a <= b for a, b in zip(ns, ns[1:]))
        assert ns[-1] <= meta.shape[0], (kw, ns[-1], meta.shape)
        rows = [r for r in meta[:, :4].tolist() if r[0] >= 0]
        assert len(rows) == ns[-1] and sorted(r[3] for r in rows) == list(range(ns[-1]))
        cap = kw.get("max_seqlen_k", flash_mla.MAX_SEQLEN_K)
        for b, n in enumerate(lens):
            own = sorted((r for r in rows if r[0] == b), key=lambda r: r[1])
            assert own[0][1] == 0 and own[-1][2] == min(max(n, 0), cap)


# ----------------------------------------------------------------------------------------
# FlashMLA's sched meta: planned by the first call, reused, checked.

def test_sched_meta_is_planned_once_and_reused(monkeypatch):
    calls = []
    real = flash_mla.plan_mla_splits
    monkeypatch.setattr(flash_mla, "plan_mla_splits",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    args = _good()
    sched = args["tile_scheduler_metadata"]
    assert isinstance(sched, FlashMLASchedMeta) and args["num_splits"] is None
    out1, lse1 = flash_mla_with_kvcache(**args)
    assert sched.have_initialized and len(calls) == 1
    assert (sched.config.b, sched.config.s_q, sched.config.h_q, sched.config.h_k,
            sched.config.page_block_size, sched.config.causal) == (2, 2, 16, 1, 64, False)
    meta = sched.tile_scheduler_metadata
    out2, lse2 = flash_mla_with_kvcache(**dict(args, q=args["q"] * 2))   # another layer
    assert len(calls) == 1 and sched.tile_scheduler_metadata is meta
    ref, _ = paged_mla_decode_ref(args["q"] * 2, args["k_cache"], args["block_table"],
                                  args["cache_seqlens"], 512)
    assert_close(out2, ref, dtype=torch.bfloat16, name="second call")


@pytest.mark.parametrize("change,field", [
    (lambda a: a.update(causal=True), "causal"),
    (lambda a: a.update(q=a["q"][:, :1]), "s_q"),
    (lambda a: a.update(q=a["q"][:1], block_table=a["block_table"][:1],
                        cache_seqlens=a["cache_seqlens"][:1]), "b"),
    (lambda a: a.update(q=a["q"][:, :, :8]), "h_q"),
    (lambda a: a.update(k_cache=a["k_cache"].expand(-1, -1, 2, -1)), "h_k"),
])
def test_sched_meta_rejects_other_shapes(no_launch, monkeypatch, change, field):
    args = _good()
    sched = args["tile_scheduler_metadata"]
    sched.have_initialized = True
    sched.config = flash_mla._sched_config(args["q"], args["k_cache"], False, False)
    change(args)
    with pytest.raises(FlashMLAArgumentError, match=rf"sched_meta\.config\.{field} must be"):
        flash_mla_with_kvcache(**args)


def test_get_mla_metadata_takes_the_old_arguments():
    lens = _lens(5, 6)
    for sched, none in (get_mla_metadata(), get_mla_metadata(lens, 16, 1),
                        get_mla_metadata(lens, 16, 1, 16, False, None)):
        assert isinstance(sched, FlashMLASchedMeta) and none is None
        assert not sched.have_initialized
    with pytest.raises(TypeError, match="plan_mla_splits"):
        get_mla_metadata(lens, 16, 1, num_sm_parts=4)


def test_metadata_rejects_bad_lengths():
    with pytest.raises(ValueError, match="must be positive"):
        plan_mla_splits(torch.tensor([5, 6], dtype=torch.int32), 16, 1, num_slots=0)
    with pytest.raises(ValueError, match="plan must be one of"):
        plan_mla_splits(torch.tensor([5, 6], dtype=torch.int32), 16, 1, plan="greedy")
    with pytest.raises(TypeError, match="int32"):
        plan_mla_splits(torch.tensor([5, 6]), 16, 1)
    with pytest.raises(ValueError, match="1-D"):
        plan_mla_splits(torch.zeros(2, 2, dtype=torch.int32), 16, 1)


def test_empty_batch_launches_nothing(no_launch):
    q = torch.randn(0, 1, 16, 576, device=DEV).bfloat16()
    k_cache = torch.randn(2, 64, 1, 576, device=DEV).bfloat16()
    lens = torch.zeros(0, dtype=torch.int32, device=DEV)
    meta, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(q, k_cache, torch.zeros(0, 4, dtype=torch.int32,
                                                              device=DEV), lens, 512, meta)
    assert out.shape == (0, 1, 16, 512) and lse.shape == (0, 16, 1)


# ----------------------------------------------------------------------------------------
# torch.compile: the plan and the decode are custom ops, so a model traces in one graph.

def _two_layers(q, k_cache, block_table, cache_seqlens, sched):
    """What a model does per step: one sched meta (made here, or passed in) for all
    layers; torch ops around the attention."""
    local, _ = get_mla_metadata()
    o1, lse1 = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, sched,
                                      causal=True)
    q2 = q * 0.5 + o1.sum(-1, keepdim=True) * 1e-3
    o2, lse2 = flash_mla_with_kvcache(q2, k_cache, block_table, cache_seqlens, 512, sched,
                                      causal=True)
    o3, _ = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, local)
    return o1, o2 * 2, lse1 + lse2, o3


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q, k_cache, bt, lens = make_problem([70, 5], 2, 8, 1, torch.bfloat16, seed=6)
    eager = _two_layers(q, k_cache, bt, lens, get_mla_metadata()[0])
    compiled = torch.compile(_two_layers, fullgraph=True, backend="aot_eager")
    sched, _ = get_mla_metadata()
    got = compiled(q, k_cache, bt, lens, sched)
    assert sched.have_initialized and sched.config.s_q == 2   # planned inside, as eager
    assert isinstance(sched.tile_scheduler_metadata, torch.Tensor)
    for a, b in zip(got, eager):
        assert torch.equal(a, b)
    ref, _ = paged_mla_decode_ref(q, k_cache, bt, lens, 512, causal=True)
    assert_close(got[0], ref, dtype=torch.bfloat16, name="compiled out")


# ----------------------------------------------------------------------------------------
# On the GPU: FlashMLA's sizes (batch 128, mean length 4096, lengths ~ N(mean, mean/2)).

@pytest.mark.gpu
@pytest.mark.parametrize("mean,varlen,sq,hq,causal,dtype", [
    (4096, True, 1, 16, False, torch.bfloat16),
    (4096, True, 2, 128, True, torch.bfloat16),
    (4096, False, 1, 64, False, torch.float16),
    (4096, True, 2, 32, True, torch.float16),
    (16384, True, 1, 128, False, torch.bfloat16),
])
def test_gpu_flashmla_sizes(mean, varlen, sq, hq, causal, dtype):
    batch = 128 if mean <= 4096 else 32
    lens = flashmla_lens(batch, mean, varlen, sq, seed=mean + hq)
    run_and_check(lens, sq, hq, 1, causal, dtype, seed=hq * sq)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk", [(16, 1), (32, 1), (64, 1), (128, 1), (3, 1), (24, 1),
                                   (8, 2), (128, 4)])
@pytest.mark.parametrize("sq,causal", [(1, False), (2, True), (4, True)])
def test_gpu_every_head_count(hq, hk, sq, causal):
    lens = flashmla_lens(16, 700, True, sq, seed=hq + sq) + [0, 1, 64]
    run_and_check(lens, sq, hq, hk, causal, torch.bfloat16, seed=hq * 7 + sq)


@pytest.mark.gpu
def test_gpu_fp32_dot_path(monkeypatch):
    """The path the interpreter runs (dots in fp32), checked on the real compiler too
    (with tiles that fit: fp32 operands need twice the shared memory)."""
    monkeypatch.setattr(flash_mla, "_DOT_FP32", True)
    run_and_check(flashmla_lens(8, 500, True, 2, seed=1), 2, 8, 1, True, torch.bfloat16,
                  seed=3, config=flash_mla.MLAConfig(16, 512, 8, 1))


def test_trace_needs_a_gpu_or_a_valid_buffer():
    q, k_cache, block_table, cache_seqlens = make_problem([70, 5], 1, 16, 1, torch.bfloat16,
                                                          seed=4)
    meta, ns = get_mla_metadata(cache_seqlens, 16, 1)
    args = (q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, meta, ns)
    if runtime.is_emulated():
        with pytest.raises(RuntimeError, match="needs a GPU"):
            flash_mla_with_kvcache(*args, trace=torch.zeros(10**4, dtype=torch.int64))
    else:
        for bad in (torch.zeros(10**4, dtype=torch.int32, device=DEV),   # dtype
                    torch.zeros(5, dtype=torch.int64, device=DEV)):       # too small
            with pytest.raises(ValueError, match="trace must be"):
                flash_mla_with_kvcache(*args, trace=bad)


@pytest.mark.gpu
def test_gpu_trace_records_every_program():
    """The timeline's raw data: one record per program, on a real SM, start <= end, and
    the traced call computes what the untraced one does."""
    lens = flashmla_lens(32, 3000, True, 1, seed=5)
    q, k_cache, block_table, cache_seqlens = make_problem(lens, 1, 16, 1, torch.bfloat16,
                                                          seed=6)
    meta, ns = plan_mla_splits(cache_seqlens, 16, 1)
    args = (q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, meta, ns)
    cfg = flash_mla.default_config(16)
    grid = flash_mla.decode_grid(16, 1, meta.shape[0], cfg)
    n = grid[0] * grid[1] * grid[2]
    trace = torch.full((3 * n,), -7, dtype=torch.int64, device=DEV)
    out, lse = flash_mla_with_kvcache(*args, trace=trace)
    ref_out, ref_lse = flash_mla_with_kvcache(*args)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    rec = trace.view(n, 3).cpu()
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    assert ((rec[:, 0] >= 0) & (rec[:, 0] < sms)).all()
    assert (rec[:, 1] > 0).all() and (rec[:, 2] >= rec[:, 1]).all()
    assert (rec[:, 2] - rec[:, 1]).max() < 10**9             # no program took a second


# ----------------------------------------------------------------------------------------
# On the GPU: the device-side check, no host sync, torch.compile (inductor), CUDA graphs.

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {lesson!r}]
    from common import runtime
    import torch
    import flash_mla
    import test_flash_mla as t
    args = t._good()
    if sys.argv[1] != "none":
        dict((b[0], b[1]) for b in t.BAD_VALUES)[sys.argv[1]](args)
    out, lse = flash_mla.flash_mla_with_kvcache(**args)
    try:
        torch.cuda.synchronize()
        print("RESULT: no error", flush=True)
    except RuntimeError as e:
        print("RESULT: raised", str(e).splitlines()[0], flush=True)
""")


@pytest.mark.gpu
@pytest.mark.parametrize("what,arg", [("none", None)] + [(b[0], b[2]) for b in BAD_VALUES],
                         ids=["none"] + [b[0] for b in BAD_VALUES])
def test_gpu_device_check_raises(what, arg):
    """A device-side assert poisons the CUDA context, so each case runs in its own
    process: the bad value is found without a host sync in the call, and raises at the
    next one, with the message naming the argument (CUDA prints it)."""
    script = _SCRIPT.format(root=str(ROOT), lesson=str(Path(__file__).parent))
    r = subprocess.run([sys.executable, "-c", script, what], capture_output=True, text=True,
                       timeout=600)
    output = r.stdout + r.stderr
    if arg is None:
        assert "RESULT: no error" in r.stdout, output[-3000:]
        return
    assert "RESULT: raised" in r.stdout and "device-side assert" in r.stdout, output[-3000:]
    msg = flash_mla.MSG_BAD_SEQLENS if arg == "cache_seqlens" else flash_mla.MSG_BAD_TABLE
    assert msg[:50] in output, output[-3000:]


@pytest.mark.gpu
def test_gpu_default_call_never_syncs():
    """torch's sync debug mode turns any host sync into an error: the default call,
    planning (fresh sched meta) or reusing the plan, makes none; debug_checks does."""
    lens = flashmla_lens(32, 1000, True, 1, seed=2)
    q, k_cache, bt, cache_seqlens = make_problem(lens, 1, 16, 1, torch.bfloat16, seed=2)
    flash_mla_with_kvcache(q, k_cache, bt, cache_seqlens, 512, get_mla_metadata()[0])
    torch.cuda.synchronize()                     # compiled and loaded before the check
    sched, _ = get_mla_metadata()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = flash_mla_with_kvcache(q, k_cache, bt, cache_seqlens, 512, sched)
        out2, _ = flash_mla_with_kvcache(q, k_cache, bt, cache_seqlens, 512, sched)
        with pytest.raises(RuntimeError, match="synchroniz"):
            flash_mla_with_kvcache(q, k_cache, bt, cache_seqlens, 512, get_mla_metadata()[0],
                                   debug_checks=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref, _ = paged_mla_decode_ref(q, k_cache, bt, cache_seqlens, 512)
    assert_close(out, ref, dtype=torch.bfloat16, name="out")
    assert torch.equal(out, out2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_torch_compile_inductor(monkeypatch, mode):
    # plain buffers: cudagraph trees (reduce-overhead) own the op's allocations and reuse
    # their memory between replays, so the guard fixture's parents cannot be kept
    monkeypatch.setattr(flash_mla, "_empty", lambda shape, dtype, device:
                        torch.empty(shape, dtype=dtype, device=device))
    torch._dynamo.reset()
    lens = flashmla_lens(8, 500, True, 2, seed=4)
    q, k_cache, bt, cache_seqlens = make_problem(lens, 2, 16, 1, torch.bfloat16, seed=4)
    eager = _two_layers(q, k_cache, bt, cache_seqlens, get_mla_metadata()[0])
    compiled = torch.compile(_two_layers, fullgraph=True, mode=mode)
    for _ in range(3):                  # reduce-overhead records its CUDA graph later
        got = [t.clone() for t in compiled(q, k_cache, bt, cache_seqlens,
                                           get_mla_metadata()[0])]
    assert torch.equal(got[0], eager[0]) and torch.equal(got[3], eager[3])
    # inductor fuses q * 0.5 + ... in fp32, eager rounds each op: bf16-level differences
    assert_close(got[1], eager[1], dtype=torch.bfloat16, name="second layer")
    assert_close(got[2], eager[2], atol=2e-2, rtol=1e-3, name="lse1 + lse2")
    ref, _ = paged_mla_decode_ref(q, k_cache, bt, cache_seqlens, 512, causal=True)
    assert_close(got[0], ref, dtype=torch.bfloat16, name="compiled out")


@pytest.mark.gpu
def test_gpu_cuda_graph_replans_inside_the_graph():
    """A default call captured in a CUDA graph, with a fresh sched meta, so the plan is
    captured too; replayed with new q, new cache contents, new table and new lengths in
    the static inputs, it gives the reference result for the new values."""
    batch, cap_lens = 16, [1400] * 16
    q, k_cache, bt, cache_seqlens = make_problem(cap_lens, 2, 16, 1, torch.bfloat16, seed=1)

    def step():
        sched, _ = get_mla_metadata()
        return flash_mla_with_kvcache(q, k_cache, bt, cache_seqlens, 512, sched, causal=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    for seed in (2, 3):
        lens = flashmla_lens(batch, 600, True, 2, seed=seed) + []
        lens[seed] = 0
        q2, k2, bt2, lens2 = make_problem(lens, 2, 16, 1, torch.bfloat16, seed=seed)
        assert k2.shape[0] <= k_cache.shape[0] and bt2.shape[1] <= bt.shape[1]
        q.copy_(q2)
        k_cache.fill_(float("nan"))
        k_cache[:k2.shape[0]] = k2
        bt.fill_(2147480000)
        bt[:, :bt2.shape[1]] = bt2
        cache_seqlens.copy_(lens2)
        graph.replay()
        ref_out, ref_lse = paged_mla_decode_ref(q, k_cache, bt, cache_seqlens, 512, causal=True)
        assert_close(out, ref_out, dtype=torch.bfloat16, name=f"replay {seed}")
        assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4, name=f"lse, replay {seed}")
