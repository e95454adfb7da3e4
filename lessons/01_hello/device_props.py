"""Lesson 01, part 2: what the GPU is made of, read through cuda-python's ``cuda.core``.

A handful of device properties decide how every later kernel is shaped: how many blocks a
grid needs to fill the machine, how big a tile can be, how many registers a thread may
use before fewer warps fit. :func:`read_properties` asks the driver for them;
:func:`explain` pairs each with what it means for the lessons that follow.

``cuda.core.Device()`` talks to the CUDA driver (``libcuda``), so it needs one, even when
the course runs under emulation. Numba's simulator has no such properties; it fakes a
device of its own, which :func:`simulator_facts` describes.
"""

from __future__ import annotations

from dataclasses import dataclass

from common import runtime

# FP32 FMA units ("CUDA cores") per SM by compute capability. Not a device query: this
# comes from NVIDIA's architecture whitepapers (Volta/Turing/A100: 64; GA10x, Ada,
# Hopper, Blackwell: 128). Used only to turn clocks into a peak FP32 rate.
FP32_LANES_PER_SM = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128,
                     (8, 9): 128, (9, 0): 128, (10, 0): 128, (12, 0): 128}


@dataclass(frozen=True)
class Fact:
    name: str
    value: str
    meaning: str


def read_properties(device_id: int = 0) -> dict:
    """The properties this course uses, straight from the driver via ``cuda.core``.

    Raises RuntimeError with one sentence when there is no CUDA driver or device.
    """
    probe = runtime.probe_gpu()
    if not probe.available:
        raise RuntimeError(f"cuda.core.Device() needs the CUDA driver and a GPU: {probe.reason}")
    from cuda.core import Device

    dev = Device(device_id)
    dev.set_current()   # initializes CUDA on this thread (the primary context)
    p = dev.properties  # DeviceProperties: each attribute is one cuDeviceGetAttribute call
    cc = dev.compute_capability
    return {
        "name": dev.name,
        "compute_capability": (cc.major, cc.minor),
        "arch": f"sm_{dev.arch}",
        "sm_count": p.multiprocessor_count,
        "warp_size": p.warp_size,
        "max_threads_per_block": p.max_threads_per_block,
        "max_threads_per_sm": p.max_threads_per_multiprocessor,
        "max_blocks_per_sm": p.max_blocks_per_multiprocessor,
        "regs_per_block": p.max_registers_per_block,
        "regs_per_sm": p.max_registers_per_multiprocessor,
        "smem_per_block": p.max_shared_memory_per_block,
        "smem_per_block_optin": p.max_shared_memory_per_block_optin,
        "smem_per_sm": p.max_shared_memory_per_multiprocessor,
        "l2_bytes": p.l2_cache_size,
        "sm_clock_khz": p.clock_rate,
        "mem_clock_khz": p.memory_clock_rate,
        "mem_bus_bits": p.global_memory_bus_width,
    }


def peak_dram_gbps(props: dict) -> float:
    """Theoretical DRAM bandwidth: memory clock x 2 (double data rate) x bus width in bytes."""
    return props["mem_clock_khz"] * 1e3 * 2 * props["mem_bus_bits"] / 8 / 1e9


def peak_fp32_tflops(props: dict) -> float | None:
    """SMs x FP32 lanes x 2 (an FMA is two FLOPs) x SM clock; None for unknown archs."""
    lanes = FP32_LANES_PER_SM.get(tuple(props["compute_capability"]))
    if lanes is None:
        return None
    return props["sm_count"] * lanes * 2 * props["sm_clock_khz"] * 1e3 / 1e12


def _kib(n: int) -> str:
    return f"{n / 1024:g} KiB"


def explain(props: dict) -> list[Fact]:
    """Each property with what it means for the later lessons."""
    p = props
    warps_per_sm = p["max_threads_per_sm"] // p["warp_size"]
    dram = peak_dram_gbps(p)
    fp32 = peak_fp32_tflops(p)
    cc = "{}.{}".format(*p["compute_capability"])
    return [
        Fact("name", p["name"], "what the result files record, beside every number"),
        Fact("compute capability", f"{cc} ({p['arch']})",
             "which instructions exist: the arch NVRTC compiles for (a cubin runs on this "
             "arch only); 9.0 = Hopper: TMA copies and wgmma, used through Triton in 07-09"),
        Fact("SMs", str(p["sm_count"]),
             f"independent processors; a grid of fewer than {p['sm_count']} blocks leaves "
             "SMs idle: why FlashAttention-2 also splits over query blocks (08) and "
             "FlashMLA splits the KV cache (09)"),
        Fact("warp size", str(p["warp_size"]),
             "threads that issue each instruction together: block sizes are multiples of "
             "it; warp shuffles (04) exchange registers inside one"),
        Fact("threads per block (max)", str(p["max_threads_per_block"]),
             "the largest block; hello_kernels.py refuses more, as the GPU would"),
        Fact("threads per SM (max)", f"{p['max_threads_per_sm']} = {warps_per_sm} warps",
             "resident warps hide memory latency: occupancy = resident warps / this"),
        Fact("blocks per SM (max)", str(p["max_blocks_per_sm"]),
             "tiny blocks cannot fill an SM: 32-thread blocks give at most "
             f"{p['max_blocks_per_sm'] * 32} of {p['max_threads_per_sm']} threads"),
        Fact("registers per SM", f"{p['regs_per_sm']:,} x 32-bit",
             f"shared by resident threads: {p['regs_per_sm'] // p['max_threads_per_sm']} "
             "per thread keeps the SM full; more registers per thread, fewer warps (03, 08)"),
        Fact("shared memory per block", f"{_kib(p['smem_per_block'])} "
             f"({_kib(p['smem_per_block_optin'])} opt-in)",
             "on-chip scratchpad a block shares: the tiles of matmul (03) and "
             "attention (06-08) live here; opt-in = the limit for dynamic allocations"),
        Fact("shared memory per SM", _kib(p["smem_per_sm"]),
             "split between the blocks resident on an SM: blocks using 64 KiB each fit "
             f"{p['smem_per_sm'] // 65536} per SM; bigger tiles, fewer blocks"),
        Fact("L2 cache", f"{p['l2_bytes'] / 2**20:g} MiB",
             "data reused across blocks is served from here: why common/timing.py "
             "flushes it between runs; K/V tiles shared by many query blocks hit it"),
        Fact("SM clock (max)", f"{p['sm_clock_khz'] / 1e6:.2f} GHz",
             f"peak FP32 FMA rate = SMs x lanes x 2 x clock = "
             + (f"{fp32:.1f} TFLOPS" if fp32 else "unknown lanes for this arch")
             + " (tensor cores are ~15x more for bf16: lesson 03)"),
        Fact("memory clock, bus", f"{p['mem_clock_khz'] / 1e6:.2f} GHz, {p['mem_bus_bits']} bit",
             f"peak DRAM bandwidth = clock x 2 x bus/8 = {dram:,.0f} GB/s: the ceiling of "
             "every memory-bound kernel (02, 04, 09); we measure what is reachable"),
    ]


def simulator_facts() -> list[Fact]:
    """What Numba's CUDA simulator pretends to be (no driver involved)."""
    from numba import cuda

    if not runtime.is_emulated():
        raise RuntimeError("simulator_facts() describes the simulator: run with --cpu")
    dev = cuda.get_current_device()  # numba.cuda.simulator's FakeCUDADevice
    cc = "{}.{}".format(*dev.compute_capability)
    return [
        Fact("device", f"{type(dev).__name__} (id 0)",
             "one fake GPU; cuda.detect() lists it as SIMULATOR"),
        Fact("compute capability", cc,
             "a fixed number, not a feature set: nothing is emulated or withheld by it"),
        Fact("warp size", "32 (cuda.warpsize)",
             "laneid = thread id % 32 as on hardware, but threads are independent OS "
             "threads: no lockstep, and no warp intrinsics (shfl_*, ballot, syncwarp)"),
        Fact("SMs", "not modelled", "blocks run one after another; threads of a block run "
             "as Python threads; print order is block by block"),
        Fact("limits", "not enforced",
             "no 1024-thread block limit, no shared-memory size limit: the wrappers here "
             "check what the GPU would refuse"),
        Fact("memory", "NumPy arrays", "device arrays are host arrays; no caches, no "
             "coalescing, no bandwidth: timings mean nothing"),
    ]
