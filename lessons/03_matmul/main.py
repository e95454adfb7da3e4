"""Lesson 03: matrix multiply, a ladder from one thread per element to tensor cores.

Without --bench: runs every rung (Numba float32: naive, shared-memory tiles, register
blocking; Triton fp16/bf16 on tensor cores, pointer loads and TMA descriptors) on a
ragged problem, row-major and as strided views, checks each against a float64
reference and against torch.matmul in the same precision, prints a table.

--bench (GPU only), torch.matmul (cuBLAS) measured in the same run as the peer:
  * sweep: TFLOPS for square sizes 512 .. 8192, every rung, cuBLAS fp32 (TF32 off and
    on) and bf16; fp16 at 4096 and 8192; each output checked against cuBLAS;
  * ladder / ladder_pct: the rungs at 4096^3 and 8192^3, as a fraction of the compute
    roofline of the unit they use and of cuBLAS in the same precision;
  * ablation: grouped ordering and pipeline depth for the best Triton configuration.
Saves results/<name>-<gpu>.json and results/sweep-<gpu>.png (or under $RESULTS_DIR).
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # noqa: E401,E702
from common.cli import lesson_args  # noqa: E402


def _add_arguments(parser):
    parser.add_argument("--sizes", default="512,1024,2048,4096,8192",
                        help="--bench: square sizes to sweep (comma-separated)")


args = lesson_args(__doc__, _add_arguments)

import os  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import matmul_numba as mn  # noqa: E402
import matmul_triton as mt  # noqa: E402
from common import runtime  # noqa: E402
from common.checks import assert_close, assert_error_within, poisoned, rel_error  # noqa: E402

LESSON = "03_matmul"
console = Console()
DEV = runtime.torch_device()


def set_tf32(on: bool):
    """cuBLAS float32: TF32 tensor cores on or off (torch's default for matmul is off)."""
    torch.backends.cuda.matmul.allow_tf32 = on


def reference(a, b):
    return a.double() @ b.double()


def check_result(name, out, a, b):
    """A kernel's C against float64, no worse than torch.matmul in the same precision."""
    ref = reference(a, b)
    set_tf32(False)
    baseline = a @ b
    K = a.shape[1]
    # float32: summation order only; 16-bit: the final rounding dominates.
    slack = 1e-5 * K**0.5 if out.dtype == torch.float32 else 1e-3
    if runtime.is_emulated() and out.dtype == torch.bfloat16:
        slack += 2.0**-7 * ref.abs().max().item()  # interpreter: fp32 -> bf16 truncates (1 ulp)
    assert_error_within(out, baseline, ref, factor=4 if out.dtype == torch.float32 else 2,
                        slack=slack, name=name)
    if out.dtype != torch.float32:
        assert_close(out, ref, dtype=out.dtype, name=name)
    return rel_error(out, ref)


def check_all():
    M, N, K = runtime.pick((999, 1000, 1000), (33, 24, 40))  # TMA needs N, K multiples of 8
    table = Table(title=f"C = A @ B, M, N, K = {M}, {N}, {K}: every rung against float64")
    for col in ("kernel", "dtype", "inputs", "rel. error", "check"):
        table.add_column(col)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = torch.randn(M, K, generator=g).to(dtype).to(DEV)
        bt = torch.randn(N, K, generator=g).to(dtype).to(DEV)
        views = {"row-major": (a, bt.t().contiguous()), "B = bt.t() (strided)": (a, bt.t())}
        if dtype == torch.float32:
            kernels = dict(mn.RUNGS)
        else:
            kernels = {"triton tma": lambda x, y, out: mt.matmul(x, y, out, use_tma=None),
                       "triton pointers": lambda x, y, out: mt.matmul(x, y, out, use_tma=False)}
        for label, (x, y) in views.items():
            for name, fn in kernels.items():
                if name == "triton tma" and not mt.tma_compatible(x, y):
                    name = "triton (falls back to pointers)"
                out = poisoned((M, N), dtype, DEV)
                fn(x, y, out=out)
                err = check_result(name, out, x, y)
                table.add_row(name, str(dtype).replace("torch.", ""), label, f"{err:.2e}",
                              "[green]ok[/green]")
    console.print(table)
    if runtime.is_emulated():
        console.print("[dim]Under the interpreter the Triton kernels multiply fp32 copies of "
                      "the tiles (DOT_FP32): its 16-bit tl.dot is broken.[/dim]")


# ------------------------------------------------------------------------------------------
# Benchmark (GPU only)

def results_dir() -> Path:
    return Path(os.environ.get("RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def rooflines():
    """Compute ceilings of the two units, from the device (FP32) or the datasheet (bf16)."""
    from numba import cuda
    dev = cuda.get_current_device()
    sms, clock_hz = dev.MULTIPROCESSOR_COUNT, dev.CLOCK_RATE * 1e3
    fp32 = sms * 128 * 2 * clock_hz / 1e12  # 128 FP32 FMA lanes per SM, 2 FLOPs per FMA
    name = torch.cuda.get_device_name()
    # Dense 16-bit tensor-core peak: 989 TFLOPS on H100 SXM / H200 (datasheet; 4096 FLOP
    # per SM per clock at 1.83 GHz); elsewhere the same per-clock rate at the max clock.
    tc = 989.4 if ("H100" in name and "PCIe" not in name) or "H200" in name else \
        sms * 4096 * clock_hz / 1e12
    return {"fp32_fma_tflops": fp32, "tensor_16bit_tflops": tc,
            "how": f"FP32: {sms} SMs x 256 FLOP/clk x {clock_hz / 1e9:.2f} GHz; 16-bit: "
                   + ("datasheet dense bf16" if tc == 989.4 else "SMs x 4096 FLOP/clk x clock")}


def bench_all():
    from common.ceilings import measure_ceilings
    from common.results import BenchReport, gpu_slug
    from common.timing import bench, tflops

    ceil = measure_ceilings()
    roof = rooflines()
    ceil = dict(ceil, **roof)
    console.print(f"ceilings: {ceil}")
    sizes = [int(s) for s in args.sizes.split(",")]
    sweep = BenchReport(LESSON, "sweep", "TFLOPS", ceilings=ceil,
                        title="C = A @ B, square sizes: TFLOPS (2*M*N*K / time)")
    g = torch.Generator(device="cuda").manual_seed(0)
    results = {}  # (impl, size) -> TFLOPS

    def run(size, dtype, name, fn, peer=False, check_against=None, **extra):
        a, b = operands[dtype]
        t = bench(lambda: fn(a, b), rep_ms=60)
        v = tflops(2 * size**3, t.median_ms)  # 2 FLOPs (multiply + add) per term of each sum
        if check_against is not None:  # the number counts only if the result is right
            out = fn(a, b)
            assert_close(out, check_against, dtype=dtype, atol=0.05 if dtype != torch.float32 else 1e-3,
                         rtol=0.05 if dtype != torch.float32 else 1e-3, name=f"{name} {size}")
        sweep.add({"size": f"{size}^3"}, name, t, v, peer=peer, dtype=str(dtype), **extra)
        results[(name, size)] = v
        console.print(f"  {size:5d} {name:34s} {t.median_ms:9.3f} ms {v:8.1f} TFLOPS")
        return v

    for size in sizes:
        operands = {dt: (torch.randn(size, size, device="cuda", generator=g).to(dt),
                         torch.randn(size, size, device="cuda", generator=g).to(dt))
                    for dt in (torch.float32, torch.bfloat16, torch.float16)}
        console.rule(f"{size}^3")
        # float32: cuBLAS with TF32 off is the peer of the Numba rungs.
        set_tf32(False)
        a, b = operands[torch.float32]
        ref32 = a @ b
        run(size, torch.float32, "cuBLAS fp32 (TF32 off)", lambda x, y: x @ y, peer=True)
        set_tf32(True)
        run(size, torch.float32, "cuBLAS fp32 (TF32 on)", lambda x, y: x @ y, peer=True)
        set_tf32(False)
        for name, fn in mn.RUNGS.items():
            if name == "numba naive" and size > 4096:
                continue  # ~0.5 s per call at 8192^3; its place on the ladder is clear at 4096
            run(size, torch.float32, name, fn, check_against=ref32)
        # bf16 (and fp16 at the two large sizes): tensor cores. These kernels run near
        # the card's power limit, where clocks (and times) drift by several percent with
        # what ran just before (seen in our first run: the same Triton config measured
        # 690 and 766 TFLOPS minutes apart). So the group is timed round-robin, twice,
        # and each keeps its better median: same treatment for cuBLAS and Triton.
        dtypes = (torch.bfloat16, torch.float16) if size >= 4096 else (torch.bfloat16,)
        for dt in dtypes:
            tag = "bf16" if dt == torch.bfloat16 else "fp16"
            a, b = operands[dt]
            ref = a @ b
            group = {f"cuBLAS {tag}": (lambda x, y: x @ y, None),
                     f"triton {tag} tma": (lambda x, y: mt.matmul(x, y, use_tma=True),
                                           lambda: mt.best_config(True)),
                     f"triton {tag} tma persistent": (
                         lambda x, y: mt.matmul(x, y, use_tma=True, persistent=True),
                         lambda: mt.best_config(True, persistent=True))}
            if dt == torch.bfloat16:
                group[f"triton {tag} pointers"] = (lambda x, y: mt.matmul(x, y, use_tma=False),
                                                   lambda: mt.best_config(False))
            configs = {}
            for name, (fn, cfg) in group.items():  # autotune + check before any timing
                if not name.startswith("cuBLAS"):
                    out = fn(a, b)
                    assert_close(out, ref, dtype=dt, atol=0.05, rtol=0.05, name=f"{name} {size}")
                    configs[name] = cfg()
            timings = {name: [] for name in group}
            for _ in range(2):
                for name, (fn, _cfg) in group.items():
                    timings[name].append(bench(lambda: fn(a, b), rep_ms=60))
            for name, ts in timings.items():
                t = min(ts, key=lambda x: x.median_ms)
                v = tflops(2 * size**3, t.median_ms)
                extra = {"rounds_median_ms": [x.median_ms for x in ts]}
                if name in configs:
                    extra["best_config"] = configs[name]
                sweep.add({"size": f"{size}^3"}, name, t, v, peer=name.startswith("cuBLAS"),
                          dtype=str(dt), **extra)
                results[(name, size)] = v
                console.print(f"  {size:5d} {name:34s} {t.median_ms:9.3f} ms {v:8.1f} TFLOPS "
                              f"(rounds: {', '.join(f'{x.median_ms:.4f}' for x in ts)} ms)")
        del operands
        torch.cuda.empty_cache()

    sweep.print()
    sweep.save(results_dir() / f"sweep-{gpu_slug()}.json")
    plot(sweep, results_dir() / f"sweep-{gpu_slug()}.png")

    # --- the ladder at 4096^3 and 8192^3 ------------------------------------------------------
    big = [s for s in (4096, 8192) if s in sizes]
    ladder = BenchReport(LESSON, "ladder", "TFLOPS", ceilings=ceil,
                         title="The ladder: TFLOPS at 4096^3 and 8192^3")
    pct = BenchReport(LESSON, "ladder_pct", "%", ceilings=ceil,
                      title="The ladder: % of the unit's roofline and % of cuBLAS, same precision")
    rungs = [("1. naive (FP32 FMA)", "numba naive", "fp32"),
             ("2. shared-memory tiles 16x16", "numba tiled 16x16", "fp32"),
             ("3. register blocking 128x128, 8x8/thread", "numba regblock 128x128/8x8", "fp32"),
             ("cuBLAS fp32, TF32 off (peer)", "cuBLAS fp32 (TF32 off)", "fp32"),
             ("4. Triton tensor cores bf16, pointers", "triton bf16 pointers", "bf16"),
             ("4. Triton tensor cores bf16, TMA", "triton bf16 tma", "bf16"),
             ("4. Triton tensor cores bf16, TMA persistent", "triton bf16 tma persistent", "bf16"),
             ("Triton tensor cores fp16, TMA", "triton fp16 tma", "fp16"),
             ("Triton tensor cores fp16, TMA persistent", "triton fp16 tma persistent", "fp16"),
             ("cuBLAS bf16 (peer)", "cuBLAS bf16", "bf16"),
             ("cuBLAS fp16 (peer)", "cuBLAS fp16", "fp16")]
    for label, impl, prec in rungs:
        roof_v = roof["fp32_fma_tflops"] if prec == "fp32" else roof["tensor_16bit_tflops"]
        peer = {"fp32": "cuBLAS fp32 (TF32 off)", "bf16": "cuBLAS bf16", "fp16": "cuBLAS fp16"}[prec]
        case = {"rung": label, "roofline [TFLOPS]": round(roof_v, 1)}
        for s in big:
            v = results.get((impl, s))
            ladder.add(case, f"{s}^3", None, v)
            pv = results.get((peer, s))
            pct.add({"rung": label}, f"{s}^3 % of roofline", None, None if v is None else 100 * v / roof_v)
            pct.add({"rung": label}, f"{s}^3 % of cuBLAS", None,
                    None if v is None or pv is None else 100 * v / pv)
    ladder.print()
    pct.print()
    ladder.save(results_dir() / f"ladder-{gpu_slug()}.json")
    pct.save(results_dir() / f"ladder_pct-{gpu_slug()}.json")

    # --- ablation: what grouping and pipeline depth buy (best TMA config, bf16) ------------
    s = max(big) if big else max(sizes)
    a = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    mt.matmul(a, b, use_tma=True)
    best = mt.best_config(True)
    abl = BenchReport(LESSON, "ablation", "TFLOPS", ceilings=ceil,
                      title=f"Triton bf16 TMA at {s}^3, the autotuned config with one change")
    import triton
    variants = {"autotuned": best,
                "GROUP_M=1 (row-major program order)": dict(best, GROUP_M=1),
                "num_stages=2 (shallower pipeline)": dict(best, num_stages=2)}
    cfgs = {label: triton.Config({k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
                                 num_warps=meta["num_warps"], num_stages=meta["num_stages"])
            for label, meta in variants.items()}
    times = {label: [] for label in variants}
    for _ in range(2):  # round-robin, best median of two (see the sweep)
        for label, cfg in cfgs.items():
            times[label].append(bench(lambda: mt.matmul(a, b, use_tma=True, config=cfg), rep_ms=60))
    for label, ts in times.items():
        t = min(ts, key=lambda x: x.median_ms)
        abl.add({"variant": label}, "triton bf16 tma", t, tflops(2 * s**3, t.median_ms),
                config=variants[label], rounds_median_ms=[x.median_ms for x in ts])
    abl.print()
    abl.save(results_dir() / f"ablation-{gpu_slug()}.json")


def plot(report, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    impls = list(dict.fromkeys(r.impl for r in report.rows))
    for impl in impls:
        rows = [r for r in report.rows if r.impl == impl and r.value]
        xs = [int(r.case["size"].split("^")[0]) for r in rows]
        ax.plot(xs, [r.value for r in rows], marker="o", ms=4,
                ls="--" if impl.startswith("cuBLAS") else "-", label=impl)
    ceil = report.ceilings or {}
    for key, label in (("fp32_fma_tflops", "FP32 FMA peak"), ("tensor_16bit_tflops", "bf16 dense peak")):
        if key in ceil:
            ax.axhline(ceil[key], color="k", lw=0.8, ls=":")
            ax.text(512, ceil[key] * 1.06, f"{label} {ceil[key]:,.0f}", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("M = N = K")
    ax.set_ylabel("TFLOPS (2 M N K / time)")
    gpu = report.to_dict()["environment"].get("gpu")
    ax.set_title(f"Matmul ladder on {gpu}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    console.print(f"plot: {path}")


if __name__ == "__main__":
    check_all()
    if args.bench:
        bench_all()
