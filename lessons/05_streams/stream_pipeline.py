"""Streams and overlap: copy in -> kernel -> copy out, serial and as a chunked pipeline.

A GPU has separate engines: the SMs run kernels, and *copy engines* (DMA engines) move
bytes over PCIe between host and device memory, one direction each at a time (an H100
reports 2+ asynchronous engines; PCIe is full duplex). Work on one **stream** runs in
order; work on different streams may overlap when it needs different engines. So:

* ``serial``: copy the whole input in, run the kernel, copy the whole output out. The
  engines take turns: time = t_in + t_kernel + t_out.
* ``Pipeline``: cut the arrays into ``chunks``; chunk c is copied in, processed and copied
  out on stream ``c % streams``. While chunk c computes, chunk c+1 can be copied in and
  chunk c-1 copied out. With three balanced stages of time t per chunk, C chunks take
  about (C + 2) t instead of 3 C t: the **ideal** is the slowest stage summed over all
  chunks plus one fill (the stages before it) and one drain (the stages after it).

Three things must hold for copies to overlap anything:
1. the host buffers are **pinned** (page-locked: ``cuda.pinned_array``). From pageable
   memory the driver first copies into a pinned staging buffer with the CPU, and the
   "asynchronous" copy returns only when that is done - the host cannot issue the next
   chunk while this one moves, and the overlap is gone;
2. the work is on **different streams** (one stream is one queue, executed in order);
3. there are enough streams for the stages in flight: with 3 stages, chunk c+k reuses
   chunk c's stream and waits behind its copy out, so fewer than 3 streams starve a stage.

The kernel ``work_kernel`` applies ``v <- fma(v, A, B)`` ``iters`` times to each element:
its cost is linear in ``iters``, so it can be made cheaper than, equal to, or dearer than
the copies (``calibrate_iters``). Every operation the pipeline issues is appended to an
**issue log** (chunk, stage, stream, element range) and bracketed by two CUDA events on
its stream; from the events' timestamps ``Timeline`` draws the Gantt chart. Under
emulation the simulator runs everything synchronously and events carry no time: the
same code runs, the results and the issue log are what can be checked.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

from common import runtime  # noqa: F401  (selects GPU or simulator before numba loads)

import numpy as np
from numba import cuda, float32

A = float32(0.9999)    # |A| < 1: rounding errors do not grow; v tends to B / (1 - A) = 1
B = float32(0.0001)
THREADS = runtime.pick(256, 32)
STAGES = ("h2d", "kernel", "d2h")


# --- the kernel: tunable cost ---------------------------------------------------------------
@cuda.jit
def work_kernel(x, y, iters):
    """y[i] = f^iters(x[i]), f(v) = fma(v, A, B): `iters` dependent FMAs per element."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < x.size:
        v = x[i]
        for _ in range(iters):
            v = cuda.fma(v, A, B)
        y[i] = v
        i += stride


def work_spec(x: np.ndarray, iters: int) -> np.ndarray:
    """NumPy spec of work_kernel: each step in float64, rounded once to float32, as a fused
    multiply-add rounds (the product of two float32 is exact in float64)."""
    v = np.asarray(x, np.float32)
    a, b = np.float64(A), np.float64(B)
    for _ in range(iters):
        v = (v.astype(np.float64) * a + b).astype(np.float32)
    return v


def spec_tolerance(iters: int) -> float:
    """|kernel - spec| / |spec| bound: the simulator's fma rounds twice (a*b, then +c),
    at most one float32 ulp more per step; with |A| < 1 errors do not compound."""
    return 2.0 * (iters + 1) * 2.0**-24


_sms: list[int] = []


def _num_sms() -> int:
    if not _sms:  # a driver query: once, not per launch
        _sms.append(2 if runtime.is_emulated() else cuda.get_current_device().MULTIPROCESSOR_COUNT)
    return _sms[0]


def launch_work(d_x, d_y, iters: int, stream=0):
    n = d_x.shape[0]
    blocks = max(1, min(_num_sms() * 8, math.ceil(n / THREADS)))
    work_kernel[blocks, THREADS, stream](d_x, d_y, iters)


# --- checks ---------------------------------------------------------------------------------
def is_pinned(a: np.ndarray) -> bool | None:
    """True if ``a`` lives in page-locked memory from ``cuda.pinned_array`` (or a view of
    it), False if not, None if it cannot be told (the simulator has no pinned memory)."""
    if runtime.is_emulated():
        return None
    try:
        from numba.cuda.cudadrv.driver import MappedMemory, PinnedMemory
    except ImportError:  # a numba-cuda that moved them: cannot tell
        return None
    obj = a
    while obj is not None:
        if isinstance(obj, (PinnedMemory, MappedMemory)):
            return True
        obj = getattr(obj, "base", None)
    return False


def check_buffers(h_x, h_y, *, require_pinned: bool = True, who: str = "pipeline"):
    """One sentence per way the host buffers can be wrong, before anything is issued."""
    for name, a in (("h_x", h_x), ("h_y", h_y)):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{who}: {name} must be a NumPy array (host memory), got "
                            f"{type(a).__name__}")
        if a.dtype != np.float32:
            raise TypeError(f"{who}: {name} has dtype {a.dtype}; the kernel works on float32")
        if a.ndim != 1:
            raise ValueError(f"{who}: {name} must be 1-D, got shape {a.shape}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{who}: {name} is not contiguous (strides {a.strides}): a chunk "
                             "must be one block of memory for a DMA copy; use "
                             "np.ascontiguousarray or copy into a pinned buffer")
        if a.size == 0:
            raise ValueError(f"{who}: {name} is empty: there is nothing to pipeline")
        if require_pinned and is_pinned(a) is False:
            raise ValueError(f"{who}: {name} is pageable host memory: its 'asynchronous' "
                             "copies would run synchronously and nothing would overlap; "
                             "allocate it with cuda.pinned_array (or pass "
                             "require_pinned=False to measure exactly that)")
    if h_x.shape != h_y.shape:
        raise ValueError(f"{who}: h_x and h_y differ in shape: {h_x.shape} vs {h_y.shape}")
    if np.shares_memory(h_x, h_y):
        raise ValueError(f"{who}: h_x and h_y overlap; give the output its own buffer")


def _check_count(name: str, v, who: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{who}: {name} must be an integer, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{who}: {name} must be at least 1, got {v}")
    return int(v)


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """[lo, hi) of each chunk: sizes differ by at most one element, none is empty."""
    return [(c * n // chunks, (c + 1) * n // chunks) for c in range(chunks)]


# --- what happened, and when ----------------------------------------------------------------
@dataclass
class Op:
    """One issued operation: what, on which stream, and (GPU only) when, in ms after t0.

    ``ready_ms``: the event recorded just before it on its stream (the stream reached it:
    everything before it in the stream had finished). ``end_ms``: the event after it.
    The op itself may have started later than ``ready_ms`` if its engine was busy with
    another stream's work; ``start_ms`` is filled in by :meth:`Timeline.engine_view`.
    """
    chunk: int
    stage: str
    stream: int
    lo: int
    hi: int
    ready_ms: float | None = None
    end_ms: float | None = None
    start_ms: float | None = None


@dataclass
class Timeline:
    label: str
    streams: int
    chunks: int
    ops: list[Op] = field(default_factory=list)   # in issue order: the issue log
    host_issue_ms: float | None = None  # host time spent issuing (Python + driver calls)

    @property
    def timed(self) -> bool:
        return bool(self.ops) and self.ops[-1].end_ms is not None

    @property
    def total_ms(self) -> float | None:
        return max(o.end_ms for o in self.ops) if self.timed else None

    def engine_view(self) -> "Timeline":
        """Each op drawn where it ran: an engine (H2D copies, kernels, D2H copies) serves
        one op after another in the order they finish, so an op starts at
        max(its stream reached it, the previous op of its engine ended)."""
        if not self.timed:
            return self
        for stage in STAGES:
            prev_end = 0.0
            for o in sorted((o for o in self.ops if o.stage == stage), key=lambda o: o.end_ms):
                o.start_ms = max(o.ready_ms, prev_end)
                prev_end = o.end_ms
        return self

    def stage_ms(self) -> dict[str, float]:
        """Median duration per chunk of each stage (meaningful when nothing overlapped)."""
        self.engine_view()
        return {s: statistics.median(o.end_ms - o.start_ms for o in self.ops if o.stage == s)
                for s in STAGES}

    @classmethod
    def from_dict(cls, d: dict) -> "Timeline":
        return cls(d["label"], d["streams"], d["chunks"], [Op(**o) for o in d["ops"]],
                   d.get("host_issue_ms"))

    def as_dict(self) -> dict:
        return {"label": self.label, "streams": self.streams, "chunks": self.chunks,
                "total_ms": self.total_ms, "host_issue_ms": self.host_issue_ms,
                "ops": [o.__dict__ for o in self.ops]}


def ideal_ms(stage_ms: dict[str, float], chunks: int) -> float:
    """Slowest stage summed over the chunks, plus one fill and one drain (the other two
    stages once): the shortest a perfectly overlapped pipeline could take."""
    slowest = max(stage_ms.values())
    return chunks * slowest + (sum(stage_ms.values()) - slowest)


# --- the pipeline ---------------------------------------------------------------------------
ISSUE_PATHS = ("driver", "numba")


class Pipeline:
    """Device buffers, streams and events for one (n, streams, chunks): reusable.

    ``run(h_x, h_y, iters)`` issues, for each chunk c on stream c % streams:
    copy h_x[lo:hi] in, work_kernel, copy the result out to h_y[lo:hi]; then waits for
    all streams and returns the Timeline (the issue log, with event times on a GPU).
    ``streams=1, chunks=1`` is the serial version: the same three operations, one queue.

    ``issue`` is how the host issues each operation - it matters, because the host must
    issue a chunk's three operations faster than the GPU runs them, or the GPU waits for
    Python (measured on the H100: Numba's ``copy_to_device``/``copy_to_host`` on a fresh
    slice and a plain kernel call cost ~0.5 ms of host time per chunk, more than a 16 MiB
    chunk's 0.32 ms per stage):

    * ``"numba"``: Numba's API, as one first writes it: ``d_x[lo:hi].copy_to_device(
      h_x[lo:hi], stream=s)``, ``work_kernel[grid, block, s](...)``, ``copy_to_host``.
      Every call re-checks and re-wraps its arguments in Python. (The only path under
      emulation, where the simulator implements these calls.)
    * ``"driver"`` (GPU default): everything that does not change between runs is
      prepared here once - each chunk's device views and byte offsets, a launch
      configuration per chunk of a kernel specialised for its argument types - and
      the copies go straight to the driver (``cuMemcpyHtoDAsync``/``cuMemcpyDtoHAsync``
      with precomputed pointers), which is all Numba's copy methods end up calling.
    """

    def __init__(self, n: int, streams: int = 4, chunks: int = 16, issue: str | None = None):
        who = "Pipeline"
        n = _check_count("n", n, who)
        self.streams = _check_count("streams", streams, who)
        self.chunks = _check_count("chunks", chunks, who)
        if self.chunks > n:
            raise ValueError(f"{who}: {chunks} chunks of {n} elements would leave chunks "
                             "empty: use at most n chunks")
        issue = issue or ("numba" if runtime.is_emulated() else "driver")
        if issue not in ISSUE_PATHS:
            raise ValueError(f"{who}: issue must be one of {ISSUE_PATHS}, got {issue!r}")
        if issue == "driver" and runtime.is_emulated():
            raise ValueError(f"{who}: issue='driver' needs a GPU (the simulator has no driver)")
        self.issue = issue
        self.n = n
        self.bounds = chunk_bounds(n, self.chunks)
        self.d_x = cuda.device_array(n, np.float32)
        self.d_y = cuda.device_array(n, np.float32)
        self.queues = [cuda.stream() for _ in range(self.streams)]
        # Events made once: creating them inside the timed loop would cost host time.
        self.t0 = cuda.event()
        self.events = [(cuda.event(), cuda.event()) for _ in range(3 * self.chunks)]
        if issue == "driver":
            self._prepare_driver_path()

    def _prepare_driver_path(self):
        from numba.cuda.cudadrv.driver import _stream_handle, device_pointer, driver
        self._driver = driver
        self._dx_ptr, self._dy_ptr = device_pointer(self.d_x), device_pointer(self.d_y)
        self._handles = [_stream_handle(q) for q in self.queues]  # what Numba passes on
        views = [(self.d_x[lo:hi], self.d_y[lo:hi]) for lo, hi in self.bounds]
        # one compiled kernel for these argument types: no type dispatch per launch
        kernel = work_kernel.specialize(views[0][0], views[0][1], 0)
        self._launches = []
        for c, ((lo, hi), (dx, dy)) in enumerate(zip(self.bounds, views)):
            blocks = max(1, min(_num_sms() * 8, math.ceil((hi - lo) / THREADS)))
            self._launches.append((kernel[blocks, THREADS, self.queues[c % self.streams]],
                                   dx, dy))

    def _issue(self, c: int, stage: str, stream, h_x, h_y, iters: int):
        if self.issue == "numba":
            self._issue_numba(c, stage, stream, h_x, h_y, iters)
        else:
            self._issue_driver(c, stage, h_x, h_y, iters)

    def _issue_numba(self, c: int, stage: str, stream, h_x, h_y, iters: int):
        lo, hi = self.bounds[c]
        if stage == "h2d":
            self.d_x[lo:hi].copy_to_device(h_x[lo:hi], stream=stream)
        elif stage == "kernel":
            launch_work(self.d_x[lo:hi], self.d_y[lo:hi], iters, stream)
        else:
            self.d_y[lo:hi].copy_to_host(h_y[lo:hi], stream=stream)

    def _issue_driver(self, c: int, stage: str, h_x, h_y, iters: int):
        lo, hi = self.bounds[c]
        handle = self._handles[c % self.streams]
        if stage == "h2d":
            self._driver.cuMemcpyHtoDAsync(self._dx_ptr + 4 * lo, h_x.ctypes.data + 4 * lo,
                                           4 * (hi - lo), handle)
        elif stage == "kernel":
            launch, dx, dy = self._launches[c]
            launch(dx, dy, iters)
        else:
            self._driver.cuMemcpyDtoHAsync(h_y.ctypes.data + 4 * lo, self._dy_ptr + 4 * lo,
                                           4 * (hi - lo), handle)

    def run(self, h_x: np.ndarray, h_y: np.ndarray, iters: int, *,
            require_pinned: bool = True, label: str | None = None) -> Timeline:
        check_buffers(h_x, h_y, require_pinned=require_pinned, who="Pipeline.run")
        if h_x.size != self.n:
            raise ValueError(f"Pipeline.run: buffers hold {h_x.size} elements, the pipeline "
                             f"was built for {self.n}")
        iters = int(iters)
        if iters < 0:
            raise ValueError(f"Pipeline.run: iters must be >= 0, got {iters}")
        tl = Timeline(label or f"{self.streams} streams x {self.chunks} chunks",
                      self.streams, self.chunks)
        t_host = time.perf_counter()
        self.t0.record(cuda.default_stream())  # blocking streams start after this
        k = 0
        for c, (lo, hi) in enumerate(self.bounds):
            s = c % self.streams
            stream = self.queues[s]
            for stage in STAGES:
                before, after = self.events[k]
                k += 1
                tl.ops.append(Op(c, stage, s, lo, hi))   # the issue log, in issue order
                before.record(stream)
                self._issue(c, stage, stream, h_x, h_y, iters)
                after.record(stream)
        tl.host_issue_ms = (time.perf_counter() - t_host) * 1e3
        for q in self.queues:
            q.synchronize()
        if not runtime.is_emulated():
            for op, (before, after) in zip(tl.ops, self.events):
                op.ready_ms = self.t0.elapsed_time(before)
                op.end_ms = self.t0.elapsed_time(after)
            tl.engine_view()
        return tl


def serial(h_x: np.ndarray, h_y: np.ndarray, iters: int, issue: str | None = None,
           **kw) -> Timeline:
    """Whole array in, kernel, whole array out, on one stream: no overlap possible."""
    check_buffers(h_x, h_y, require_pinned=kw.get("require_pinned", True), who="serial")
    return Pipeline(h_x.size, 1, 1, issue).run(h_x, h_y, iters, label="serial", **kw)


def pipelined(h_x: np.ndarray, h_y: np.ndarray, iters: int, streams: int = 4,
              chunks: int = 16, issue: str | None = None, **kw) -> Timeline:
    """The chunked pipeline over ``streams`` streams (a new Pipeline each call)."""
    check_buffers(h_x, h_y, require_pinned=kw.get("require_pinned", True), who="pipelined")
    return Pipeline(h_x.size, streams, chunks, issue).run(h_x, h_y, iters, **kw)
