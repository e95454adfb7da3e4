"""Lesson 02: vector add, out = a + b, as fast as the memory system allows.

Without --bench: runs every kernel (Numba: one element per thread, grid-stride loop,
several elements per thread; Triton: masked blocks) on float32 / float16 / bfloat16 at
a ragged size, checks each bit for bit against the spec float32(a) + float32(b) rounded
once, and prints a table.

--bench (GPU only), every kernel beside torch's `a + b` in the same run:
  * sweep: GB/s against n = 2^10 .. 2^28 (float32), timed as CUDA-graph replays without
    flushing L2 - small sizes show the launch-bound and cache-resident regimes on purpose;
  * large: n = 2^28 in each dtype, L2 flushed, as a fraction of the measured copy
    bandwidth (bytes read + written);
  * ilp: the Numba kernel with 1, 2, 4, 8, 16 elements per thread;
  * triton_block: BLOCK_SIZE 256 / 1024 / 4096;
  * launch: microseconds per call at n = 2^10 without graphs (host overhead shows).
Saves results/<name>-<gpu>.json and results/sweep-<gpu>.png (or under $RESULTS_DIR).
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # noqa: E401,E702
from common.cli import lesson_args  # noqa: E402

args = lesson_args(__doc__)

import os  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import vector_add_numba as vn  # noqa: E402
import vector_add_triton as vt  # noqa: E402
from common import runtime  # noqa: E402
from common.checks import assert_close, max_abs_error, poisoned  # noqa: E402

LESSON = "02_vector_add"
console = Console()
DEV = runtime.torch_device()


def spec(a, b):
    """What every kernel must compute: one float32 addition, rounded once to the dtype."""
    return (a.float() + b.float()).to(a.dtype)


def impls_for(dtype):
    out = {name: fn for name, fn in vn.VARIANTS.items() if dtype in vn.DTYPES}
    out["triton"] = vt.add
    return out


def check_all():
    n = runtime.pick(2**24 + 3, 1000)  # never a multiple of a block
    table = Table(title=f"out = a + b, n = {n:,}: every kernel against float32(a) + float32(b)")
    for col in ("kernel", "dtype", "max |error|", "check"):
        table.add_column(col)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        a = torch.randn(n, generator=g).to(dtype).to(DEV)
        b = (100 * torch.randn(n, generator=g)).to(dtype).to(DEV)
        want = spec(a, b)
        # The interpreter rounds float32 -> bfloat16 by truncation (1 ulp); GPUs round.
        rtol = 2.0**-7 if runtime.is_emulated() and dtype == torch.bfloat16 else 0.0
        for name, fn in impls_for(dtype).items():
            out = poisoned((n,), dtype, DEV)
            fn(a, b, out=out)
            assert_close(out, want, atol=0, rtol=rtol, name=f"{name} {dtype}")
            table.add_row(name, str(dtype).replace("torch.", ""), f"{max_abs_error(out, want):.3g}",
                          "[green]bit-exact[/green]" if rtol == 0 else "[green]within 1 ulp[/green]")
        if dtype == torch.bfloat16:
            table.add_row("numba (all)", "bfloat16", "-", "[yellow]rejected: Numba has no "
                          "bfloat16 arrays[/yellow]")
    console.print(table)


# ------------------------------------------------------------------------------------------
# Benchmark (GPU only)

def results_dir() -> Path:
    return Path(os.environ.get("RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def bench_all():
    from common.ceilings import measure_ceilings
    from common.results import BenchReport, gpu_slug
    from common.timing import bench, gbps

    ceil = measure_ceilings()
    copy = ceil["copy_gbps"]
    console.print(f"measured ceilings: copy {copy:,.0f} GB/s, bf16 matmul {ceil['bf16_tflops']:,.0f} TFLOPS")

    def time_it(fn, **kw):
        """bench(), falling back to plain events if a launch cannot be graph-captured."""
        try:
            return bench(fn, **kw), "graph" if kw.get("cuda_graph") else "events"
        except Exception as e:  # noqa: BLE001 - report and measure the other way
            console.print(f"[yellow]graph capture failed ({type(e).__name__}: {e}); "
                          "timing with events[/yellow]")
            torch.cuda.synchronize()
            kw.pop("cuda_graph", None)
            return bench(fn, **kw), "events"

    n_max = 2**28
    g = torch.Generator(device="cuda").manual_seed(0)
    a32 = torch.randn(n_max, device="cuda", generator=g)
    b32 = torch.randn(n_max, device="cuda", generator=g)
    o32 = torch.empty_like(a32)

    # --- 1. sweep: GB/s vs n, float32 ------------------------------------------------------
    sweep = BenchReport(LESSON, "sweep", "GB/s", ceilings=ceil,
                        title="out = a + b, float32: GB/s vs n (CUDA-graph replays, L2 not flushed)")
    impls = {**impls_for(torch.float32), "torch a+b": lambda a, b, out: torch.add(a, b, out=out)}
    for p in range(10, 29):
        n = 2**p
        a, b, out = a32[:n], b32[:n], o32[:n]
        nbytes = 3 * n * 4  # read a, read b, write out: 4 bytes each per element
        for name, fn in impls.items():
            t, how = time_it(lambda: fn(a, b, out=out), flush_l2=False, cuda_graph=True)
            sweep.add({"n": f"2^{p}"}, name, t, gbps(nbytes, t.median_ms), peer=name.startswith("torch"),
                      timing_mode=how, bytes=nbytes)
    sweep.print()
    sweep.save(results_dir() / f"sweep-{gpu_slug()}.json")
    plot_sweep(sweep, copy, results_dir() / f"sweep-{gpu_slug()}.png")

    # --- 2. n = 2^28 in every dtype, L2 flushed, as % of the copy bandwidth ------------------
    large = BenchReport(LESSON, "large", "GB/s", ceilings=ceil,
                        title=f"out = a + b, n = 2^28: GB/s (copy ceiling {copy:,.0f} GB/s)")
    pct = BenchReport(LESSON, "large_pct", "% of copy", ceilings=ceil,
                      title="out = a + b, n = 2^28: % of the measured copy bandwidth")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        a, b = a32.to(dtype), b32.to(dtype)
        out = torch.empty_like(a)
        nbytes = 3 * n_max * a.element_size()
        case = {"n": "2^28", "dtype": str(dtype).replace("torch.", "")}
        for name, fn in {**impls_for(dtype), "torch a+b": impls["torch a+b"]}.items():
            t = bench(lambda: fn(a, b, out=out))
            v = gbps(nbytes, t.median_ms)
            large.add(case, name, t, v, peer=name.startswith("torch"), bytes=nbytes)
            pct.add(case, name, t, 100 * v / copy, peer=name.startswith("torch"))
        del a, b, out
    large.print()
    pct.print()
    large.save(results_dir() / f"large-{gpu_slug()}.json")
    pct.save(results_dir() / f"large_pct-{gpu_slug()}.json")

    # --- 3. Numba: elements per thread ----------------------------------------------------
    ilp = BenchReport(LESSON, "ilp", "GB/s", ceilings=ceil,
                      title="Numba add_kernel_ilp, n = 2^28 float32: elements per thread")
    for e in (1, 2, 4, 8, 16):
        t = bench(lambda: vn.add_ilp(a32, b32, out=o32, elems_per_thread=e))
        v = gbps(3 * n_max * 4, t.median_ms)
        ilp.add({"elems/thread": e}, "numba ilp", t, v, pct_of_copy=100 * v / copy)
    ilp.print()
    ilp.save(results_dir() / f"ilp-{gpu_slug()}.json")

    # --- 4. Triton: BLOCK_SIZE ------------------------------------------------------------
    blk = BenchReport(LESSON, "triton_block", "GB/s", ceilings=ceil,
                      title="Triton add_kernel, n = 2^28 float32, num_warps=4: BLOCK_SIZE")
    for bs in (256, 1024, 4096):
        t = bench(lambda: vt.add(a32, b32, out=o32, block_size=bs))
        v = gbps(3 * n_max * 4, t.median_ms)
        blk.add({"BLOCK_SIZE": bs}, "triton", t, v, pct_of_copy=100 * v / copy)
    blk.print()
    blk.save(results_dir() / f"triton_block-{gpu_slug()}.json")

    # --- 5. launch overhead: n = 2^10, no graph, so the host's time per call shows ---------
    launch = BenchReport(LESSON, "launch", "us per call", ceilings=ceil,
                         title="n = 2^10 float32, launched from Python one by one (no CUDA graph)")
    a, b, out = a32[:1024], b32[:1024], o32[:1024]
    for name, fn in impls.items():
        t = bench(lambda: fn(a, b, out=out), flush_l2=False)
        tg = bench(lambda: fn(a, b, out=out), flush_l2=False, cuda_graph=True)
        launch.add({"n": "2^10", "timing": "python loop"}, name, t, 1000 * t.median_ms,
                   peer=name.startswith("torch"))
        launch.add({"n": "2^10", "timing": "cuda graph"}, name, tg, 1000 * tg.median_ms,
                   peer=name.startswith("torch"))
    launch.print()
    launch.save(results_dir() / f"launch-{gpu_slug()}.json")


def plot_sweep(report, copy_gbps, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    fig, ax = plt.subplots(figsize=(9, 5.5))
    impls = list(dict.fromkeys(r.impl for r in report.rows))
    for impl in impls:
        rows = [r for r in report.rows if r.impl == impl]
        xs = [2 ** int(r.case["n"].split("^")[1]) for r in rows]
        ax.plot(xs, [r.value for r in rows], marker="o", ms=3,
                ls="--" if impl.startswith("torch") else "-", label=impl)
    ax.axhline(copy_gbps, color="k", lw=1, ls=":")
    ax.text(2**10, copy_gbps * 1.03, f"measured copy bandwidth {copy_gbps:,.0f} GB/s", fontsize=8)
    # 3 arrays of n float32 fit in L2 up to n = L2 / 12 bytes.
    n_l2 = l2 / 12
    ax.axvline(n_l2, color="grey", lw=1)
    ax.text(n_l2 * 1.1, copy_gbps * 0.1, f"a, b, out\nfill L2\n({l2 / 2**20:.0f} MiB)", fontsize=8)
    ax.text(2**10.2, copy_gbps * 0.55, "launch-bound:\ntime ~ constant,\nGB/s grows with n", fontsize=8)
    ax.text(2**17, copy_gbps * 1.25, "cache-resident:\nL2 can beat HBM", fontsize=8)
    ax.text(2**24, copy_gbps * 0.55, "HBM-bound", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (float32 elements)")
    ax.set_ylabel("GB/s (bytes read + written / time)")
    gpu = report.to_dict()["environment"].get("gpu")
    ax.set_title(f"out = a + b on {gpu}: CUDA-graph replays, L2 not flushed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    console.print(f"plot: {path}")


if __name__ == "__main__":
    if args.bench:
        check_all()
        bench_all()
    else:
        check_all()
