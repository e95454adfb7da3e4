"""Parallel reduction in Numba-CUDA: Mark Harris's ladder, one kernel per rung.

A reduction reads n numbers and writes one: 4 bytes per element moved, one addition
each. No GPU adds that slowly, so, as for the vector add, the only question is how close
a kernel gets to the memory bandwidth. The difficulty is that the threads must *combine*
their values, and combining is where the classic mistakes live. Harris's talk
("Optimizing Parallel Reduction in CUDA", NVIDIA, 2007) climbs from a slow kernel to a
fast one in steps; each rung below is its own kernel, with what changed and why:

1. ``interleaved_divergent``  tree in shared memory, ``if tid % (2*s) == 0``: the active
   threads are scattered over every warp, so every warp keeps running until the end.
2. ``interleaved_strided``    the same tree, indexed ``2*s*tid``: active threads are the
   first ones, whole warps retire early. Now strided shared-memory accesses cause bank
   conflicts (thread t touches word 2*s*t: with 256 threads 2-, 4-, 8-, 8-, 8-, 4-, 2-way
   for s = 1 ... 64, never 32-way: the README derives it).
3. ``sequential``             the tree folds the upper half onto the lower half
   (``sdata[tid] += sdata[tid + s]``): consecutive threads touch consecutive words, no
   bank conflicts. Half the threads idle from the first step.
4. ``first_add``              each thread adds two elements while loading: half the blocks,
   no thread idle in the first step.
5. ``unroll_last_warp``       once only 32 threads are left, ``syncthreads`` and the
   ``if tid < s`` test are waste: the last warp finishes alone, with ``syncwarp``
   between steps (Harris's 2007 code used ``volatile`` and implicit lock-step execution,
   which is wrong since Volta's independent thread scheduling).
6. ``warp_shuffle``           within a warp, registers are exchanged with
   ``shfl_down_sync``: no shared memory and no barrier for 5 of the 8 steps; one shared
   slot per warp, one ``syncthreads``.
7. ``grid_stride_atomic``     a fixed grid (enough blocks to fill the GPU once) loops over
   the array, each thread keeping four independent running sums (four loads in flight);
   one shuffle reduction per block and one ``atomic.add`` per block into the result:
   one launch, ~1000 blocks instead of 500,000.
8. ``grid_stride_two_pass``   the same, but each block writes its partial and a second
   launch of one block reduces them: deterministic (atomics add in any order).

Rungs 1-6 write one partial per block; the wrapper launches the same kernel again on the
partials until one value is left (Harris does the same).

Every kernel is built by a factory for an operation (``SUM``/``MAX``: a combine function
and its identity, 0 or -inf) and a block size (a compile-time constant, because shared
arrays need one). ``reduce(x, op, rung)`` is the wrapper; ``reduction_order.py`` holds
the NumPy spec of the order in which each rung combines, so the tests can demand
bitwise-equal results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common import runtime, warp_sim  # runtime first: it picks GPU or simulator

import torch
from numba import cuda, float32
from common.numba_torch import kernel_array, torch_stream

warp_sim.install()  # under emulation: shfl_down_sync & co. for the simulator (no-op on GPU)

FULL_MASK = 0xFFFFFFFF
WARP = 32


# --- the two operations -------------------------------------------------------------------
@cuda.jit(device=True)
def _add(a, b):
    return a + b


@cuda.jit(device=True)
def _max(a, b):
    return a if a >= b else b  # inputs with NaN: unspecified (this is a comparison)


@dataclass(frozen=True)
class Op:
    name: str
    combine: object       # device function (a, b) -> a (+) b
    identity: float       # e (+) x == x exactly: 0 for sum, -inf for max
    is_sum: bool          # picks atomic.add or atomic.max in the atomic rung


SUM = Op("sum", _add, 0.0, True)
MAX = Op("max", _max, -math.inf, False)
OPS = {"sum": SUM, "max": MAX}


# --- 1. interleaved addressing, divergent branch ------------------------------------------
def make_interleaved_divergent(op: Op, block: int):
    combine, identity = op.combine, float32(op.identity)

    @cuda.jit
    def interleaved_divergent(x, partial, n):
        sdata = cuda.shared.array(block, float32)
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * block + tid
        sdata[tid] = x[i] if i < n else identity   # pad the last block with the identity
        cuda.syncthreads()
        s = 1
        while s < block:
            # Threads 0, 2s, 4s, ... work; the others of *every* warp wait for them:
            # the branch diverges inside each warp, and no warp can retire early.
            if tid % (2 * s) == 0:
                sdata[tid] = combine(sdata[tid], sdata[tid + s])
            cuda.syncthreads()
            s *= 2
        if tid == 0:
            partial[cuda.blockIdx.x] = sdata[0]

    return interleaved_divergent


# --- 2. interleaved addressing, strided index ---------------------------------------------
def make_interleaved_strided(op: Op, block: int):
    combine, identity = op.combine, float32(op.identity)

    @cuda.jit
    def interleaved_strided(x, partial, n):
        sdata = cuda.shared.array(block, float32)
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * block + tid
        sdata[tid] = x[i] if i < n else identity
        cuda.syncthreads()
        s = 1
        while s < block:
            # Same pairs as rung 1, but thread t handles pair 2*s*t: the working threads
            # are the *first* block/(2s), so whole warps go idle (no divergence until
            # fewer than 32 remain). Thread t reads word 2*s*t, in bank 2*s*t mod 32: a
            # warp's lanes share 32/min(2s, 32) banks, so s=1 is a 2-way bank conflict,
            # s=2 4-way, s=4 8-way; from s=8 on fewer lanes work (B/(2s)) and the degree
            # stays 8 at s=8 and 16 (16 lanes on 2 banks, 8 lanes on 1), then 4, 2, 1.
            # 32-way would need 32 lanes at s=16: 1024-thread blocks.
            index = 2 * s * tid
            if index < block:
                sdata[index] = combine(sdata[index], sdata[index + s])
            cuda.syncthreads()
            s *= 2
        if tid == 0:
            partial[cuda.blockIdx.x] = sdata[0]

    return interleaved_strided


# --- 3. sequential addressing -------------------------------------------------------------
def make_sequential(op: Op, block: int):
    combine, identity = op.combine, float32(op.identity)

    @cuda.jit
    def sequential(x, partial, n):
        sdata = cuda.shared.array(block, float32)
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * block + tid
        sdata[tid] = x[i] if i < n else identity
        cuda.syncthreads()
        s = block // 2
        while s > 0:
            # Fold the upper half onto the lower: consecutive threads read consecutive
            # words (no bank conflicts), the first s threads work. But in the very first
            # step half of the block already idles: they only loaded one element.
            if tid < s:
                sdata[tid] = combine(sdata[tid], sdata[tid + s])
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            partial[cuda.blockIdx.x] = sdata[0]

    return sequential


# --- 4. first add during load -------------------------------------------------------------
def make_first_add(op: Op, block: int):
    combine, identity = op.combine, float32(op.identity)

    @cuda.jit
    def first_add(x, partial, n):
        sdata = cuda.shared.array(block, float32)
        tid = cuda.threadIdx.x
        # Each block now covers 2*block elements; each thread combines two of them
        # (block apart, so both loads stay coalesced) before the tree starts.
        i = cuda.blockIdx.x * (2 * block) + tid
        v = x[i] if i < n else identity
        if i + block < n:
            v = combine(v, x[i + block])
        sdata[tid] = v
        cuda.syncthreads()
        s = block // 2
        while s > 0:
            if tid < s:
                sdata[tid] = combine(sdata[tid], sdata[tid + s])
            cuda.syncthreads()
            s //= 2
        if tid == 0:
            partial[cuda.blockIdx.x] = sdata[0]

    return first_add


# --- 5. unroll the last warp --------------------------------------------------------------
def make_unroll_last_warp(op: Op, block: int):
    combine, identity = op.combine, float32(op.identity)

    @cuda.jit(device=True)
    def warp_step(sdata, tid, v, offset):
        # Publish my value, wait until the warp has, read my partner's, and wait until the
        # warp has read before anyone overwrites. Harris's 2007 version did this with a
        # `volatile` pointer and no barrier, trusting 32 lanes to run in lock-step; since
        # Volta (independent thread scheduling) that is a race: syncwarp is required.
        sdata[tid] = v
        cuda.syncwarp()
        v = combine(v, sdata[tid + offset])
        cuda.syncwarp()
        return v

    @cuda.jit
    def unroll_last_warp(x, partial, n):
        sdata = cuda.shared.array(block, float32)
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * (2 * block) + tid
        v = x[i] if i < n else identity
        if i + block < n:
            v = combine(v, x[i + block])
        sdata[tid] = v
        cuda.syncthreads()
        s = block // 2
        while s > 32:                  # block-wide steps: these still need syncthreads
            if tid < s:
                sdata[tid] = combine(sdata[tid], sdata[tid + s])
            cuda.syncthreads()
            s //= 2
        if tid < 32:                   # the last 6 steps: one warp, no syncthreads, unrolled
            v = combine(sdata[tid], sdata[tid + 32])
            v = warp_step(sdata, tid, v, 16)
            v = warp_step(sdata, tid, v, 8)
            v = warp_step(sdata, tid, v, 4)
            v = warp_step(sdata, tid, v, 2)
            v = warp_step(sdata, tid, v, 1)
            if tid == 0:
                partial[cuda.blockIdx.x] = v

    return unroll_last_warp


# --- 6. warp shuffles ---------------------------------------------------------------------
def make_warp_reduce(op: Op):
    """Reduce a value across the 32 lanes of a warp in registers: after the 5 steps lane 0
    holds the result (lane i adds lane i+16, then i+8, ...; lanes whose source is past
    lane 31 get their own value back and only compute garbage nobody reads)."""
    combine = op.combine

    @cuda.jit(device=True)
    def warp_reduce(v):
        v = combine(v, cuda.shfl_down_sync(FULL_MASK, v, 16))
        v = combine(v, cuda.shfl_down_sync(FULL_MASK, v, 8))
        v = combine(v, cuda.shfl_down_sync(FULL_MASK, v, 4))
        v = combine(v, cuda.shfl_down_sync(FULL_MASK, v, 2))
        v = combine(v, cuda.shfl_down_sync(FULL_MASK, v, 1))
        return v

    return warp_reduce


def make_block_reduce(op: Op, block: int):
    """Reduce one value per thread across the block: shuffle within each warp, one shared
    slot per warp, one syncthreads, then warp 0 shuffles the warps' results. Thread 0
    returns the block's result (the others return garbage)."""
    identity = float32(op.identity)
    warp_reduce = make_warp_reduce(op)
    nwarps = block // WARP

    @cuda.jit(device=True)
    def block_reduce(v):
        warp_sums = cuda.shared.array(nwarps, float32)
        tid = cuda.threadIdx.x
        lane = tid % WARP
        warp = tid // WARP
        v = warp_reduce(v)
        if lane == 0:
            warp_sums[warp] = v
        cuda.syncthreads()
        if warp == 0:
            v = warp_sums[lane] if lane < nwarps else identity
            v = warp_reduce(v)
        return v

    return block_reduce


def make_warp_shuffle(op: Op, block: int):
    combine, identity = op.combine, float32(op.identity)
    block_reduce = make_block_reduce(op, block)

    @cuda.jit
    def warp_shuffle(x, partial, n):
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * (2 * block) + tid
        v = x[i] if i < n else identity
        if i + block < n:
            v = combine(v, x[i + block])
        v = block_reduce(v)
        if tid == 0:
            partial[cuda.blockIdx.x] = v

    return warp_shuffle


# --- 7./8. many elements per thread: grid-stride loop, then one atomic or a second pass --
def make_grid_stride(op: Op, block: int, use_atomic: bool):
    combine, identity, is_sum = op.combine, float32(op.identity), op.is_sum
    block_reduce = make_block_reduce(op, block)

    @cuda.jit
    def grid_stride(x, out, n):
        tid = cuda.threadIdx.x
        i = cuda.blockIdx.x * block + tid
        stride = cuda.gridDim.x * block          # all threads of the grid
        # Four running values per thread: four independent loads in flight per loop
        # iteration (one accumulator would make each load wait for the previous add).
        # Each warp still reads 32 consecutive floats per load: coalesced.
        a0 = identity
        a1 = identity
        a2 = identity
        a3 = identity
        while i + 3 * stride < n:
            a0 = combine(a0, x[i])
            a1 = combine(a1, x[i + stride])
            a2 = combine(a2, x[i + 2 * stride])
            a3 = combine(a3, x[i + 3 * stride])
            i += 4 * stride
        while i < n:                             # the last 0-3 elements of this thread
            a0 = combine(a0, x[i])
            i += stride
        v = block_reduce(combine(combine(a0, a1), combine(a2, a3)))
        if tid == 0:
            if use_atomic:                       # one atomic per block: ~1000 in all
                if is_sum:
                    cuda.atomic.add(out, 0, v)
                else:
                    cuda.atomic.max(out, 0, v)
            else:                                # partial per block, second launch sums them
                out[cuda.blockIdx.x] = v

    return grid_stride


# --- the rungs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Rung:
    name: str
    title: str
    factory: object
    elems_per_block: int   # elements one block consumes per pass, in units of `block`
    grid_stride: bool = False
    atomic: bool = False


RUNGS = {r.name: r for r in (
    Rung("interleaved_divergent", "1 divergent", make_interleaved_divergent, 1),
    Rung("interleaved_strided", "2 strided index", make_interleaved_strided, 1),
    Rung("sequential", "3 sequential", make_sequential, 1),
    Rung("first_add", "4 first add", make_first_add, 2),
    Rung("unroll_last_warp", "5 last warp", make_unroll_last_warp, 2),
    Rung("warp_shuffle", "6 shuffle", make_warp_shuffle, 2),
    Rung("grid_stride_atomic", "7 grid-stride+atomic",
         lambda op, block: make_grid_stride(op, block, True), 0, True, True),
    Rung("grid_stride_two_pass", "8 grid-stride+2nd pass",
         lambda op, block: make_grid_stride(op, block, False), 0, True, False),
)}

BLOCK = runtime.pick(256, 64)       # threads per block (the simulator: 64 Python threads)
BLOCKS_PER_SM = runtime.pick(8, 1)  # grid-stride rungs: 8 x 256 = 2048 threads = a full SM

_kernels: dict = {}


def kernel_for(rung: str, op: str, block: int = BLOCK):
    """The compiled (lazily, at first launch) kernel of a rung for an op and block size."""
    key = (rung, op, block)
    if key not in _kernels:
        _kernels[key] = RUNGS[rung].factory(OPS[op], block)
    return _kernels[key]


def num_sms() -> int:
    if runtime.is_emulated():
        return 2
    return cuda.get_current_device().MULTIPROCESSOR_COUNT


def grid_stride_blocks(n: int, block: int = BLOCK, blocks_per_sm: int = BLOCKS_PER_SM) -> int:
    """Blocks of the grid-stride rungs: one full wave of the GPU, or fewer for small n."""
    return max(1, min(num_sms() * blocks_per_sm, math.ceil(n / block)))


def passes(rung: str, n: int, block: int = BLOCK, blocks_per_sm: int = BLOCKS_PER_SM):
    """[(grid, n_in)] of each launch the wrapper makes for n elements (n >= 1)."""
    r = RUNGS[rung]
    if r.grid_stride:
        g = grid_stride_blocks(n, block, blocks_per_sm)
        return [(g, n)] if r.atomic or g == 1 else [(g, n), (1, g)]
    out = []
    while True:
        g = math.ceil(n / (r.elems_per_block * block))
        out.append((g, n))
        if g == 1:
            return out
        n = g


# --- the wrapper --------------------------------------------------------------------------
def _view(t: torch.Tensor):
    """A zero-copy Numba view of a contiguous tensor (1-D)."""
    return kernel_array(t.reshape(-1))


def check_input(x, who: str = "reduce") -> None:
    """Reject what the kernels cannot read, with one sentence, before any launch."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor, got {type(x).__name__} "
                        "(torch.from_numpy(a) wraps a NumPy array)")
    if x.dtype != torch.float32:
        raise TypeError(f"{who}: x has dtype {str(x.dtype).replace('torch.', '')}; these "
                        "kernels reduce float32 only: pass x.float()")
    want = runtime.torch_device()
    if x.device.type != want:
        where = ("the kernels run on the GPU" if want == "cuda" else
                 "under emulation the kernels run on the CPU")
        raise ValueError(f"{who}: x is on {x.device}, but {where}: use x.to('{want}')")
    if x.layout != torch.strided or not x.is_contiguous():
        raise ValueError(f"{who}: x is not contiguous (strides {tuple(x.stride())}); the "
                         "kernels read element i at base + i: pass x.contiguous()")


def _check_config(op: str, rung: str, block: int, blocks_per_sm: int) -> None:
    if op not in OPS:
        raise ValueError(f"reduce: op must be one of {sorted(OPS)}, got {op!r}")
    if rung not in RUNGS:
        raise ValueError(f"reduce: rung must be one of {list(RUNGS)}, got {rung!r}")
    if not (isinstance(block, int) and 64 <= block <= 1024 and block & (block - 1) == 0):
        raise ValueError(f"reduce: block must be a power of two from 64 to 1024, got {block} "
                         "(tree steps halve it; the last-warp rung reads sdata[tid + 32])")
    if not (isinstance(blocks_per_sm, int) and blocks_per_sm >= 1):
        raise ValueError(f"reduce: blocks_per_sm must be a positive int, got {blocks_per_sm}")


class ReductionPlan:
    """Everything one reduction of ``x`` needs, prepared once: the kernel, each launch's
    grid, the partial buffers and the Numba views of them. ``plan()`` then only launches
    (what a benchmark should time: Numba's per-call argument handling is ~20 us of host
    time per launch, which would otherwise sit between the timing events). The result
    is ``plan.out``, a 0-d tensor, overwritten by every call."""

    def __init__(self, x: torch.Tensor, op: str = "sum", rung: str = "grid_stride_two_pass",
                 block: int = BLOCK, blocks_per_sm: int = BLOCKS_PER_SM):
        _check_config(op, rung, block, blocks_per_sm)
        check_input(x, f"reduce({op}, {rung})")
        self.n = x.numel()
        self.identity = OPS[op].identity
        self.atomic = RUNGS[rung].atomic
        self.out = torch.full((), self.identity, dtype=torch.float32, device=x.device)
        self.launches = []  # (grid, src view, dst view, n_in)
        if self.n == 0:
            return          # the identity, no launch
        self.kernel = kernel_for(rung, op, block)
        self.block = block
        grids = passes(rung, self.n, block, blocks_per_sm)
        self._keep = [x, self.out]  # the views below do not keep their tensors alive
        src = _view(x)
        for k, (grid, n_in) in enumerate(grids):
            last = k == len(grids) - 1 or self.atomic
            dst_t = self.out.reshape(1) if last else torch.empty(grid, dtype=torch.float32,
                                                                 device=x.device)
            self._keep.append(dst_t)
            dst = _view(dst_t)
            self.launches.append((grid, src, dst, n_in))
            src = dst
            if self.atomic:
                break

    def __call__(self) -> torch.Tensor:
        stream = torch_stream()
        if self.atomic and self.launches:
            self.out.fill_(self.identity)  # atomics add into it: start from the identity
        for grid, src, dst, n_in in self.launches:
            self.kernel[grid, self.block, stream](src, dst, n_in)
        return self.out


def reduce(x: torch.Tensor, op: str = "sum", rung: str = "grid_stride_two_pass",
           block: int = BLOCK, blocks_per_sm: int = BLOCKS_PER_SM) -> torch.Tensor:
    """Sum or max of all elements of a float32 tensor, as a 0-d float32 tensor on x's
    device (like ``torch.sum(x)``). Empty x gives the identity (0, or -inf for max)
    without a launch. Launches on torch's current stream; does not synchronize."""
    return ReductionPlan(x, op, rung, block, blocks_per_sm)()


def reduce_sum(x: torch.Tensor, rung: str = "grid_stride_two_pass", **kw) -> torch.Tensor:
    return reduce(x, "sum", rung, **kw)


def reduce_max(x: torch.Tensor, rung: str = "grid_stride_two_pass", **kw) -> torch.Tensor:
    return reduce(x, "max", rung, **kw)

