"""One way to time GPU work: Numba kernels, Triton kernels and torch peers alike.

``bench(fn)`` calls ``fn()`` (which launches work on the current/default stream) and
returns a :class:`Timing` with the median and quantiles of device-event times:

* warm-up first (JIT compilation, module load, cuBLAS handles stay out of the numbers);
* each repetition brackets ``fn()`` with two CUDA events, so asynchronous launches are
  timed on the device, not the host clock;
* before each repetition a 256 MiB buffer is overwritten, so L2 (50 MB on an H100) does
  not keep the previous repetition's inputs warm (``flush_l2=False`` to measure the
  cache on purpose);
* ``cuda_graph=True`` captures ``fn`` in a CUDA graph and times replays, which removes
  the host launch gaps that would dominate microsecond kernels (as Triton's
  ``do_bench_cudagraph`` does).

Numba launches on the legacy default stream, which torch's default stream also is, so
the same events time both.

Under emulation nothing meaningful can be timed: ``bench`` runs ``fn`` once (so the code
path still executes) and returns ``None``; reports print ``n/a``.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from common import runtime


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int

    def as_dict(self) -> dict:
        return asdict(self)


_l2_flush_buffer = None


def flush_l2_cache():
    """Overwrite a 256 MiB buffer so that L2 holds none of the next call's inputs."""
    global _l2_flush_buffer
    import torch
    if _l2_flush_buffer is None:
        _l2_flush_buffer = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    _l2_flush_buffer.zero_()


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bench(fn, *, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 10,
          max_reps: int = 1000, flush_l2: bool = True, cuda_graph: bool = False) -> Timing | None:
    """Median device time of ``fn()`` in milliseconds (None under emulation)."""
    if runtime.is_emulated():
        fn()
        return None
    import torch

    torch.cuda.synchronize()
    fn()  # compile / load before anything is timed
    torch.cuda.synchronize()

    if cuda_graph:
        return _bench_graph(fn, rep_ms=rep_ms, min_reps=min_reps)

    # Estimate one call's time to size warm-up and repetitions by duration.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-4)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    reps = int(min(max_reps, max(min_reps, rep_ms / est)))

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush_l2:
            flush_l2_cache()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8),
                  min(times), reps)


def _bench_graph(fn, *, rep_ms: float, min_reps: int) -> Timing:
    """Time ``fn`` replayed from a CUDA graph: N calls per replay, per-call time reported."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # graph capture must not run on the legacy stream
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    calls_per_graph = 20
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    reps = int(min(200, max(min_reps, rep_ms / est)))
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls_per_graph)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8),
                  min(times), reps)


def host_us(fn, *, calls: int = 20, warmup: int = 3) -> float | None:
    """Host time per call of ``fn`` in microseconds: calls issued back to back with no
    synchronisation between them, so this is what Python, the framework and the driver
    spend on the CPU. When it exceeds the call's device time the GPU waits on the host:
    the call is host-bound. None under emulation."""
    if runtime.is_emulated():
        fn()
        return None
    import time
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


# ----------------------------------------------------------------------------------------
# Throughput: the formula is the caller's (bytes or FLOPs it counted); these convert.

def gbps(nbytes: float, ms: float | None) -> float | None:
    """GB/s (10^9 bytes per second) for ``nbytes`` moved in ``ms`` milliseconds."""
    return None if ms is None else nbytes / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float | None) -> float | None:
    """TFLOPS (10^12 floating-point operations per second)."""
    return None if ms is None else flops / (ms * 1e-3) / 1e12
