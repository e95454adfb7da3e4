"""Lesson 01: index kernels against their NumPy specs, NVRTC compilation, device properties.

Under emulation every CUDA thread is a Python thread, so sizes stay small (a few thousand
threads per test); the GPU-marked tests repeat the checks at real sizes.
"""

import re

import numpy as np
import pytest
from numba import cuda  # (the root conftest selected the runtime before this import)

import device_props
import hello_kernels as hk
import nvrtc_saxpy
from common import runtime
from common.checks import assert_close

# A size that is no multiple of anything, drawn once per run (seeded: reproducible).
RANDOM_N = int(np.random.default_rng(101).integers(18, 1000))


def assert_equal(actual, expected, name):
    assert_close(actual, expected, atol=0, rtol=0, name=name)  # indices are exact


# ----------------------------------------------------------------------------------------
# Index kernels

@pytest.mark.parametrize("block", [32, 96, 256])
@pytest.mark.parametrize("n", [1, 17, 1000, RANDOM_N])
def test_global_index_is_arange(n, block):
    assert_equal(hk.global_index(n, block_size=block), np.arange(n), f"n={n} block={block}")


@pytest.mark.parametrize("n,block", [(17, 1), (1000, 1024)])
def test_global_index_at_the_block_size_limits(n, block):
    assert_equal(hk.global_index(n, block_size=block), np.arange(n), f"n={n} block={block}")


@pytest.mark.parametrize("n,block", [(1, 32), (17, 48), (100, 48), (RANDOM_N, 96)])
def test_whoami_matches_spec(n, block):
    got = hk.whoami(n, block_size=block)
    spec = hk.whoami_spec(n, block_size=block)
    for field in ("block", "thread", "warp", "lane"):
        assert_equal(got[field], spec[field], f"{field} (n={n}, block={block})")


def test_block_of_48_is_one_full_warp_and_half_of_another():
    who = hk.whoami(48, block_size=48)
    assert list(np.bincount(who["warp"])) == [32, 16]
    assert who["lane"][31] == 31 and who["lane"][32] == 0


@pytest.mark.parametrize("n,block,blocks", [(1, 32, 2), (17, 32, 1), (1000, 32, 2),
                                            (RANDOM_N, 48, 3)])
def test_grid_stride_covers_everything_once(n, block, blocks):
    index, writer = hk.grid_stride_index(n, block_size=block, num_blocks=blocks)
    want_index, want_writer = hk.grid_stride_spec(n, block, blocks)
    assert_equal(index, want_index, "index")
    assert_equal(writer, want_writer, "writer")


@cuda.jit
def off_by_one_kernel(out):
    i = cuda.grid(1)
    if i < out.shape[0] - 1:  # the bug: the last element is never written
        out[i] = i


@pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")
def test_a_kernel_that_skips_an_element_is_caught():
    """The poison (-1) is what makes an unwritten element fail the comparison."""
    out = cuda.to_device(np.full(17, hk.POISON, dtype=np.int64))
    off_by_one_kernel[1, 32](out)
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_equal(out.copy_to_host(), np.arange(17), "off_by_one")


def test_hello_prints_each_thread_once(capfd):
    hk.say_hello(num_blocks=3, block_size=5)
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("hello from")]
    pat = re.compile(r"hello from block (\d+) thread (\d+) \| global index (\d+) "
                     r"\| warp (\d+) lane (\d+)$")
    seen = []
    for line in lines:
        m = pat.match(line)
        assert m, f"garbled line: {line!r}"
        b, t, i, warp, lane = map(int, m.groups())
        assert (i, warp, lane) == (b * 5 + t, 0, t), line
        seen.append((b, t))
    assert sorted(seen) == [(b, t) for b in range(3) for t in range(5)]


@pytest.mark.parametrize("call,error,match", [
    (lambda: hk.global_index(-1), ValueError, "n must be >= 0"),
    (lambda: hk.global_index(2.5), TypeError, "n must be an int"),
    (lambda: hk.global_index(True), TypeError, "n must be an int"),
    (lambda: hk.global_index(10, block_size=0), ValueError, "block_size must be >= 1"),
    (lambda: hk.global_index(10, block_size=2048), ValueError, "1024 threads per block"),
    (lambda: hk.whoami(10, block_size=1025), ValueError, "1024 threads per block"),
    (lambda: hk.grid_stride_index(10, 32, num_blocks=0), ValueError, "num_blocks must be >= 1"),
    (lambda: hk.say_hello(100, 100), ValueError, "would each print a line"),
])
def test_bad_input_is_rejected_before_launch(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_empty_input_launches_nothing(monkeypatch):
    class NoLaunch:
        def __getitem__(self, config):
            raise AssertionError("a kernel was launched for an empty input")

    for name in ("global_index_kernel", "whoami_kernel", "grid_stride_kernel"):
        monkeypatch.setattr(hk, name, NoLaunch())
    assert hk.global_index(0).shape == (0,)
    assert all(v.shape == (0,) for v in hk.whoami(0, 32).values())
    assert all(v.shape == (0,) for v in hk.grid_stride_index(0, 32, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("block", [128, 1024])
def test_global_index_real_size(block):
    n = 20_000_017
    assert_equal(hk.global_index(n, block_size=block), np.arange(n), f"block={block}")
    index, writer = hk.grid_stride_index(n, block_size=block, num_blocks=264)
    want_index, want_writer = hk.grid_stride_spec(n, block, 264)
    assert_equal(index, want_index, "grid-stride index")
    assert_equal(writer, want_writer, "grid-stride writer")


# ----------------------------------------------------------------------------------------
# NVRTC: compiling needs no GPU

@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_saxpy_compiles_to_a_cubin(arch):
    code = nvrtc_saxpy.saxpy_module(arch).code
    assert code[:4] == b"\x7fELF" and len(code) > 1000


def test_ptx_shows_the_index_math_and_one_fma():
    ptx = nvrtc_saxpy.ptx_of(nvrtc_saxpy.SAXPY_SOURCE, name="saxpy.cu", arch="sm_90")
    assert ".entry saxpy(" in ptx and ".target sm_90" in ptx
    for needle in ("%ctaid.x", "%ntid.x", "%tid.x"):
        assert needle in ptx
    assert ptx.count("fma.rn.f32") == 1 and ptx.count("st.global.f32") == 1


BAD_SOURCE = 'extern "C" __global__ void k(float* x) { x[0] = ; }'


@pytest.mark.parametrize("compile_fn", [nvrtc_saxpy.compile_cuda, nvrtc_saxpy.ptx_of])
def test_syntax_error_gives_nvrtc_log(compile_fn):
    with pytest.raises(nvrtc_saxpy.CudaCompileError) as info:
        compile_fn(BAD_SOURCE, name="bad.cu")
    msg = str(info.value)
    assert "NVRTC could not compile bad.cu" in msg
    assert re.search(r"bad\.cu\(1\): error", msg), msg  # file(line): error, as nvcc says


@pytest.mark.parametrize("arch", ["90", "sm90", "compute_90", None])
def test_bad_arch_is_rejected(arch):
    with pytest.raises(ValueError, match="arch must look like 'sm_90'"):
        nvrtc_saxpy.compile_cuda(nvrtc_saxpy.SAXPY_SOURCE, arch=arch)


def test_saxpy_rejects_bad_tensors_before_touching_the_gpu():
    import torch
    x = torch.randn(8)
    with pytest.raises(TypeError, match="float32"):
        nvrtc_saxpy.saxpy(1.0, x.double(), x.double())
    with pytest.raises(ValueError, match="same length"):
        nvrtc_saxpy.saxpy(1.0, x, torch.randn(9))
    with pytest.raises(ValueError, match="same GPU"):
        nvrtc_saxpy.saxpy(1.0, x, torch.randn(8))  # CPU tensors
    with pytest.raises(TypeError, match="torch tensors"):
        nvrtc_saxpy.saxpy(1.0, np.ones(8, np.float32), x)


@pytest.mark.gpu
@pytest.mark.parametrize("n,block", [(1, 32), (17, 128), (1000, 256), (RANDOM_N, 96),
                                     (1_000_003, 1024)])
def test_saxpy_launch_matches_numpy(n, block):
    import torch
    from common.checks import poisoned
    g = torch.Generator(device="cuda").manual_seed(n)
    a = float(np.random.default_rng(n).standard_normal())
    x = torch.randn(n, device="cuda", generator=g)
    y = torch.randn(n, device="cuda", generator=g)
    out = poisoned((n,), torch.float32, "cuda")
    nvrtc_saxpy.saxpy(a, x, y, out=out, block_size=block)
    want = float(np.float32(a)) * x.cpu().double().numpy() + y.cpu().double().numpy()
    assert_close(out, want, name=f"saxpy n={n}")


@pytest.mark.gpu
def test_saxpy_empty_input():
    import torch
    x = torch.empty(0, device="cuda")
    assert nvrtc_saxpy.saxpy(2.0, x, x).shape == (0,)


# ----------------------------------------------------------------------------------------
# Device properties

H100_SXM = {  # as the driver reports them for an H100 80GB HBM3 (SXM)
    "name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0), "arch": "sm_90",
    "sm_count": 132, "warp_size": 32, "max_threads_per_block": 1024,
    "max_threads_per_sm": 2048, "max_blocks_per_sm": 32, "regs_per_block": 65536,
    "regs_per_sm": 65536, "smem_per_block": 49152, "smem_per_block_optin": 232448,
    "smem_per_sm": 233472, "l2_bytes": 52428800, "sm_clock_khz": 1980000,
    "mem_clock_khz": 2619000, "mem_bus_bits": 5120}


def test_peaks_match_the_h100_datasheet():
    # Datasheet (H100 SXM5): 3.35 TB/s HBM3, 67 TFLOPS FP32 (non-tensor).
    assert device_props.peak_dram_gbps(H100_SXM) == pytest.approx(3352, rel=1e-3)
    assert device_props.peak_fp32_tflops(H100_SXM) == pytest.approx(66.9, rel=1e-2)
    facts = {f.name: f for f in device_props.explain(H100_SXM)}
    assert facts["SMs"].value == "132" and "3,352 GB/s" in facts["memory clock, bus"].meaning
    assert device_props.peak_fp32_tflops({**H100_SXM, "compute_capability": (42, 0)}) is None


@pytest.mark.skipif(runtime.is_gpu(), reason="describes the simulator")
def test_simulator_facts_come_from_the_simulator():
    from numba import cuda
    facts = {f.name: f.value for f in device_props.simulator_facts()}
    assert facts["compute capability"] == "{}.{}".format(*cuda.get_current_device().compute_capability)
    assert facts["device"].startswith("FakeCUDADevice")


@pytest.mark.skipif(runtime.probe_gpu().available, reason="this machine has a driver")
def test_properties_without_a_driver_is_one_sentence():
    with pytest.raises(RuntimeError, match="needs the CUDA driver"):
        device_props.read_properties()


@pytest.mark.gpu
def test_device_properties_agree_with_torch_and_are_sane():
    import torch
    p = device_props.read_properties(0)
    tp = torch.cuda.get_device_properties(0)
    assert p["name"] == tp.name
    assert p["compute_capability"] == (tp.major, tp.minor)
    assert p["sm_count"] == tp.multi_processor_count
    pairs = {"warp_size": "warp_size", "l2_bytes": "L2_cache_size",
             "max_threads_per_sm": "max_threads_per_multi_processor",
             "regs_per_sm": "regs_per_multiprocessor", "smem_per_block": "shared_memory_per_block",
             "smem_per_block_optin": "shared_memory_per_block_optin",
             "smem_per_sm": "shared_memory_per_multiprocessor"}
    compared = [k for k, attr in pairs.items() if hasattr(tp, attr)]
    for k in compared:
        assert p[k] == getattr(tp, pairs[k]), k
    assert len(compared) >= 3, "torch exposes too few properties to cross-check"
    assert p["warp_size"] == 32 and p["max_threads_per_block"] == 1024
    assert p["smem_per_block"] == 48 * 1024 <= p["smem_per_block_optin"] <= p["smem_per_sm"]
    assert p["l2_bytes"] >= 2**20 and p["sm_clock_khz"] > 0
    assert 100 < device_props.peak_dram_gbps(p) < 20_000
    assert len(device_props.explain(p)) >= 12
