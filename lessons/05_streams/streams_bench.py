"""Lesson 05's benchmark (GPU only): copy bandwidth, then the pipeline against its ideal.

Saved (``results/`` or ``$RESULTS_DIR``):

* ``host_device_bandwidth``: host->device and device->host GB/s (bytes / time) for
  pageable and pinned host buffers at 1, 16 and 256 MiB, Numba copies, with torch's
  pinned ``copy_`` as the peer; ``common.timing.bench`` medians.
* ``pipeline_ms``: per configuration (kernel/copy ratio, streams, chunks, host memory) the
  serial time (whole array, one stream), the chunked time on one stream, the pipelined
  time and the ideal (slowest stage x chunks + fill + drain, from the one-stream chunk
  times). Pipeline times are the median of REPS runs, each timed by its own events (the
  timeline *is* the measurement here: first event to last).
* ``pipeline_efficiency``: ideal / pipelined and serial / pipelined, same configurations.
* ``pipeline_timeline``: the event timestamps of the median serial and pipelined runs,
  and the Gantt chart drawn from them; ``pipeline_sweep.png``: speedup against streams,
  chunks and kernel/copy balance.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import numpy as np
import torch
from numba import cuda

import stream_pipeline as sp
from common import runtime
from common.results import REPO, BenchReport, environment, gpu_slug
from common.timing import bench, gbps

REPS = 5
LESSON = "05_streams"


def _out_dir() -> Path:
    return Path(os.environ.get("RESULTS_DIR") or REPO / "lessons" / LESSON / "results")


# --- 1. pageable vs pinned ------------------------------------------------------------------
def bandwidth(console) -> BenchReport:
    report = BenchReport(LESSON, "host_device_bandwidth", metric="GB/s",
                         title="host <-> device copies: pageable vs pinned host memory")
    for mib in (1, 16, 256):
        n = mib * 2**20 // 4
        nbytes = 4 * n
        d = cuda.device_array(n, np.float32)
        pageable = np.random.default_rng(0).random(n, dtype=np.float32)
        pinned = cuda.pinned_array(n, np.float32)
        pinned[:] = pageable
        t_gpu = torch.empty(n, device="cuda")
        t_pin = torch.from_numpy(pageable).pin_memory()
        for direction in ("H2D", "D2H"):
            case = {"size MiB": mib, "direction": direction}
            for label, host in (("pageable (numba)", pageable), ("pinned (numba)", pinned)):
                if direction == "H2D":
                    t = bench(lambda: d.copy_to_device(host), flush_l2=False)
                else:
                    t = bench(lambda: d.copy_to_host(host), flush_l2=False)
                report.add(case, label, t, gbps(nbytes, t.median_ms))
            from numba.cuda.cudadrv.driver import device_pointer, driver
            dptr, hptr = device_pointer(d), pinned.ctypes.data
            try:  # the driver call Numba's copy methods end in, without their Python checks
                if direction == "H2D":
                    t = bench(lambda: driver.cuMemcpyHtoDAsync(dptr, hptr, nbytes, 0),
                              flush_l2=False)
                else:
                    t = bench(lambda: driver.cuMemcpyDtoHAsync(hptr, dptr, nbytes, 0),
                              flush_l2=False)
                report.add(case, "pinned (driver call)", t, gbps(nbytes, t.median_ms))
            except Exception as e:  # say so; the other rows stand
                console.print(f"[red]driver-call copy failed: {type(e).__name__}: {e}[/red]")
            if direction == "H2D":
                t = bench(lambda: t_gpu.copy_(t_pin, non_blocking=True), flush_l2=False)
            else:
                t = bench(lambda: t_pin.copy_(t_gpu, non_blocking=True), flush_l2=False)
            report.add(case, "pinned (torch copy_)", t, gbps(nbytes, t.median_ms), peer=True)
        assert np.array_equal(d.copy_to_host(), pageable)
        del d, pinned, t_gpu, t_pin
    report.print(console)
    console.print(f"saved {report.save()}")
    return report


# --- 2. calibrate the kernel ----------------------------------------------------------------
def _event_ms(fn, reps: int = 5) -> float:
    start, end = cuda.event(), cuda.event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def calibrate_iters(chunk: int, ratio: float) -> tuple[int, dict]:
    """iters such that one chunk's kernel takes ``ratio`` x one chunk's pinned copy in."""
    h = cuda.pinned_array(chunk, np.float32)
    h[:] = 1.0
    d_x, d_y = cuda.device_array(chunk, np.float32), cuda.device_array(chunk, np.float32)
    sp.launch_work(d_x, d_y, 1)  # compile
    t_copy = _event_ms(lambda: d_x.copy_to_device(h))
    probe = 256
    t_probe = _event_ms(lambda: sp.launch_work(d_x, d_y, probe))
    t_zero = _event_ms(lambda: sp.launch_work(d_x, d_y, 0))
    per_iter = max(t_probe - t_zero, 1e-6) / probe
    iters = max(0, round((ratio * t_copy - t_zero) / per_iter))
    return iters, {"copy_ms": t_copy, "kernel_ms_per_iter": per_iter, "kernel_ms_0": t_zero}


# --- 3. the pipeline ------------------------------------------------------------------------
def _median_run(pipe: sp.Pipeline, h_x, h_y, iters, **kw) -> sp.Timeline:
    pipe.run(h_x, h_y, iters, **kw)  # warm-up (and compile)
    runs = [pipe.run(h_x, h_y, iters, **kw) for _ in range(REPS)]
    runs.sort(key=lambda t: t.total_ms)
    return runs[len(runs) // 2]


def pipeline(console, n: int, streams: int, chunks: int, check):
    """Serial, one-stream chunked and pipelined runs over configurations; reports."""
    ms = BenchReport(LESSON, "pipeline_ms", metric="ms",
                     title=f"copy in -> kernel -> copy out, {n * 4 / 2**20:.0f} MiB float32 each way")
    eff = BenchReport(LESSON, "pipeline_efficiency", metric="ratio",
                      title="pipelined vs its ideal, and vs serial")
    h_x = cuda.pinned_array(n, np.float32)
    h_x[:] = np.random.default_rng(1).random(n, dtype=np.float32)
    h_y = cuda.pinned_array(n, np.float32)
    calib = {}
    timelines = {}
    configs = ([(1.0, streams, chunks, "pinned", "driver")]
               + [(1.0, k, chunks, "pinned", "driver") for k in (1, 2, 3, 8) if k != streams]
               + [(1.0, streams, c, "pinned", "driver") for c in (2, 4, 8, 32, 64)
                  if c != chunks]
               + [(r, streams, chunks, "pinned", "driver") for r in (0.25, 0.5, 2.0, 4.0)]
               + [(1.0, streams, chunks, "pinned", "numba"),
                  (1.0, streams, chunks, "pageable", "driver")])
    for ratio, k, c, memory, issue in configs:
        key = (ratio, c)
        if key not in calib:
            calib[key] = calibrate_iters(n // c, ratio)
        iters, cal = calib[key]
        if memory == "pageable":
            hx, hy = np.array(h_x), np.empty(n, np.float32)
        else:
            hx, hy = h_x, h_y
        serial = _median_run(sp.Pipeline(n, 1, 1, issue), hx, hy, iters, require_pinned=False)
        one = _median_run(sp.Pipeline(n, 1, c, issue), hx, hy, iters, require_pinned=False)
        pipe = _median_run(sp.Pipeline(n, k, c, issue), hx, hy, iters, require_pinned=False)
        check(hx, hy, iters)
        stages = one.stage_ms()
        ideal = sp.ideal_ms(stages, c)
        case = {"kernel/copy": ratio, "streams": k, "chunks": c, "host": memory,
                "issue": issue}
        extra = {"iters": iters, "stage_ms": stages, "calibration": cal,
                 "host_issue_ms": {"serial": serial.host_issue_ms, "one_stream":
                                   one.host_issue_ms, "pipelined": pipe.host_issue_ms}}
        ms.add(case, "serial (whole array)", None, serial.total_ms, **extra)
        ms.add(case, "1 stream, chunked", None, one.total_ms)
        ms.add(case, "pipelined", None, pipe.total_ms, host_issue_ms=pipe.host_issue_ms)
        ms.add(case, "ideal", None, ideal)
        eff.add(case, "ideal / pipelined", None, ideal / pipe.total_ms)
        eff.add(case, "serial / pipelined", None, serial.total_ms / pipe.total_ms)
        console.print(f"{case}: iters {iters}, stages {({s: round(v, 3) for s, v in stages.items()})}"
                      f" ms; serial {serial.total_ms:.2f}, pipelined {pipe.total_ms:.2f}, ideal "
                      f"{ideal:.2f} ms -> {100 * ideal / pipe.total_ms:.0f}% of ideal, "
                      f"{serial.total_ms / pipe.total_ms:.2f}x serial; host issued the "
                      f"pipeline in {pipe.host_issue_ms:.2f} ms")
        if (ratio, k, c, memory, issue) == configs[0]:
            timelines = {"serial": serial, "pipelined": pipe, "one_stream": one}
        elif memory == "pageable":
            timelines["pageable"] = pipe
        elif issue == "numba":
            timelines["numba_issue"] = pipe
    ms.print(console)
    eff.print(console)
    out = _out_dir()
    ms_path, eff_path = ms.save(), eff.save()
    tl_path = out / f"pipeline_timeline-{gpu_slug()}.json"
    dev = cuda.get_current_device()
    tl_path.write_text(json.dumps({
        "environment": environment(),
        "async_engine_count": _attr(dev, "ASYNC_ENGINE_COUNT"),
        "concurrent_kernels": _attr(dev, "CONCURRENT_KERNELS"),
        "timelines": {k: v.as_dict() for k, v in timelines.items()}}, indent=1) + "\n")
    plot_timeline(timelines, out / f"pipeline_timeline-{gpu_slug()}.png")
    plot_sweep(eff, out / f"pipeline_sweep-{gpu_slug()}.png", streams, chunks)
    console.print(f"saved {ms_path}, {eff_path}, {tl_path} and the plots")


def _attr(dev, name):
    try:
        return int(getattr(dev, name))
    except Exception:  # informational only
        return None


# --- plots ----------------------------------------------------------------------------------
COLORS = {"h2d": "tab:blue", "kernel": "tab:green", "d2h": "tab:orange"}


def plot_timeline(timelines: dict, png: Path, gpu: str | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [k for k in ("serial", "pipelined", "numba_issue", "pageable") if k in timelines]
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 1.2 + 1.35 * len(shown)),
                             squeeze=False)
    # one time axis for the pinned runs; the pageable run (5-10x longer) gets its own
    pinned_end = max(timelines[k].total_ms for k in shown if k != "pageable")
    for ax, key in zip(axes[:, 0], shown):
        if key != "pageable":
            ax.set_xlim(0, pinned_end * 1.02)
        tl = timelines[key].engine_view()
        for row, stage in enumerate(sp.STAGES):
            for o in (o for o in tl.ops if o.stage == stage):
                ax.barh(row, o.end_ms - o.start_ms, left=o.start_ms, color=COLORS[stage],
                        edgecolor="black", lw=0.3, alpha=0.6 + 0.4 * (o.stream % 2))
        ax.set_yticks(range(3), ["copy in (H2D)", "kernel (SMs)", "copy out (D2H)"])
        ax.invert_yaxis()
        shape = f"{tl.streams} streams x {tl.chunks} chunks"
        name = {"serial": "serial: whole array, one stream",
                "pageable": f"pipelined from pageable memory: {shape}",
                "numba_issue": f"pipelined, issued through Numba's copy/launch API: {shape} "
                               f"(host busy {tl.host_issue_ms:.1f} ms issuing)",
                }.get(key, f"pipelined: {shape} (host busy {tl.host_issue_ms:.1f} ms issuing)")
        ax.set_title(f"{name}: {tl.total_ms:.2f} ms", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms since the first event (bars: when each engine ran each op; "
                           "shades alternate by stream; the last panel has its own scale)")
    fig.suptitle(f"Timeline from CUDA events on {gpu or runtime.probe_gpu().name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def replot_timeline(json_path: Path, png: Path):
    """Redraw the Gantt chart from a saved pipeline_timeline JSON (no GPU needed)."""
    data = json.loads(Path(json_path).read_text())
    plot_timeline({k: sp.Timeline.from_dict(v) for k, v in data["timelines"].items()}, png,
                  gpu=data["environment"].get("gpu"))


def plot_sweep(eff: BenchReport, png: Path, streams: int, chunks: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in eff.rows if r.case["host"] == "pinned" and r.case["issue"] == "driver"]

    def series(vary, fixed):
        pts = {}
        for r in rows:
            if all(r.case[k] == v for k, v in fixed.items()):
                pts.setdefault(r.impl, []).append((r.case[vary], r.value))
        return {k: sorted(v) for k, v in pts.items()}

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (vary, fixed, xlabel) in zip(axes, (
            ("streams", {"kernel/copy": 1.0, "chunks": chunks}, f"streams ({chunks} chunks)"),
            ("chunks", {"kernel/copy": 1.0, "streams": streams}, f"chunks ({streams} streams)"),
            ("kernel/copy", {"streams": streams, "chunks": chunks},
             "kernel time / copy-in time per chunk"))):
        for impl, pts in series(vary, fixed).items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel(xlabel)
        if vary != "streams":
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ratio")
    axes[0].legend(fontsize=8)
    fig.suptitle("Pipeline: fraction of the ideal reached, and speedup over serial", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def run(console, n: int, streams: int, chunks: int, check):
    bandwidth(console)
    pipeline(console, n, streams, chunks, check)
