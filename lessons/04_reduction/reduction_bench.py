"""Lesson 04's benchmark (GPU only): bandwidth of every rung, and measured errors vs n.

Two reports, each saved as JSON with a plot beside it (``results/`` or ``$RESULTS_DIR``):

* ``reduction_bandwidth``: every rung, sum and max, on 2^28 float32 (1 GiB), in GB/s
  = 4 bytes x n / time (each element read once; the partials are < 0.2% more), beside
  ``torch.sum`` / ``torch.amax`` measured in the same run. Times are
  ``common.timing.bench`` medians (L2 flushed before each repetition). The grid-stride
  rungs are also swept over blocks per SM.
* ``reduction_errors``: relative error |s - exact| / sum|x| of every rung's float32 sum of
  uniform [0, 1) data against n = 2^10 ... 2^28, with torch.sum, NumPy's float32 sum
  (pairwise) and a sequential float32 sum (``np.cumsum``) on the same data; "exact" is
  the float64 sum of the same float32 numbers (torch, on the GPU).
"""

from __future__ import annotations

import numpy as np
import torch

import parallel_reduction as pr
import reduction_order as ro
from common import runtime
from common.ceilings import measure_ceilings
from common.results import BenchReport
from common.timing import bench, gbps

N_BENCH = 2**28
PEERS = {"sum": torch.sum, "max": torch.amax}
PEER = "torch (sum / amax)"


def bandwidth(console) -> BenchReport:
    ceilings = measure_ceilings()
    report = BenchReport("04_reduction", "reduction_bandwidth", metric="GB/s",
                         ceilings=ceilings,
                         title="reduction of 2^28 float32 (1 GiB): every rung vs torch, GB/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(N_BENCH, device="cuda", generator=gen) * 2 - 1
    nbytes = 4 * N_BENCH  # every element read once; partials (< 0.2%) not counted
    for op in ("sum", "max"):
        case = {"op": op, "n": N_BENCH}
        peer_fn = PEERS[op]
        t_peer = bench(lambda: peer_fn(x))
        ref = peer_fn(x).item()
        for rung, r in pr.RUNGS.items():
            plan = pr.ReductionPlan(x, op, rung)  # launches only: no per-call setup timed
            t = bench(plan)
            got = plan().item()  # the timed computation, checked
            if op == "max":
                assert got == ref, (rung, got, ref)
            else:
                assert abs(got - ref) <= 1e-3 * x.abs().sum().item(), (rung, got, ref)
            v = gbps(nbytes, t.median_ms)
            report.add(case, r.title, t, v, launches=len(pr.passes(rung, N_BENCH)),
                       grid=pr.passes(rung, N_BENCH)[0][0], block=pr.BLOCK,
                       pct_of_copy=round(100 * v / ceilings["copy_gbps"], 1))
        report.add(case, PEER, t_peer, gbps(nbytes, t_peer.median_ms), peer=True)
    report.print(console)
    path = report.save()
    _plot_bandwidth(report, ceilings, path.with_suffix(".png"))
    console.print(f"saved {path} and {path.with_suffix('.png').name}")

    # Blocks per SM of the grid-stride rungs (8 x 256 threads fill an H100 SM once).
    sweep = BenchReport("04_reduction", "reduction_grid_sweep", metric="GB/s",
                        ceilings=ceilings,
                        title="grid-stride rungs, sum of 2^28 float32: blocks per SM")
    t_peer = bench(lambda: torch.sum(x))
    for bps in (1, 2, 4, 8, 16, 32):
        case = {"blocks/SM": bps, "grid": pr.grid_stride_blocks(N_BENCH, blocks_per_sm=bps)}
        for rung in ("grid_stride_atomic", "grid_stride_two_pass"):
            t = bench(pr.ReductionPlan(x, "sum", rung, blocks_per_sm=bps))
            sweep.add(case, pr.RUNGS[rung].title, t, gbps(nbytes, t.median_ms))
        sweep.add(case, "torch.sum", t_peer, gbps(nbytes, t_peer.median_ms), peer=True)
    sweep.print(console)
    console.print(f"saved {sweep.save()}")
    del x
    return report


def errors(console) -> BenchReport:
    report = BenchReport("04_reduction", "reduction_errors", metric="relative error",
                         title="float32 sum of uniform [0,1) data: |s - exact| / sum|x|")
    gen = torch.Generator(device="cuda").manual_seed(1)
    for k in range(10, 29, 2):
        n = 2**k
        x = torch.rand(n, device="cuda", generator=gen)
        exact = x.double().sum().item()  # float64 sum of the same float32 numbers
        x_np = x.cpu().numpy()
        results = {r.title: (pr.reduce(x, "sum", rung).item(),
                             ro.rounding_depth(n, rung, pr.BLOCK, pr.passes(rung, n)))
                   for rung, r in pr.RUNGS.items()}
        results["torch.sum"] = (x.sum().item(), None)
        results["numpy.sum (pairwise)"] = (float(np.sum(x_np)), None)
        results["sequential (cumsum)"] = (float(ro.sequential_sum(x_np)), n - 1)
        for name, (s, depth) in results.items():
            rel = abs(s - exact) / exact
            extra = {} if depth is None else {"depth": depth, "bound": ro.gamma(depth)}
            report.add({"n": n}, name, None, rel, peer=name.startswith(("torch", "numpy")),
                       **extra)
        del x, x_np
    report.print(console)
    path = report.save()
    _plot_errors(report, path.with_suffix(".png"))
    console.print(f"saved {path} and {path.with_suffix('.png').name}")
    return report


def _plot_bandwidth(report, ceilings, png, gpu=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    names = list(dict.fromkeys(r.impl for r in report.rows))  # rungs, then the peer
    ys = np.arange(len(names))
    for k, (op, color) in enumerate((("sum", "tab:blue"), ("max", "tab:orange"))):
        vals = [next(r.value for r in report.rows if r.impl == nm and r.case["op"] == op)
                for nm in names]
        ax.barh(ys + (k - 0.5) * 0.38, vals, height=0.38, color=color, label=op)
        peer = next(r for r in report.rows if r.peer and r.case["op"] == op)
        ax.axvline(peer.value, color=color, ls=":",
                   label=f"torch.{'sum' if op == 'sum' else 'amax'}: {peer.value:,.0f} GB/s")
    ax.axvline(ceilings["copy_gbps"], color="gray", ls="--",
               label=f"copy ceiling {ceilings['copy_gbps']:,.0f} GB/s")
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s (4 bytes per element read)")
    ax.set_title(f"Reduction of 2^28 float32 on {gpu or runtime.probe_gpu().name}")
    ax.legend(loc="upper right", fontsize=8)  # over the short bars of rungs 1-3
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _plot_errors(report, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    impls = list(dict.fromkeys(r.impl for r in report.rows))
    markers = "os^v<>Dph*xP+"
    for k, impl in enumerate(impls):
        rows = [r for r in report.rows if r.impl == impl]
        ns = [r.case["n"] for r in rows]
        vals = [max(r.value, 1e-12) for r in rows]  # an exact result (0) drawn at the floor
        ls = "--" if impl.startswith("sequential") else "-"
        ax.plot(ns, vals, ls, marker=markers[k % len(markers)], ms=4, label=impl, alpha=0.85)
    ns = np.array(sorted({r.case["n"] for r in report.rows}), dtype=float)
    ax.plot(ns, [ro.gamma(int(np.ceil(np.log2(n)))) for n in ns], "k:",
            label="bound, balanced tree: gamma(log2 n)")
    ax.plot(ns, np.sqrt(np.log2(ns)) * ro.U, "k-.", lw=0.8,
            label="typical, balanced tree: sqrt(log2 n) u")
    ax.plot(ns, np.minimum((ns - 1) * ro.U, 1.0), color="gray", ls=":",
            label="bound, sequential: gamma(n-1)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(1e-12, 2)
    ax.set_xlabel("n (float32, uniform [0, 1))")
    ax.set_ylabel("|s - exact| / sum|x|  (0 drawn at 1e-12)")
    ax.set_title("Error of each order of summation")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def graph_check(console) -> BenchReport:
    """The same kernels timed as CUDA-graph replays (no host launch gaps at all, no L2
    flush: 1 GiB does not fit in L2 anyway), to show the plain timings above are not
    inflated by Numba's host-side launch cost. Run last: a failed capture cannot spoil
    the other measurements."""
    report = BenchReport("04_reduction", "reduction_graph_check", metric="GB/s",
                         title="sum of 2^28 float32, timed as CUDA-graph replays vs plain")
    x = torch.rand(N_BENCH, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    nbytes = 4 * N_BENCH
    fns = {pr.RUNGS[r].title: pr.ReductionPlan(x, "sum", r)
           for r in ("warp_shuffle", "grid_stride_atomic", "grid_stride_two_pass")}
    fns["torch.sum"] = lambda: torch.sum(x)
    for name, fn in fns.items():
        for mode in ("plain", "cuda graph"):
            try:
                t = bench(fn, cuda_graph=(mode == "cuda graph"))
            except Exception as e:  # report, do not hide: the plain timing still stands
                console.print(f"[red]{name} {mode}: {type(e).__name__}: {e}[/red]")
                continue
            report.add({"timing": mode}, name, t, gbps(nbytes, t.median_ms),
                       peer=name.startswith("torch"))
    report.print(console)
    console.print(f"saved {report.save()}")
    return report


def replot(results_dir):
    """Redraw both plots from saved JSON (no GPU needed)."""
    import json
    from pathlib import Path
    from types import SimpleNamespace
    for path in Path(results_dir).glob("reduction_*-*.json"):
        data = json.loads(path.read_text())
        rep = SimpleNamespace(rows=[SimpleNamespace(**{k: r[k] for k in ("case", "impl", "value",
                                                                         "peer")})
                                    for r in data["rows"]])
        if data["name"] == "reduction_bandwidth":
            _plot_bandwidth(rep, data["ceilings"], path.with_suffix(".png"),
                            gpu=data["environment"]["gpu"])
        elif data["name"] == "reduction_errors":
            _plot_errors(rep, path.with_suffix(".png"))


def run(console):
    bandwidth(console)
    errors(console)
    graph_check(console)
