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

import pytest
import torch

from common import runtime
from common.checks import assert_close, assert_error_within, poisoned
from common.reference import paged_mla_decode_ref

import flash_mla
from flash_mla import (HEAD_DIM_K, HEAD_DIM_V, PAGE_SIZE, flash_mla_with_kvcache,
                       get_mla_metadata)
from problems import flashmla_lens

DEV = runtime.torch_device()
SLACK = {torch.bfloat16: 2 ** -9, torch.float16: 2 ** -12}   # half an ulp at 1.0


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN (torch.empty may hand out zeros)."""
    monkeypatch.setattr(flash_mla, "_empty", lambda shape, dtype, device:
                        poisoned(shape, dtype, device))


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
    meta, num_splits = get_mla_metadata(cache_seqlens, seqlen_q * heads_q // heads_k,
                                        heads_k, num_sm_parts=num_sm_parts, plan=plan)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V,
                                      meta, num_splits, softmax_scale=softmax_scale,
                                      causal=causal, config=config)
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
    meta, ns = get_mla_metadata(lens, 16, 1)
    out, _ = flash_mla_with_kvcache(q, k_cache, bt, lens, HEAD_DIM_V, meta, ns)
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
    meta, num_splits = get_mla_metadata(torch.tensor(lens, dtype=torch.int32, device=DEV),
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
    meta, num_splits = get_mla_metadata(lens, 16, 1, num_slots=slots, split_cost=16 / 18)
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
    _, num_splits = get_mla_metadata(torch.tensor(lens, dtype=torch.int32, device=DEV),
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
    meta, num_splits = get_mla_metadata(torch.tensor(lens, dtype=torch.int32, device=DEV),
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
    meta, ns = get_mla_metadata(lens, 32, 1)
    return dict(q=q, k_cache=k_cache, block_table=bt, cache_seqlens=lens, head_dim_v=512,
                tile_scheduler_metadata=meta, num_splits=ns)


BAD = [
    ("q last dim", lambda a: a.update(q=a["q"][..., :512]), ValueError, "576"),
    ("k last dim", lambda a: a.update(k_cache=a["k_cache"][..., :512]), ValueError, "576"),
    ("q and k dims differ", lambda a: a.update(q=torch.cat([a["q"], a["q"][..., :64]], -1)),
     ValueError, "576"),
    ("head_dim_v", lambda a: a.update(head_dim_v=256), ValueError, "head_dim_v"),
    ("page size", lambda a: a.update(k_cache=a["k_cache"][:, :32]), ValueError, "page size"),
    ("short table", lambda a: a.update(block_table=a["block_table"][:, :1]), ValueError,
     "too short"),
    ("length beyond the pages", lambda a: a.update(
        cache_seqlens=torch.tensor([70, 64 * 9 + 1], dtype=torch.int32, device=DEV),
        block_table=torch.zeros(2, 12, dtype=torch.int32, device=DEV)), ValueError,
     "beyond the pages"),
    ("table entry outside the cache", lambda a: a["block_table"].__setitem__(
        (0, 1), 10**6), ValueError, "outside"),
    ("negative length", lambda a: a.update(
        cache_seqlens=torch.tensor([70, -1], dtype=torch.int32, device=DEV)), ValueError,
     "negative"),
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
    ("stale metadata", lambda a: a.update(num_splits=a["num_splits"][:2]), ValueError,
     "num_splits"),
    ("device mismatch", lambda a: a.update(block_table=a["block_table"].to("meta")),
     ValueError, "device"),
]


@pytest.mark.parametrize("what,mutate,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_before_launch(no_launch, what, mutate, exc, match):
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=match):
        flash_mla_with_kvcache(**args)


def test_metadata_rejects_bad_lengths():
    with pytest.raises(ValueError, match="must be positive"):
        get_mla_metadata(torch.tensor([5, 6], dtype=torch.int32), 16, 1, num_slots=0)
    with pytest.raises(ValueError, match="plan must be one of"):
        get_mla_metadata(torch.tensor([5, 6], dtype=torch.int32), 16, 1, plan="greedy")
    with pytest.raises(TypeError, match="int32"):
        get_mla_metadata(torch.tensor([5, 6]), 16, 1)
    with pytest.raises(ValueError, match="1-D"):
        get_mla_metadata(torch.zeros(2, 2, dtype=torch.int32), 16, 1)


def test_empty_batch_launches_nothing(no_launch):
    q = torch.randn(0, 1, 16, 576, device=DEV).bfloat16()
    k_cache = torch.randn(2, 64, 1, 576, device=DEV).bfloat16()
    lens = torch.zeros(0, dtype=torch.int32, device=DEV)
    meta, ns = get_mla_metadata(lens, 16, 1)
    out, lse = flash_mla_with_kvcache(q, k_cache, torch.zeros(0, 4, dtype=torch.int32,
                                                              device=DEV), lens, 512, meta, ns)
    assert out.shape == (0, 1, 16, 512) and lse.shape == (0, 16, 1)


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
    meta, ns = get_mla_metadata(cache_seqlens, 16, 1)
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
