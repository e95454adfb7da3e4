"""Lesson 05: streams and overlap. Copy in -> kernel -> copy out, serial and pipelined.

Runs the serial version (whole array, one stream) and the chunked pipeline over
--streams streams and --chunks chunks, checks both outputs against the NumPy spec of the
kernel, and prints the pipeline's issue log (which chunk's copy or kernel went on which
stream, in which order). On a GPU it also prints each run's time from its CUDA events,
the ideal time, and a text timeline.

--bench (GPU only): pageable vs pinned copy bandwidth (vs torch), then the pipeline at
several stream counts, chunk counts and kernel/copy balances against serial and against
its ideal; saves JSON, the Gantt chart and the sweep plot.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # noqa: E401,E702
from common.cli import lesson_args  # noqa: E402


def _add_arguments(parser):
    parser.add_argument("--streams", type=int, default=4, help="streams of the pipeline (4)")
    parser.add_argument("--chunks", type=int, default=16, help="chunks the arrays are cut into (16)")
    parser.add_argument("--n", type=int, default=None,
                        help="elements (default 2^26 = 256 MiB on a GPU, 1000 under emulation)")
    parser.add_argument("--balance", type=float, default=1.0,
                        help="kernel time / copy-in time per chunk (GPU: calibrated; 1 = balanced)")
    parser.add_argument("--iters", type=int, default=None,
                        help="FMAs per element in the kernel, instead of --balance")


args = lesson_args(__doc__, _add_arguments)

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import stream_pipeline as sp  # noqa: E402
from common import runtime  # noqa: E402
from common.checks import assert_close  # noqa: E402

console = Console()
if not console.is_terminal:
    console = Console(width=120)


def check_output(h_x, h_y, iters, samples: int = 4096):
    """h_y == work_spec(h_x) on a random sample of elements (all of them if few)."""
    n = h_x.size
    idx = (np.arange(n) if n <= samples else
           np.random.default_rng(7).choice(n, samples, replace=False))
    tol = sp.spec_tolerance(iters)
    assert_close(h_y[idx], sp.work_spec(h_x[idx], iters), atol=tol, rtol=tol,
                 name=f"pipeline output (iters={iters})")


def issue_log_table(tl: sp.Timeline, limit: int = 12) -> Table:
    table = Table(title=f"issue log of {tl.label} (first {min(limit, len(tl.ops))} of "
                        f"{len(tl.ops)} operations, in the order the host issued them)")
    for col in ("#", "chunk", "stage", "stream", "elements"):
        table.add_column(col, justify="right")
    if tl.timed:
        table.add_column("stream reached it (ms)", justify="right")
        table.add_column("ran (ms)", justify="right")
    for k, o in enumerate(tl.ops[:limit]):
        row = [str(k), str(o.chunk), o.stage, str(o.stream), f"[{o.lo:,}, {o.hi:,})"]
        if tl.timed:
            row += [f"{o.ready_ms:.3f}", f"{o.start_ms:.3f} - {o.end_ms:.3f}"]
        table.add_row(*row)
    return table


def text_timeline(tl: sp.Timeline, width: int = 100) -> str:
    """The Gantt chart in characters: one row per engine, a letter per chunk."""
    scale = width / tl.total_ms
    lines = []
    for stage, name in zip(sp.STAGES, ("H2D   ", "kernel", "D2H   ")):
        row = [" "] * (width + 1)
        for o in (o for o in tl.ops if o.stage == stage):
            for c in range(int(o.start_ms * scale), max(int(o.end_ms * scale), int(o.start_ms * scale) + 1)):
                row[min(c, width)] = "0123456789abcdefghijklmnopqrstuvwxyz"[o.chunk % 36]
        lines.append(f"{name} |{''.join(row)}|")
    return "\n".join(lines)


def calibrated_iters(n: int, chunks: int) -> int:
    if args.iters is not None:
        return args.iters
    if runtime.is_emulated():
        return 4
    import streams_bench
    iters, cal = streams_bench.calibrate_iters(n // chunks, args.balance)
    console.print(f"calibrated: copy in of one chunk {cal['copy_ms']:.3f} ms, kernel "
                  f"{cal['kernel_ms_per_iter'] * 1e3:.3f} us per FMA per element -> "
                  f"iters = {iters} for kernel/copy = {args.balance}")
    return iters


def main():
    n = args.n or runtime.pick(2**26, 1000)
    if args.bench:
        import streams_bench
        streams_bench.run(console, n, args.streams, args.chunks, check_output)
        return
    iters = calibrated_iters(n, args.chunks)
    h_x = cuda.pinned_array(n, np.float32)
    h_x[:] = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    h_y = cuda.pinned_array(n, np.float32)

    h_y[:] = np.nan
    serial = sp.serial(h_x, h_y, iters)
    check_output(h_x, h_y, iters)
    h_y[:] = np.nan
    pipe = sp.Pipeline(n, args.streams, args.chunks)
    pipe.run(h_x, h_y, iters)  # first run compiles and warms up
    h_y[:] = np.nan
    tl = pipe.run(h_x, h_y, iters)
    check_output(h_x, h_y, iters)
    console.print(f"serial and pipelined ({args.streams} streams x {args.chunks} chunks, "
                  f"{iters} FMAs per element) both match the NumPy spec on {n:,} elements.")
    console.print(issue_log_table(tl))
    if runtime.is_emulated():
        console.print("[yellow]Emulation: the simulator runs streams synchronously and its "
                      "events carry no time; the issue log above is what the GPU would be "
                      "given. Run on a GPU (or see the README) for the timeline.[/yellow]")
    else:
        one = sp.Pipeline(n, 1, args.chunks).run(h_x, h_y, iters)
        ideal = sp.ideal_ms(one.stage_ms(), args.chunks)
        console.print(f"serial {serial.total_ms:.2f} ms, pipelined {tl.total_ms:.2f} ms, "
                      f"ideal {ideal:.2f} ms: {100 * ideal / tl.total_ms:.0f}% of ideal, "
                      f"{serial.total_ms / tl.total_ms:.2f}x serial (the host spent "
                      f"{tl.host_issue_ms:.2f} ms issuing the pipeline)")
        console.print(text_timeline(serial), highlight=False)
        console.print(text_timeline(tl), highlight=False)
    console.rule("[green]lesson 05: every check passed[/green]")


if __name__ == "__main__":
    main()
