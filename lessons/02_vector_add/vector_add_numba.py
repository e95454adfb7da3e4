"""Vector add in Numba-CUDA: three kernels, each a step closer to the copy bandwidth.

``out[i] = a[i] + b[i]`` does one addition per 12 bytes moved (float32: read 4 + 4, write
4). No GPU can add that slowly, so the only question is how close a kernel gets to the
rate at which the memory system moves bytes - the *copy bandwidth* we measure with a
device-to-device copy (``common.ceilings``). Three ways to write it:

1. ``add_kernel_one_per_thread``: one thread per element, ``i = cuda.grid(1)``, a bounds
   check for the last block. The textbook kernel; n=2^28 needs a million blocks.
2. ``add_kernel_grid_stride``: a fixed grid (enough blocks to fill every SM once) and a
   loop ``for i in range(start, n, stride)``: the same kernel works for any n, blocks are
   not created and retired a million times, and a thread does several elements.
3. ``add_kernel_ilp``: each thread loads ``ELEMS_PER_THREAD`` elements of ``a`` and of
   ``b`` *before* it adds any of them. The loads are independent, so they are all in
   flight at once: more bytes requested per thread = more bytes in flight per SM, which
   is what the memory system needs to run at full speed (Little's law: bandwidth x
   latency = bytes in flight). Accesses stay coalesced: element ``e`` of thread ``t`` is
   ``block_start + e * BLOCK + t``, so a warp touches 32 neighbours each time.

Numba has no bfloat16 arrays (numba-cuda's ``bf16`` type is scalar-only, torch does not
export bfloat16 through ``__cuda_array_interface__``, and the simulator has none): the
wrappers reject it with a clear error; use the Triton kernel for bfloat16.

Each ``add_*`` wrapper checks its operands, returns an empty result for empty input
without a launch, and launches on torch's current stream (so Numba and torch work stay
ordered, and the launches can be captured in a CUDA graph).
"""

from __future__ import annotations

import math

from common import runtime  # noqa: F401  (selects GPU or simulator before numba loads)

import torch
from numba import cuda, float32
from common.numba_torch import kernel_array, torch_stream

from vector_add_operands import check_operands

DTYPES = (torch.float32, torch.float16)
WHY_NOT = {torch.bfloat16: "Numba has no bfloat16 arrays; use vector_add_triton.add"}

THREADS_PER_BLOCK = runtime.pick(256, 32)  # 8 warps; under the simulator 32 Python threads
ELEMS_PER_THREAD = 8  # add_kernel_ilp: 8 loads of a and 8 of b in flight per thread


# --- 1. one element per thread ----------------------------------------------------------
@cuda.jit
def add_kernel_one_per_thread(a, b, out):
    i = cuda.grid(1)          # blockIdx.x * blockDim.x + threadIdx.x
    if i < out.size:          # the last block may be partly outside the array
        out[i] = float32(a[i]) + float32(b[i])


# --- 2. grid-stride loop -----------------------------------------------------------------
@cuda.jit
def add_kernel_grid_stride(a, b, out):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)  # blockDim.x * gridDim.x: all threads of the grid
    for i in range(start, out.size, stride):
        out[i] = float32(a[i]) + float32(b[i])


# --- 3. several independent elements per thread ------------------------------------------
def make_ilp_kernel(elems_per_thread: int):
    """The kernel with ``elems_per_thread`` baked in as a compile-time constant (local
    arrays need a constant size, and constant trip counts let LLVM unroll the loops so
    ``ra``/``rb`` live in registers). The benchmark sweeps it: 1, 2, 4, 8, 16."""

    @cuda.jit
    def add_kernel_ilp(a, b, out):
        n = out.size
        block = cuda.blockDim.x
        base = cuda.blockIdx.x * (block * elems_per_thread) + cuda.threadIdx.x
        ra = cuda.local.array(elems_per_thread, float32)  # registers, not memory: every loop
        rb = cuda.local.array(elems_per_thread, float32)  # below unrolls (constant trip count)
        if base + (elems_per_thread - 1) * block < n:
            # Full tile (every block but the last): no per-element test, and all loads are
            # issued back to back before the first add needs one of them.
            for e in range(elems_per_thread):
                ra[e] = a[base + e * block]
                rb[e] = b[base + e * block]
            for e in range(elems_per_thread):
                out[base + e * block] = ra[e] + rb[e]
        else:
            for e in range(elems_per_thread):
                i = base + e * block
                if i < n:
                    out[i] = float32(a[i]) + float32(b[i])

    return add_kernel_ilp


add_kernel_ilp = make_ilp_kernel(ELEMS_PER_THREAD)


# --- wrappers -----------------------------------------------------------------------------
def _view(t: torch.Tensor):
    """A zero-copy Numba view of a contiguous tensor, flattened to 1-D."""
    return kernel_array(t.reshape(-1))


def _num_sms() -> int:
    if runtime.is_emulated():
        return 2
    return cuda.get_current_device().MULTIPROCESSOR_COUNT


def _launch(kernel, a, b, out, blocks):
    kernel[blocks, THREADS_PER_BLOCK, torch_stream()](_view(a), _view(b), _view(out))


def add_one_per_thread(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None):
    """out = a + b with one thread per element (float32, float16)."""
    out = check_operands(a, b, out, dtypes=DTYPES, who="add_one_per_thread", why_not=WHY_NOT)
    n = out.numel()
    if n:
        _launch(add_kernel_one_per_thread, a, b, out, math.ceil(n / THREADS_PER_BLOCK))
    return out


def add_grid_stride(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
                    blocks_per_sm: int = 8):
    """out = a + b with a grid of ``blocks_per_sm`` blocks per SM looping over the array.

    8 blocks of 256 threads = 2048 threads, the most an H100 SM holds at once: one full
    "wave", and no more blocks than the array needs.
    """
    out = check_operands(a, b, out, dtypes=DTYPES, who="add_grid_stride", why_not=WHY_NOT)
    n = out.numel()
    if n:
        blocks = min(_num_sms() * blocks_per_sm, math.ceil(n / THREADS_PER_BLOCK))
        _launch(add_kernel_grid_stride, a, b, out, blocks)
    return out


_ilp_kernels = {ELEMS_PER_THREAD: add_kernel_ilp}


def add_ilp(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
            elems_per_thread: int = ELEMS_PER_THREAD):
    """out = a + b, ``elems_per_thread`` independent elements per thread."""
    out = check_operands(a, b, out, dtypes=DTYPES, who="add_ilp", why_not=WHY_NOT)
    if elems_per_thread not in _ilp_kernels:
        if not 1 <= elems_per_thread <= 64:
            raise ValueError(f"add_ilp: elems_per_thread must be in 1..64, got {elems_per_thread}")
        _ilp_kernels[elems_per_thread] = make_ilp_kernel(elems_per_thread)
    n = out.numel()
    if n:
        blocks = math.ceil(n / (THREADS_PER_BLOCK * elems_per_thread))
        _launch(_ilp_kernels[elems_per_thread], a, b, out, blocks)
    return out


VARIANTS = {
    "numba 1/thread": add_one_per_thread,
    "numba grid-stride": add_grid_stride,
    f"numba {ELEMS_PER_THREAD}/thread": add_ilp,
}
