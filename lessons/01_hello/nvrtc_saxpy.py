"""Lesson 01, part 3: a CUDA C++ kernel compiled from Python with NVRTC, launched with cuda.core.

Most CUDA code a learner meets is C++: the CUDA programming guide, papers' listings,
FlashAttention's sources. ``cuda.core`` (NVIDIA's cuda-python) turns such a source string
into GPU machine code at run time and launches it, with no nvcc and no build step:

    source (CUDA C++) --NVRTC--> PTX (virtual ISA) --ptxas--> cubin (SASS for one arch)
                                                                  |
                                        Device().set_current(); launch(stream, config, kernel, *args)

* :func:`compile_cuda` compiles any source to a cubin with ``cuda.core.Program``; this
  needs only the NVRTC library (the ``cuda-toolkit[nvrtc]`` wheel), no GPU and no driver.
* :func:`ptx_of` returns the PTX, the assembly-like text one level above machine code, via
  the lower-level ``cuda.bindings.nvrtc`` (cuda.core 1.2's ``compile("ptx")`` asks the
  driver which PTX version it can load, so it needs a driver; the raw NVRTC call does not).
* :func:`load_saxpy` loads the cubin onto a GPU; :func:`saxpy` launches it on torch
  tensors (GPU only).

The kernel is SAXPY (``out = a * x + y``, "single-precision a times x plus y", the BLAS
routine), the smallest kernel that reads and writes memory.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from common import runtime  # noqa: F401  (first, as in every lesson module)

SAXPY_SOURCE = r"""
// out[i] = a * x[i] + y[i], one thread per element.
// extern "C": no C++ name mangling, so Python finds the kernel as "saxpy".
extern "C" __global__ void saxpy(float a,
                                 const float* __restrict__ x,
                                 const float* __restrict__ y,
                                 float* __restrict__ out,
                                 unsigned long long n)
{
    // blockIdx.x and blockDim.x are 32-bit unsigned: widen before multiplying,
    // or the index wraps around past 2^32 elements.
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x
                           + threadIdx.x;
    if (i < n)  // the last block is partly idle when blockDim.x does not divide n
        out[i] = a * x[i] + y[i];
}
"""

# The course's target GPU is an H100 (compute capability 9.0). A cubin runs only on the
# architecture it was built for; on a GPU we build for the GPU that is there.
DEFAULT_ARCH = "sm_90"
_ARCH = re.compile(r"^sm_(\d{2,3})a?$")


class CudaCompileError(RuntimeError):
    """NVRTC rejected the source; the message carries NVRTC's log (file, line, caret)."""


def _check_arch(arch: str) -> str:
    if not isinstance(arch, str) or not _ARCH.match(arch):
        raise ValueError(f"arch must look like 'sm_90' (sm_<compute capability>), got {arch!r}")
    return arch


def _nvrtc_missing(e: Exception) -> bool:
    return "nvrtc" in str(e).lower() and type(e).__name__ == "DynamicLibNotFoundError"


def compile_cuda(source: str, *, name: str = "kernel.cu", arch: str = DEFAULT_ARCH):
    """CUDA C++ source -> ``cuda.core.ObjectCode`` holding a cubin for ``arch``.

    Raises :class:`CudaCompileError` with NVRTC's log if the source does not compile.
    """
    from cuda.core import Program, ProgramOptions

    _check_arch(arch)
    # std=c++17 is NVRTC's default too; "name" is the file name NVRTC uses in its errors.
    options = ProgramOptions(name=name, arch=arch, std="c++17")
    try:
        return Program(source, code_type="c++", options=options).compile("cubin")
    except Exception as e:  # NVRTCError, or the NVRTC library is not installed
        if _nvrtc_missing(e):
            raise CudaCompileError("the NVRTC library is not installed: pip install "
                                   "'cuda-toolkit[nvrtc]==13.0.*' (see requirements.txt)") from None
        if type(e).__name__ == "NVRTCError":
            raise CudaCompileError(f"NVRTC could not compile {name} for {arch}:\n{e}") from None
        raise


def ptx_of(source: str, *, name: str = "kernel.cu", arch: str = DEFAULT_ARCH) -> str:
    """The PTX NVRTC generates for ``source`` (virtual architecture ``compute_XX``)."""
    from cuda.bindings import nvrtc

    cc = _ARCH.match(_check_arch(arch)).group(1)

    def ok(result, what):
        err, *rest = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CudaCompileError(f"{what} failed: {err!r}")
        return rest[0] if rest else None

    prog = ok(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []),
              "nvrtcCreateProgram")
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, 1, [f"--gpu-architecture=compute_{cc}".encode()])
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = ok(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            ok(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise CudaCompileError(f"NVRTC could not compile {name} for compute_{cc}:\n"
                                   + log.decode(errors="replace").rstrip("\x00 \n"))
        size = ok(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
        ptx = b" " * size
        ok(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return ptx.decode().rstrip("\x00")


@functools.lru_cache(maxsize=None)
def saxpy_module(arch: str = DEFAULT_ARCH):
    """The compiled SAXPY cubin for ``arch`` (compiled once per process and arch)."""
    return compile_cuda(SAXPY_SOURCE, name="saxpy.cu", arch=arch)


@functools.lru_cache(maxsize=None)
def load_saxpy(device_index: int = 0):
    """Compile for this GPU's arch and load the cubin onto it, once per device."""
    from cuda.core import Device

    dev = Device(device_index)
    dev.set_current()  # the primary context: the same one torch and Numba use
    return saxpy_module(f"sm_{dev.arch}").get_kernel("saxpy")


class _TorchStream:
    """The ``__cuda_stream__`` protocol: (version 0, the cudaStream_t as an int)."""

    def __init__(self, torch_stream):
        self._torch_stream = torch_stream  # cuda.core keeps this object, so torch's stream lives
        self._handle = torch_stream.cuda_stream

    def __cuda_stream__(self):
        return (0, self._handle)


_streams: dict = {}


def _cuda_core_stream(device_index: int, torch_stream):
    """torch's stream as a ``cuda.core.Stream`` (wrapped once per stream handle).

    Launching on torch's *current* stream keeps our kernel ordered after the torch ops
    that produced x and y (and is what CUDA-graph capture on that stream requires)."""
    from cuda.core import Device

    key = (device_index, torch_stream.cuda_stream)
    if key not in _streams:
        _streams[key] = Device(device_index).create_stream(_TorchStream(torch_stream))
    return _streams[key]


def saxpy(a: float, x, y, *, out=None, block_size: int = 256):
    """``out = a * x + y`` for 1-D float32 CUDA tensors, with the NVRTC-compiled kernel."""
    import torch
    from cuda.core import LaunchConfig, launch

    if not all(isinstance(t, torch.Tensor) for t in (x, y)):
        raise TypeError("x and y must be torch tensors")
    if x.dtype != torch.float32 or y.dtype != torch.float32:
        raise TypeError(f"saxpy is single precision: x and y must be float32, got "
                        f"{x.dtype} and {y.dtype}")
    if x.dim() != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D and the same length, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if not (x.is_cuda and y.is_cuda) or x.device != y.device:
        raise ValueError(f"x and y must be on the same GPU, got {x.device} and {y.device}")
    if not (x.is_contiguous() and y.is_contiguous()):
        raise ValueError("x and y must be contiguous (the kernel indexes x[i] directly)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= 1024:
        raise ValueError(f"block_size must be an int in 1..1024, got {block_size!r}")
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device \
            or not out.is_contiguous():
        raise ValueError("out must be a contiguous float32 tensor shaped like x, on x's GPU")
    n = x.numel()
    if n == 0:
        return out

    kernel = load_saxpy(x.device.index if x.device.index is not None else 0)
    config = LaunchConfig(grid=(n + block_size - 1) // block_size, block=block_size)
    # Arguments are passed by value in the order of the C++ signature: NumPy scalars
    # carry the exact C type (float, unsigned long long); a Python int is a pointer.
    stream = _cuda_core_stream(x.device.index or 0, torch.cuda.current_stream(x.device))
    launch(stream, config, kernel,
           np.float32(a), x.data_ptr(), y.data_ptr(), out.data_ptr(), np.uint64(n))
    return out
