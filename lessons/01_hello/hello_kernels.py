"""Lesson 01, part 1: who am I? Threads, blocks, grids, and the index that maps a thread to data.

A kernel is one function that thousands of threads run at once. The only thing that
tells two threads apart is where they sit in the launch:

* ``cuda.threadIdx.x``: my position inside my block (0 .. blockDim.x - 1);
* ``cuda.blockIdx.x``:  my block's position inside the grid (0 .. gridDim.x - 1);
* ``cuda.blockDim.x``:  threads per block (the launch's second number);
* ``cuda.gridDim.x``:   blocks in the grid (the launch's first number).

``kernel[num_blocks, block_size](args)`` launches ``num_blocks * block_size`` threads.
From those four numbers every thread computes *which element is mine*, the question every
later lesson starts with. This file holds four small kernels that make the answer visible:

* :func:`hello_kernel`: each thread prints who it is;
* :func:`global_index_kernel`: each thread writes its global index into an array (the
  pattern of every element-wise kernel: lesson 02's vector add is this plus two loads);
* :func:`whoami_kernel`: each element records the block, thread, warp and lane that wrote
  it, so the mapping can be printed as a table and checked against a NumPy spec;
* :func:`grid_stride_kernel`: a fixed-size grid walks an array of any length.

Each kernel has a thin wrapper that validates its input *before* any launch (the
simulator accepts launches the GPU would refuse, e.g. 2048 threads per block, so the
wrapper enforces the hardware's rules on both), allocates the output, and returns NumPy
arrays. Each has a NumPy spec (``*_spec``) that says what the right answer is.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import warnings
from contextlib import contextmanager

import numpy as np

from common import runtime  # noqa: F401  (before numba: selects the GPU or the simulator)
from numba import cuda
from numba.core.errors import NumbaPerformanceWarning

# Every NVIDIA GPU since compute capability 2.0 allows at most 1024 threads per block
# (device_props.py reads it from the device: max_threads_per_block).
MAX_THREADS_PER_BLOCK = 1024
# Integer outputs cannot hold NaN; -1 is an index no thread ever writes, so an element
# the kernel forgot is still -1 afterwards and the comparison with the spec fails.
POISON = -1
# Printing is for a handful of threads: a few thousand lines would flood the terminal and
# overflow the GPU's printf buffer (1 MiB by default), which silently drops lines.
MAX_HELLO_THREADS = 256


# ----------------------------------------------------------------------------------------
# Kernels. Numba compiles each @cuda.jit function to PTX the first time it is launched
# (on the GPU), or runs it as Python with one OS thread per CUDA thread (simulator).

@cuda.jit
def hello_kernel():
    """Every thread prints its block, thread, global index, warp and lane."""
    t = cuda.threadIdx.x
    b = cuda.blockIdx.x
    i = b * cuda.blockDim.x + t
    # On a GPU this becomes one printf per thread; the lines are buffered on the device
    # and reach the terminal when the host synchronizes (see say_hello).
    print("hello from block", b, "thread", t, "| global index", i,
          "| warp", t // cuda.warpsize, "lane", cuda.laneid)


@cuda.jit
def global_index_kernel(out):
    """out[i] = i, one thread per element."""
    # The global index: skip the blocks before mine, then count within my block. Numba
    # widens int32 arithmetic to 64 bits, so this cannot overflow for n >= 2**31 (in
    # CUDA C++ it can: see the cast in nvrtc_saxpy.SAXPY_SOURCE). cuda.grid(1) is the
    # same expression.
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    # The grid is rounded up to whole blocks, so when n is not a multiple of the block
    # size the last block has threads with no element: they must not write.
    if i < out.shape[0]:
        out[i] = i


@cuda.jit
def whoami_kernel(block, thread, warp, lane):
    """For each element i: which block, thread, warp and lane handled it."""
    i = cuda.grid(1)
    if i < block.shape[0]:
        block[i] = cuda.blockIdx.x
        thread[i] = cuda.threadIdx.x
        # The hardware runs a block as warps of 32 consecutive threads that issue the
        # same instruction together; lane = my position inside my warp.
        warp[i] = cuda.threadIdx.x // cuda.warpsize
        lane[i] = cuda.laneid


@cuda.jit
def grid_stride_kernel(index, writer):
    """A grid of any size covers an array of any length: thread g handles g, g + G, ..."""
    start = cuda.grid(1)       # my global index g
    stride = cuda.gridsize(1)  # G = gridDim.x * blockDim.x, the threads in the grid
    for i in range(start, index.shape[0], stride):
        index[i] = i
        writer[i] = start      # which thread wrote element i


# ----------------------------------------------------------------------------------------
# Launch geometry and input checks, shared by the wrappers.

def num_blocks_for(n: int, block_size: int) -> int:
    """Blocks needed so that every one of ``n`` elements gets a thread: ceil(n / block)."""
    return (n + block_size - 1) // block_size


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_block_size(block_size) -> int:
    block_size = _check_count("block_size", block_size, 1)
    if block_size > MAX_THREADS_PER_BLOCK:
        raise ValueError(f"block_size={block_size} exceeds the hardware limit of "
                         f"{MAX_THREADS_PER_BLOCK} threads per block")
    return block_size


@contextmanager
def _small_grids_are_the_point():
    """Numba warns about grids of fewer than 128 blocks ("will likely result in GPU
    under-utilization"): true, since an H100 has 132 SMs, each able to hold several
    blocks (device_props.py). Here tiny grids are what we want to look at, so that
    warning is silenced around this lesson's launches, and nowhere else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumbaPerformanceWarning)
        yield


# ----------------------------------------------------------------------------------------
# Wrappers: validate, allocate, launch, return NumPy arrays.

def say_hello(num_blocks: int = 2, block_size: int = 4) -> None:
    """Launch :func:`hello_kernel` and make sure its lines are printed before returning."""
    num_blocks = _check_count("num_blocks", num_blocks, 1)
    block_size = _check_block_size(block_size)
    if num_blocks * block_size > MAX_HELLO_THREADS:
        raise ValueError(f"{num_blocks * block_size} threads would each print a line; "
                         f"keep it to {MAX_HELLO_THREADS} or fewer")
    sys.stdout.flush()  # what Python printed before must come first
    if runtime.is_emulated():
        with _whole_lines():
            hello_kernel[num_blocks, block_size]()
    else:
        with _small_grids_are_the_point():
            hello_kernel[num_blocks, block_size]()
        cuda.synchronize()   # the launch is asynchronous; device printf flushes here ...
        _flush_c_stdout()    # ... into C's stdout buffer, which we flush to the terminal


def global_index(n: int, block_size: int = 256) -> np.ndarray:
    """``np.arange(n)`` computed by ``n`` GPU threads (int64)."""
    n = _check_count("n", n, 0)
    block_size = _check_block_size(block_size)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    out = cuda.to_device(np.full(n, POISON, dtype=np.int64))
    with _small_grids_are_the_point():
        global_index_kernel[num_blocks_for(n, block_size), block_size](out)
    return out.copy_to_host()


def whoami(n: int, block_size: int) -> dict[str, np.ndarray]:
    """Per element: the ``block``, ``thread``, ``warp`` and ``lane`` that wrote it."""
    n = _check_count("n", n, 0)
    block_size = _check_block_size(block_size)
    fields = ("block", "thread", "warp", "lane")
    if n == 0:
        return {f: np.empty(0, dtype=np.int64) for f in fields}
    outs = [cuda.to_device(np.full(n, POISON, dtype=np.int64)) for _ in fields]
    with _small_grids_are_the_point():
        whoami_kernel[num_blocks_for(n, block_size), block_size](*outs)
    return {f: o.copy_to_host() for f, o in zip(fields, outs)}


def grid_stride_index(n: int, block_size: int, num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index, writer)``: ``index[i] == i``, ``writer[i]`` = global id of the thread that
    wrote element i, with a grid of exactly ``num_blocks * block_size`` threads."""
    n = _check_count("n", n, 0)
    block_size = _check_block_size(block_size)
    num_blocks = _check_count("num_blocks", num_blocks, 1)
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    index = cuda.to_device(np.full(n, POISON, dtype=np.int64))
    writer = cuda.to_device(np.full(n, POISON, dtype=np.int64))
    with _small_grids_are_the_point():
        grid_stride_kernel[num_blocks, block_size](index, writer)
    return index.copy_to_host(), writer.copy_to_host()


# ----------------------------------------------------------------------------------------
# NumPy specs: what the kernels must produce, written the obvious sequential way.

def whoami_spec(n: int, block_size: int, warp_size: int = 32) -> dict[str, np.ndarray]:
    i = np.arange(n, dtype=np.int64)
    thread = i % block_size
    return {"block": i // block_size, "thread": thread,
            "warp": thread // warp_size, "lane": thread % warp_size}


def grid_stride_spec(n: int, block_size: int, num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(n, dtype=np.int64)
    return i, i % (block_size * num_blocks)


# ----------------------------------------------------------------------------------------
# Printing from kernels, made readable on both sides.

def _flush_c_stdout() -> None:
    """Flush C's stdio buffers: device printf output lands there, not in sys.stdout,
    and is held back when stdout is a pipe or a file until the process exits."""
    ctypes.CDLL(None).fflush(None)


@contextmanager
def _whole_lines():
    """Under the simulator each CUDA thread is a Python thread and ``print(a, b, c)``
    writes piece by piece, so lines of different threads interleave mid-line. A GPU's
    printf emits whole lines; this makes the simulator do the same by holding each
    thread's text until its newline."""
    real = sys.stdout
    lock = threading.Lock()
    local = threading.local()

    class _LineWriter:
        def write(self, text: str) -> int:
            buf = getattr(local, "buf", "") + text
            *lines, local.buf = buf.split("\n")
            if lines:
                with lock:
                    real.write("".join(line + "\n" for line in lines))
            return len(text)

        def flush(self) -> None:
            real.flush()

    sys.stdout = _LineWriter()
    try:
        yield
    finally:
        sys.stdout = real
        real.flush()
