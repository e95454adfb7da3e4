"""Vector add in Triton: one program per block of BLOCK_SIZE elements, a mask for the tail.

In Numba you write what *one thread* does; in Triton you write what *one program* (a
block of threads) does to a whole tile, here ``BLOCK_SIZE`` consecutive elements, and the
compiler decides how the tile is spread over the program's threads.

Why ``BLOCK_SIZE = 1024`` (with the default ``num_warps = 4``, i.e. 128 threads):

* it must be a power of two (``tl.arange`` requires it);
* 1024 elements / 128 threads = 8 consecutive float32 per thread. Triton gives each
  thread contiguous elements, so it can use 16-byte vector loads (``ld.global.v4``):
  two per operand per thread for float32 (one for 16-bit types). Vector width needs
  contiguity *and* alignment: Triton specializes every pointer argument on "divisible by
  16" and ``n`` likewise, so for torch allocations (256-byte aligned) the loads are wide
  even with the mask;
* 8 elements per thread = 2 x 16 bytes of each operand in flight per thread - the same
  "more bytes in flight" that Numba's ``add_kernel_ilp`` gets by hand;
* much smaller blocks (256) leave fewer bytes in flight per SM; much larger ones
  (4096+) give few programs for small n and more registers per thread. The benchmark
  measures 256 / 1024 / 4096 at n = 2^28.

The mask ``offsets < n`` makes any n correct: lanes past the end neither load nor store.
Offsets are int32 unless n reaches 2^31 (``INDEX_64``): ``pid * BLOCK_SIZE`` would wrap.
"""

from __future__ import annotations

from common import runtime  # noqa: F401  (selects GPU or interpreter before triton loads)

import torch
import triton
import triton.language as tl

from vector_add_operands import check_operands

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_SIZE = 1024


@triton.jit
def add_kernel(a_ptr, b_ptr, out_ptr, n,
               BLOCK_SIZE: tl.constexpr,  # elements per program (power of two)
               INDEX_64: tl.constexpr):   # 64-bit offsets, for n >= 2**31
    pid = tl.program_id(axis=0)           # which block of the vector this program owns
    if INDEX_64:
        block_start = pid.to(tl.int64) * BLOCK_SIZE
    else:
        block_start = pid * BLOCK_SIZE
    offsets = block_start + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n                    # the last program may reach past the end
    a = tl.load(a_ptr + offsets, mask=mask)
    b = tl.load(b_ptr + offsets, mask=mask)
    # Add in float32 and round once on the store (what torch does for 16-bit types; the
    # interpreter also needs it: its bfloat16 arithmetic is broken, see docs/environment.md).
    tl.store(out_ptr + offsets, a.to(tl.float32) + b.to(tl.float32), mask=mask)


def add(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
        block_size: int = BLOCK_SIZE, num_warps: int = 4) -> torch.Tensor:
    """out = a + b for contiguous float32 / float16 / bfloat16 tensors of any shape."""
    out = check_operands(a, b, out, dtypes=DTYPES, who="vector_add_triton.add")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"add: block_size must be a power of two, got {block_size}")
    n = out.numel()
    if n == 0:
        return out  # nothing to do, and a grid of 0 programs is not a valid launch
    grid = (triton.cdiv(n, block_size),)
    add_kernel[grid](a, b, out, n, BLOCK_SIZE=block_size, INDEX_64=n + block_size >= 2**31,
                     num_warps=num_warps)
    return out
