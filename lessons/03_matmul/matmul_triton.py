"""Matrix multiply in Triton on tensor cores: fp16 / bf16 inputs, fp32 accumulation.

The Numba rungs of this lesson feed FP32 FMA pipes one multiply-add per thread per
instruction. Tensor cores multiply whole tiles: an H100 does ~15x more bf16 FLOPs per
clock on them than FP32 FLOPs on its FMA pipes. ``tl.dot(a, b, acc)`` on two tiles is
how Triton reaches them (on Hopper it becomes ``wgmma`` instructions).

What each kernel here does, and why:

* **One program per BLOCK_M x BLOCK_N tile of C**, looping over K in BLOCK_K slices and
  accumulating in fp32 (``acc``), rounding to the input dtype once at the end. Per slice
  it loads (BLOCK_M + BLOCK_N) * BLOCK_K elements and does 2 * BLOCK_M * BLOCK_N *
  BLOCK_K FLOPs: 85 FLOP per byte for 128 x 256 x 64 tiles. An H100 needs ~260 FLOP per
  byte of HBM traffic to keep its tensor cores busy (~780 TFLOPS / ~3 TB/s), so most of
  those loads must hit L2 (each A tile is read by every program of its tile-row):
* **Grouped program ordering** (``_grouped_tile``): consecutive programs (which run at
  the same time) take GROUP_M tile-rows of one group of columns instead of walking a
  whole row of C. They then share the same A rows and B columns, which stay in L2.
* **Autotuned tile shapes** (``CONFIGS``): BLOCK_M/N/K, ``num_warps`` and ``num_stages``
  (the depth of the software pipeline: how many K-slices are in flight while one is
  multiplied). The best shape depends on the problem size; the benchmark records the
  winner for each size. Under the interpreter autotuning needs a driver, so there is a
  single small configuration.

Two ways to load tiles:

* ``matmul_kernel``: pointer arithmetic with the strides passed in, so any strided view
  works (row-major, transposed, slices). Loads are masked along K; rows/columns past M/N
  are wrapped (``% M``) so the loads need no mask there, and the store is masked.
* ``matmul_kernel_tma``: **Hopper's Tensor Memory Accelerator** through tensor
  descriptors (``tl.make_tensor_descriptor``). One thread asks the copy engine for a
  whole 2-D tile; the engine does the address arithmetic, the bounds (zero fill outside,
  clipped stores) and writes shared memory in the layout ``wgmma`` wants, freeing
  registers and instructions for the math, and letting deeper pipelines (more stages)
  run. It needs 16-byte-aligned base pointers and row strides and unit column stride;
  ``matmul`` uses it when the operands allow and falls back to pointers otherwise.
* ``matmul_kernel_tma_persistent``: the TMA kernel launched as one program per SM that
  loops over tiles (``matmul(..., persistent=True)``); Triton pipelines across tile
  boundaries, hiding each tile's epilogue under the next tile's loads.
  The benchmark measures all three.

The interpreter's bf16 ``tl.dot`` gives garbage (docs/environment.md), so under emulation the
kernels take ``DOT_FP32=True``: the tiles are upcast and multiplied in fp32 there.
"""

from __future__ import annotations

from common import runtime  # noqa: F401  (selects GPU or interpreter before triton loads)

import torch
import triton
import triton.language as tl

from matmul_operands import check_matmul_operands, max_element_offset, output_for

DTYPES = (torch.float16, torch.bfloat16)
WHY_NOT = {torch.float32: "this kernel is the tensor-core rung for 16-bit inputs; "
                          "matmul_numba has the float32 kernels"}


def _config(bm, bn, bk, stages, warps, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_stages=stages, num_warps=warps)


if runtime.is_emulated():
    CONFIGS = CONFIGS_PTR = CONFIGS_PERSISTENT = [_config(32, 32, 16, 1, 4, group=2)]  # no driver to tune with
else:
    # Shapes known to suit Hopper's wgmma (warpgroups of 4 warps; 128-row tiles), plus a
    # smaller tile for problems too small to fill 132 SMs with 128 x 256 tiles. Shared
    # memory per stage: (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes (48 KiB for 128/256/64).
    CONFIGS = [
        _config(128, 256, 64, 3, 8),
        _config(128, 256, 64, 4, 8),
        _config(256, 128, 64, 3, 8),
        _config(128, 128, 64, 4, 8),
        _config(64, 128, 64, 4, 4),
    ]
    # The pointer kernel compiles slower (~2x) and is the fallback path: fewer shapes.
    CONFIGS_PTR = [CONFIGS[0], CONFIGS[3], CONFIGS[4]]
    # Persistent: the epilogue's 64 KiB staging buffer stays allocated next to the
    # pipeline, so 128 x 256 tiles fit 3 stages, not 4 (4 would need 256 KiB > 227 KiB).
    CONFIGS_PERSISTENT = [CONFIGS[0], CONFIGS[2], CONFIGS[3], CONFIGS[4]]


# The interpreter's bf16 tl.dot returns garbage (docs/environment.md): there the kernels
# multiply fp32 copies of the tiles. On a GPU: tensor cores, 16-bit operands.
DOT_FP32 = runtime.is_emulated()


def _tuner_bench(fn, quantiles):
    # Autotuning is short: 5 ms warm-up and 25 ms of repetitions per config.
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M tile-rows at a time (L2 reuse)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)  # the last group may be short
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr):
    if DOT_FP32:  # the interpreter's 16-bit dot is broken: multiply fp32 copies there
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)  # tensor cores, fp32 accumulation


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                  stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # Rows/columns past the edge wrap around (% M): always valid addresses, so no mask is
    # needed on those loads; the results for them are dropped by the masked store.
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K  # the last slice is masked along K (zeros add nothing)
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = _dot(a, b, acc, DOT_FP32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c = acc.to(c_ptr.dtype.element_ty)
    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + offs_cm[:, None] * stride_cm + offs_cn[None, :] * stride_cn
    tl.store(c_ptrs, c, mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


@triton.jit
def matmul_kernel_tma(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr):
    # Descriptors: the global shape and strides of each matrix and the tile to move.
    # Loads outside [0, M) x [0, K) come back as zeros; stores outside are clipped.
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                       block_shape=[BLOCK_M, BLOCK_N])
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        b = b_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
        acc = _dot(a, b, acc, DOT_FP32)
    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def matmul_kernel_tma_persistent(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                                 DOT_FP32: tl.constexpr, NUM_SMS: tl.constexpr):
    """Persistent: one program per SM, each walking tiles pid, pid + NUM_SMS, ...

    ``flatten=True`` lets Triton software-pipeline the two nested loops as one, so the
    TMA loads of the next tile start while this tile's epilogue (convert + store) runs,
    and the descriptors are built once per SM instead of once per tile."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                       block_shape=[BLOCK_M, BLOCK_N])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            b = b_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
            acc = _dot(a, b, acc, DOT_FP32)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_ptr.dtype.element_ty))


def _autotuned(kernel, configs):
    return triton.autotune(configs=configs, key=["M", "N", "K"], do_bench=_tuner_bench)(kernel)


matmul_kernel_tuned = _autotuned(matmul_kernel, CONFIGS_PTR)
matmul_kernel_tma_tuned = _autotuned(matmul_kernel_tma, CONFIGS)
matmul_kernel_tma_persistent_tuned = _autotuned(matmul_kernel_tma_persistent, CONFIGS_PERSISTENT)

_allocator_ready = False


def _ensure_allocator():
    """In-kernel tensor descriptors live in a small global scratch buffer that Triton
    asks the program's allocator for (set once, on the GPU)."""
    global _allocator_ready
    if not _allocator_ready and runtime.is_gpu():
        triton.set_allocator(lambda size, alignment, stream:
                             torch.empty(size, dtype=torch.int8, device="cuda"))
        _allocator_ready = True


def tma_compatible(*xs: torch.Tensor) -> bool:
    """TMA needs: unit stride along the last dimension, 16-byte aligned base address and
    16-byte multiple row stride (for 16-bit types: a multiple of 8 elements)."""
    return all(x.stride(1) == 1 and x.data_ptr() % 16 == 0 and (x.stride(0) * x.element_size()) % 16 == 0
               for x in xs)


def _meta(config):
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, *,
           use_tma: bool | None = None, persistent: bool = False,
           config: triton.Config | None = None) -> torch.Tensor:
    """C = A @ B for fp16 / bf16 matrices of any shape and strides; fp32 accumulation.

    ``use_tma``: None picks TMA when the operands allow it (and the GPU is Hopper or
    newer); True insists (ValueError if impossible); False uses pointer loads.
    ``persistent``: with TMA, the persistent kernel (one program per SM).
    ``config``: skip autotuning and use this tile configuration.
    """
    M, N, K = check_matmul_operands(a, b, dtypes=DTYPES, who="matmul_triton.matmul",
                                    why_not=WHY_NOT)
    c = output_for(a, b, out, M, N, "matmul_triton.matmul")
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    for name, x in (("a", a), ("b", b), ("c", c)):
        if max_element_offset(x) >= 2**31:
            raise ValueError(f"matmul: {name} spans more than 2^31 elements; this lesson's "
                             "kernels compute offsets in 32-bit integers")
    hopper = runtime.is_emulated() or torch.cuda.get_device_capability(a.device)[0] >= 9
    can_tma = hopper and tma_compatible(a, b, c)
    if (use_tma or persistent) and not can_tma:
        raise ValueError("matmul(use_tma=True / persistent=True): TMA needs a Hopper GPU, "
                         "unit column stride, 16-byte aligned data and row strides that are "
                         "multiples of 8 elements; pass use_tma=None to fall back to pointer loads")
    tma = can_tma if use_tma is None else use_tma
    if persistent and not tma:
        raise ValueError("matmul(persistent=True) is the TMA kernel: use_tma must not be False")
    extra = {"DOT_FP32": DOT_FP32}

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, _num_sms()),) if persistent else (tiles,)

    if tma:
        _ensure_allocator()
        args = (a, b, c, M, N, K, a.stride(0), b.stride(0), c.stride(0))
        if persistent:
            kernel, tuned = matmul_kernel_tma_persistent, matmul_kernel_tma_persistent_tuned
            extra["NUM_SMS"] = _num_sms()
        else:
            kernel, tuned = matmul_kernel_tma, matmul_kernel_tma_tuned
    else:
        args = (a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                c.stride(0), c.stride(1))
        kernel, tuned = matmul_kernel, matmul_kernel_tuned
    if config is None:
        tuned[grid](*args, **extra)
    else:
        meta = _meta(config)
        kernel[grid(meta)](*args, **extra, **meta)
    return c


def _num_sms() -> int:
    if runtime.is_emulated():
        return 3  # the interpreter: a few programs, each walking several tiles
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def best_config(use_tma: bool, persistent: bool = False) -> dict | None:
    """The configuration the autotuner picked last (for the benchmark's records)."""
    tuned = (matmul_kernel_tma_persistent_tuned if persistent else
             matmul_kernel_tma_tuned if use_tma else matmul_kernel_tuned)
    cfg = getattr(tuned, "best_config", None)
    return None if cfg is None else _meta(cfg)
