"""Runtime selection: real GPU, or Numba's CUDA simulator plus Triton's interpreter.

Every lesson, script and the test suite import this module *before* numba or triton.
Both packages read their emulation switches (``NUMBA_ENABLE_CUDASIM``,
``TRITON_INTERPRET``) only once, when they are first imported or when ``@triton.jit``
decorates a function, so the decision has to be made here, early, and only once.

How the mode is chosen (first match wins):

1. ``select("cpu")`` / ``select("gpu")`` called explicitly (``main.py --cpu`` does this);
2. the environment variable ``COURSE_MODE`` = ``cpu`` | ``gpu`` | ``auto``;
3. auto: a CUDA driver that answers ``cuInit`` and reports at least one device means
   GPU mode. The probe talks to ``libcuda`` through ctypes, so it imports neither numba
   nor triton nor torch.

Importing the module selects with rules 2-3 if nothing selected yet; ``select`` after
numba or triton was imported in the other mode is an error, never a silent mismatch.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

GPU = "gpu"
EMULATION = "emulation"

_mode: str | None = None
_gpu_probe: "GpuProbe | None" = None


class RuntimeSelectionError(RuntimeError):
    """Raised with one sentence that says what is wrong and what to do."""


@dataclass(frozen=True)
class GpuProbe:
    """What the CUDA driver said, read without importing any CUDA package."""

    available: bool
    reason: str  # why not, when not available
    device_count: int = 0
    driver_version: str = ""
    name: str = ""


def probe_gpu() -> GpuProbe:
    """Ask libcuda directly whether a usable GPU exists (cached)."""
    global _gpu_probe
    if _gpu_probe is not None:
        return _gpu_probe
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        _gpu_probe = GpuProbe(False, "CUDA_VISIBLE_DEVICES hides every GPU")
        return _gpu_probe
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        _gpu_probe = GpuProbe(False, "no CUDA driver (libcuda.so.1 not found)")
        return _gpu_probe
    if cuda.cuInit(0) != 0:
        _gpu_probe = GpuProbe(False, "the CUDA driver is installed but cuInit failed (no usable GPU)")
        return _gpu_probe
    count = ctypes.c_int(0)
    cuda.cuDeviceGetCount(ctypes.byref(count))
    if count.value < 1:
        _gpu_probe = GpuProbe(False, "the CUDA driver reports no device")
        return _gpu_probe
    version = ctypes.c_int(0)
    cuda.cuDriverGetVersion(ctypes.byref(version))
    dev = ctypes.c_int(0)
    cuda.cuDeviceGet(ctypes.byref(dev), 0)
    buf = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(buf, 256, dev)
    v = version.value
    _gpu_probe = GpuProbe(True, "", count.value, f"{v // 1000}.{(v % 1000) // 10}",
                          buf.value.decode(errors="replace"))
    return _gpu_probe


def _apply_bridges() -> None:
    """Compatibility bridges for known breakages of the pinned/installed packages.

    * numba-cuda 0.30.x calls ``np.row_stack``, which NumPy 2.5 removed
      (NVIDIA/numba-cuda#907; numba-cuda is in maintenance mode, no fix coming). The GPU
      image ships numpy 2.5.2, so alias it to ``np.vstack`` (its documented equivalent)
      before ``numba.cuda`` first runs a kernel. Harmless where row_stack still exists.
    """
    try:
        import numpy as np
    except ImportError:  # doctor reports the missing package
        return
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack


def _patch_simulator_shared_arrays() -> None:
    """Emulation only: make the CUDA simulator's ``cuda.shared.array`` thread-safe.

    numba-cuda 0.30.4's simulator runs each CUDA thread as an OS thread and keys a block's
    shared arrays by the calling source line with an unlocked check-then-insert
    (``FakeCUDAShared.array``): two threads arriving together can each create their own
    array, so one thread's writes are invisible to the others. Seen as a rare, moving
    wrong result in lesson 07's kernel (9 shared arrays, 128 threads). Same semantics here,
    under a lock, and the caller's line read from its frame instead of a full
    ``traceback.extract_stack`` (which made every allocation slow).
    """
    import threading

    import numpy as np
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    if getattr(kernelapi.FakeCUDAShared, "_course_patched", False):
        return
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None:
            raise RuntimeError("Array alignment is not supported in cudasim")
        if not isinstance(dtype, np.dtype) and not isinstance(dtype, type):
            dtype = numpy_support.as_dtype(dtype)
        if shape == 0:  # dynamic shared memory: one buffer for every such array
            count = self._dynshared_size // np.dtype(dtype).itemsize
            return np.frombuffer(self._dynshared.data, dtype=dtype, count=count)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array
    kernelapi.FakeCUDAShared._course_patched = True


def _already_imported() -> list[str]:
    return [m for m in ("numba", "triton") if m in sys.modules]


def select(requested: str | None = None) -> str:
    """Choose GPU or emulation once; return the active mode.

    ``requested`` is ``"cpu"``, ``"gpu"``, ``"auto"`` or None (read ``COURSE_MODE``).
    """
    global _mode
    req = (requested or os.environ.get("COURSE_MODE") or "auto").strip().lower()
    if req not in ("cpu", "gpu", "auto", EMULATION):
        raise RuntimeSelectionError(
            f"COURSE_MODE={req!r} is not a mode: use cpu, gpu or auto.")
    if req == "auto":
        want = GPU if probe_gpu().available else EMULATION
    elif req == "gpu":
        probe = probe_gpu()
        if not probe.available:
            raise RuntimeSelectionError(
                f"GPU mode was asked for, but {probe.reason}: drop --gpu/COURSE_MODE=gpu "
                "to run under emulation, or run on a machine with an NVIDIA GPU.")
        want = GPU
    else:
        want = EMULATION

    if _mode is not None:
        if _mode != want and requested is not None:
            raise RuntimeSelectionError(
                f"the runtime is already in {_mode} mode and numba/triton may be loaded: "
                f"choose {want} mode before anything imports them (COURSE_MODE env var).")
        return _mode

    if want == EMULATION:
        loaded = [m for m in _already_imported()
                  if m == "numba" and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1"
                  or m == "triton" and os.environ.get("TRITON_INTERPRET") != "1"]
        if loaded:
            raise RuntimeSelectionError(
                f"{', '.join(loaded)} was imported before common.runtime: import common.runtime "
                "first so the simulator/interpreter can be switched on.")
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        os.environ["TRITON_INTERPRET"] = "1"
        # The simulator runs one OS thread per CUDA thread; a short switch interval makes
        # barrier-heavy kernels 2-8x faster (measured, docs/environment.md).
        sys.setswitchinterval(1e-4)
    else:
        os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
        os.environ.pop("TRITON_INTERPRET", None)
    _apply_bridges()
    if want == EMULATION:
        try:
            _patch_simulator_shared_arrays()
        except ImportError:  # no numba-cuda: doctor reports it
            pass
    _mode = want
    return _mode


def mode() -> str:
    return _mode or select()


def is_gpu() -> bool:
    return mode() == GPU


def is_emulated() -> bool:
    return mode() == EMULATION


def torch_device() -> str:
    """The torch device that holds a lesson's tensors: ``cuda`` on a GPU, else ``cpu``.

    Triton's interpreter runs on CPU tensors; Numba's simulator on NumPy arrays.
    """
    return "cuda" if is_gpu() else "cpu"


def small_sizes() -> bool:
    """Small problems even on a GPU: ``COURSE_SIZES=small`` (what ``make sanitize`` sets,
    since compute-sanitizer slows kernels down 10-100x)."""
    return os.environ.get("COURSE_SIZES", "").lower() == "small"


def pick(gpu, emulation):
    """A problem size (or anything) for the active mode: real sizes on a GPU, small ones
    under emulation, where every CUDA thread is a Python thread (or with COURSE_SIZES=small)."""
    return gpu if is_gpu() and not small_sizes() else emulation


def banner() -> str:
    """One line saying where the code runs."""
    if is_gpu():
        p = probe_gpu()
        return f"GPU mode: {p.name} (driver CUDA {p.driver_version})."
    p = probe_gpu()
    why = "forced by --cpu/COURSE_MODE" if p.available else p.reason
    return ("Emulation mode (" + why + "): Numba CUDA simulator + Triton interpreter, "
            "small sizes, timings meaningless.")


# Select at import time so that `from common import runtime` before `import numba` is
# all a kernel module needs.
select()
