"""Lesson 06: standard attention (three kernels, S and P in HBM) and the online softmax.

    python lessons/06_flash_naive/main.py           # check the kernels and the NumPy loops
    python lessons/06_flash_naive/main.py --bench   # GPU: time per kernel, bytes, memory

The check runs the three Numba kernels against common.reference.attention_ref, then the
online-softmax walk-through (online_softmax.py) and prints what standard attention costs
in memory. The benchmark times each kernel over sequence lengths 512 to 16k (the
FlashAttention paper's setup: 16k tokens per batch, 32 heads of 64) and measures peak
memory, saving results/time_split-<gpu>.json, results/memory-<gpu>.json and a plot.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # noqa: E401,E702

from common.cli import lesson_args

args = lesson_args(__doc__)

import math  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import runtime  # noqa: E402
from common.checks import assert_close, max_abs_error, poisoned  # noqa: E402
from common.reference import attention_ref  # noqa: E402

import attention_memory as mem  # noqa: E402
import online_softmax as osm  # noqa: E402
import standard_attention as sa  # noqa: E402

console = Console()
GB = 1e9
GIB = 2**30


def check():
    dev = runtime.torch_device()
    batch, n, heads, d = runtime.pick((2, 1024, 8, 64), (1, 33, 2, 32))
    table = Table(title=f"standard attention vs attention_ref (batch {batch}, heads {heads}, d {d})")
    for col in ("seqlen_q x seqlen_k", "dtype", "causal", "max |out - ref|", "max |lse - ref|"):
        table.add_column(col)
    for dtype, causal, sq in ((torch.float32, False, n), (torch.float16, True, n + 7)):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(batch, sq, heads, d, generator=g).to(dtype).to(dev)
        k = torch.randn(batch, n, heads, d, generator=g).to(dtype).to(dev)
        v = torch.randn(batch, n, heads, d, generator=g).to(dtype).to(dev)
        o, lse = sa.standard_attention(q, k, v, causal=causal, out=poisoned(q.shape, dtype, dev))
        ref_o, ref_lse = attention_ref(q, k, v, causal=causal)
        assert_close(o, ref_o.to(dtype), dtype=dtype)
        assert_close(lse, ref_lse, dtype=torch.float32, name="lse")
        table.add_row(f"{sq} x {n}", str(dtype).replace("torch.", ""), str(causal),
                      f"{max_abs_error(o, ref_o):.2e}", f"{max_abs_error(lse, ref_lse):.2e}")
    console.print(table)

    # The online softmax walk-through, on one small head (float64, NumPy)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20) * 40 + 60).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        naive = osm.softmax_naive(x)
    console.print(f"softmax of scores up to {x.max():.0f} in float32: naive has "
                  f"{int(np.isnan(naive).sum())} NaN (exp overflows); safe, online and "
                  f"blockwise agree to {np.abs(osm.softmax_online_blocks(x, 8) - osm.softmax_safe(x)).max():.1e}")
    q, k, v = (rng.standard_normal((37, 16)) for _ in range(3))
    ref_o, _ = attention_ref(*(torch.from_numpy(t)[None, :, None] for t in (q, k, v)),
                             causal=True, compute_dtype=torch.float64)
    for name, fn in (("one row at a time", osm.attention_rowwise),
                     ("Algorithm 1 (v1 loop order)", osm.flash_attention_v1_loops),
                     ("FlashAttention-2 loop order", osm.flash_attention_v2_loops)):
        o, _ = fn(q, k, v, None, True)
        assert_close(o, ref_o[0, :, 0], atol=1e-12, rtol=1e-10, name=name)
        console.print(f"online softmax attention, {name}: max error {max_abs_error(o, ref_o[0, :, 0]):.1e}")

    # What standard attention holds in memory
    table = Table(title="standard attention, float32, batch 1, 32 heads, d 64 (analytic)")
    for col in ("N", "S + P", "Q, K, V, O", "HBM bytes moved", "minimum bytes"):
        table.add_column(col, justify="right")
    for n in (1024, 4096, 16384, 65536):
        peak = mem.standard_peak_bytes(1, n, n, 32, 64)
        io = 4 * n * 32 * 64 * 4
        table.add_row(str(n), f"{(peak - io) / GIB:,.2f} GiB", f"{io / GIB:.3f} GiB",
                      f"{mem.standard_bytes(1, n, n, 32, 64)['total'] / GB:,.1f} GB",
                      f"{mem.minimal_bytes(1, n, n, 32, 64) / GB:.3f} GB")
    console.print(table)
    console.print(f"Longest sequence whose standard attention fits in 80 GB (batch 1, 32 heads, "
                  f"d 64, float32): N = {mem.max_seqlen_that_fits(80e9, 1, 32, 64):,}")


def bench():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.ceilings import measure_ceilings
    from common.reference import attention_flops
    from common.results import BenchReport, gpu_slug
    from common.timing import bench as time_it, gbps

    torch.backends.cuda.matmul.allow_tf32 = False
    ceilings = measure_ceilings()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    split = BenchReport("06_flash_naive", "time_split", metric="ms",
                        title="Standard attention: time per kernel (float32, d 64, 16k tokens)",
                        ceilings=ceilings)
    memory = BenchReport("06_flash_naive", "memory", metric="GiB",
                         title="Standard attention: peak memory, analytic and measured",
                         ceilings=ceilings)
    d, heads, tokens = 64, 32, 16384
    rows = []
    for n in (512, 1024, 2048, 4096, 8192, 16384):
        batch = tokens // n
        case = {"N": n, "batch": batch, "heads": heads, "d": d}
        peak = mem.standard_peak_bytes(batch, n, n, heads, d)
        if peak > 0.95 * free:
            console.print(f"N={n}: needs {peak / GIB:.1f} GiB, {free / GIB:.1f} GiB free: skipped")
            continue
        g = torch.Generator(device="cuda").manual_seed(n)
        q, k, v = (torch.randn(batch, n, heads, d, device="cuda", generator=g) for _ in range(3))
        out = torch.empty_like(q)
        scale = d ** -0.5
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        s = sa.scores(q, k, scale)
        p, lse = sa.softmax_rows(s)
        sa.pv(p, v, out)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base + 4 * q.numel() * 4  # + Q, K, V, O
        ref_o, _ = attention_ref(q[:1, :, :2], k[:1, :, :2], v[:1, :, :2])
        assert_close(out[:1, :, :2], ref_o, dtype=torch.float32)  # the timed code is correct
        del ref_o
        reps = dict(warmup_ms=10, rep_ms=60, min_reps=5)
        t_s = time_it(lambda: sa.scores(q, k, scale, s=s), **reps)
        t_p = time_it(lambda: sa.softmax_rows(s, p, lse), **reps)
        t_o = time_it(lambda: sa.pv(p, v, out), **reps)
        nbytes = mem.standard_bytes(batch, n, n, heads, d)
        flops = attention_flops(batch, n, n, heads, d)
        total_ms = t_s.median_ms + t_p.median_ms + t_o.median_ms
        for name, t, key in (("scores (QK^T)", t_s, "scores"), ("softmax", t_p, "softmax"),
                             ("pv (PV)", t_o, "pv")):
            split.add(case, name, t, t.median_ms, bytes=nbytes[key],
                      gbps=gbps(nbytes[key], t.median_ms),
                      tflops=None if key == "softmax" else flops / 2 / (t.median_ms * 1e9))
        split.add(case, "total", None, total_ms, bytes=nbytes["total"],
                  tflops=flops / (total_ms * 1e9))
        memory.add(case, "analytic", None, peak / GIB)
        memory.add(case, "measured", None, measured / GIB)
        rows.append((n, t_s.median_ms, t_p.median_ms, t_o.median_ms, peak, measured))
        del q, k, v, out, s, p, lse
        torch.cuda.empty_cache()

    # The longest N that fits, for two shapes, against this GPU's memory
    for batch, hh in ((1, 32), (1, 1)):
        n_fit = mem.max_seqlen_that_fits(total, batch, hh, d)
        memory.add({"N": f"max that fits in {total / GB:.0f} GB", "batch": batch, "heads": hh,
                    "d": d}, "analytic", None, mem.standard_peak_bytes(batch, n_fit, n_fit, hh, d) / GIB,
                   max_seqlen=n_fit)
        console.print(f"batch {batch}, heads {hh}: standard attention fits up to N = {n_fit:,}")
    split.print()
    memory.print()
    split_path = split.save()
    memory.save()

    ns = [r[0] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = np.zeros(len(rows))
    for idx, label in ((1, "scores (QK^T)"), (2, "softmax"), (3, "pv (PV)")):
        vals = np.array([r[idx] for r in rows])
        ax1.bar([str(n) for n in ns], vals, bottom=bottom, label=label)
        bottom += vals
    ax1.set_xlabel("sequence length N (batch = 16384 / N, 32 heads, d 64)")
    ax1.set_ylabel("ms")
    ax1.set_title("time per kernel")
    ax1.legend()
    ax2.plot(ns, [r[4] / GIB for r in rows], "o-", label="analytic")
    ax2.plot(ns, [r[5] / GIB for r in rows], "x--", label="measured (torch allocator)")
    ax2.axhline(total / GIB, color="red", lw=0.8, label="GPU memory")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("N")
    ax2.set_ylabel("GiB")
    ax2.set_title("peak memory (S and P in float32)")
    ax2.legend()
    fig.suptitle(f"Standard attention, {runtime.probe_gpu().name}")
    fig.tight_layout()
    png = split_path.parent / f"standard_attention-{gpu_slug()}.png"
    fig.savefig(png, dpi=110)
    console.print(f"saved {split_path} and {png}")


if args.bench:
    bench()
else:
    check()
