"""Lesson 07: FlashAttention v1 (Algorithm 1 of Dao et al., 2022) in Numba-CUDA.

    python lessons/07_flash_v1/main.py           # check the kernel against the reference
    python lessons/07_flash_v1/main.py --bench   # GPU: against lesson 06 and torch math

The benchmark uses the FlashAttention paper's setup (16k tokens per batch, 32 heads of
64, float32, sequence lengths 512 to 16k) against lesson 06's standard attention and
torch's math attention (SDPA math backend, TF32 off), measured in the same run: time,
TFLOPS, bytes the kernels request (analytic) and peak memory (torch's allocator). Then
the ablations at N = 4096 (parallelism, tiles, the cost of O's HBM traffic, causal,
float16) and one length where standard attention runs out of memory. Saves
results/fwd-<gpu>.json, results/ablation-<gpu>.json and results/flash_v1-<gpu>.png.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # noqa: E401,E702

from common.cli import lesson_args

args = lesson_args(__doc__)

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import runtime  # noqa: E402
from common.checks import assert_close, max_abs_error, poisoned  # noqa: E402
from common.lessons import import_lesson_module  # noqa: E402
from common.reference import attention_flops, attention_ref  # noqa: E402

import flash_v1 as fv  # noqa: E402

console = Console()
GB = 1e9
GIB = 2**30


def check():
    dev = runtime.torch_device()
    batch, n, heads, d = runtime.pick((2, 1024, 8, 64), (1, 33, 2, 32))
    table = Table(title=f"FlashAttention v1 vs attention_ref (batch {batch}, heads {heads}, d {d})")
    for col in ("seqlen_q x seqlen_k", "dtype", "causal", "Q tiles per block", "max |out - ref|",
                "max |lse - ref|"):
        table.add_column(col)
    for dtype, causal, sq, g in ((torch.float32, False, n, 1), (torch.float16, True, n + 7, 1),
                                 (torch.float32, True, n, None)):
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(batch, sq, heads, d, generator=gen).to(dtype).to(dev)
        k = torch.randn(batch, n, heads, d, generator=gen).to(dtype).to(dev)
        v = torch.randn(batch, n, heads, d, generator=gen).to(dtype).to(dev)
        o, lse = fv.flash_attn_v1(q, k, v, causal=causal, q_tiles_per_block=g,
                                  out=poisoned(q.shape, dtype, dev))
        ref_o, ref_lse = attention_ref(q, k, v, causal=causal)
        assert_close(o, ref_o.to(dtype), dtype=dtype)
        assert_close(lse, ref_lse, dtype=torch.float32, name="lse")
        table.add_row(f"{sq} x {n}", str(dtype).replace("torch.", ""), str(causal),
                      "all (one block per (b, h))" if g is None else str(g),
                      f"{max_abs_error(o, ref_o):.2e}", f"{max_abs_error(lse, ref_lse):.2e}")
    console.print(table)

    mem = import_lesson_module("06", "attention_memory")
    cfg = fv.GPU_CONFIGS[64]
    table = Table(title=f"bytes requested from global memory, float32, batch 1, 32 heads, d 64, "
                        f"tiles {cfg.block_m} x {cfg.block_n}, 2 Q tiles per block (analytic)")
    for col in ("N", "standard (lesson 06)", "v1: K, V", "v1: Q", "v1: O, l, m", "v1 total",
                "v1 one block per (b, h)", "minimum"):
        table.add_column(col, justify="right")
    for n in (1024, 4096, 16384):
        b = fv.hbm_bytes(1, n, n, 32, 64, cfg)
        b1 = fv.hbm_bytes(1, n, n, 32, 64, cfg, q_tiles_per_block=None)
        table.add_row(str(n), f"{mem.standard_bytes(1, n, n, 32, 64)['total'] / GB:.1f} GB",
                      *(f"{b[key] / GB:.1f} GB" for key in ("kv", "q", "o_l_m", "total")),
                      f"{b1['total'] / GB:.1f} GB", f"{mem.minimal_bytes(1, n, n, 32, 64) / GB:.2f} GB")
    console.print(table)


def bench():
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from common.ceilings import measure_ceilings
    from common.results import BenchReport, gpu_slug
    from common.timing import bench as time_it, gbps, tflops

    sa = import_lesson_module("06", "standard_attention")
    mem = import_lesson_module("06", "attention_memory")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 peer really computes in fp32
    torch.backends.cudnn.allow_tf32 = False
    ceilings = dict(measure_ceilings())
    a = torch.randn(8192, 8192, device="cuda")
    t_mm = time_it(lambda: a @ a, flush_l2=False, rep_ms=50)
    ceilings["fp32_tflops"] = tflops(2 * 8192**3, t_mm.median_ms)  # cuBLAS, TF32 off
    del a
    torch.cuda.empty_cache()
    console.print(f"ceilings: {ceilings}")

    def torch_math(qt, kt, vt, causal):  # (b, h, s, d) tensors
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def measure(fn, **reps):
        """(Timing, peak bytes allocated during one call) or (None, 'OOM')."""
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            fn()
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None, "OOM"
        peak = torch.cuda.max_memory_allocated() - base
        return time_it(fn, **reps), peak

    def inputs(batch, n, heads, d, dtype=torch.float32, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        return [torch.randn(batch, n, heads, d, device="cuda", generator=g, dtype=dtype)
                for _ in range(3)]

    d, heads, tokens = 64, 32, 16384
    cfg_default = fv.GPU_CONFIGS[d]

    # --- Ablations at N = 4096 first: they pick the tile configuration of the sweep --------
    abl = BenchReport("07_flash_v1", "ablation", metric="TFLOPS",
                      title="FlashAttention v1 ablations, N 4096, batch 4, 32 heads, d 64",
                      ceilings=ceilings)
    n, batch = 4096, tokens // 4096
    q, k, v = inputs(batch, n, heads, d, seed=1)
    flops = attention_flops(batch, n, n, heads, d)
    variants = [
        ("tiles 32x64, 128 thr, 1 Q tile/block", dict(config=cfg_default)),
        ("tiles 64x32, 128 thr, 1 Q tile/block", dict(config=fv.TileConfig(64, 32, 16, 8))),
        ("tiles 32x64, 64 thr, 1 Q tile/block", dict(config=fv.TileConfig(32, 64, 4, 16))),
        ("2 Q tiles/block", dict(config=cfg_default, q_tiles_per_block=2)),
        ("4 Q tiles/block", dict(config=cfg_default, q_tiles_per_block=4)),
        ("8 Q tiles/block", dict(config=cfg_default, q_tiles_per_block=8)),
        ("one block per (b,h) (literal Alg. 1)", dict(config=cfg_default, q_tiles_per_block=None)),
        ("no O traffic (ablation, wrong result)", dict(config=cfg_default, _ablate_o_traffic=True)),
    ]
    best = (0.0, dict(config=cfg_default))  # the fastest correct variant runs the sweep
    for name, kw in variants:
        t, _ = measure(lambda: fv.flash_attn_v1(q, k, v, **kw), warmup_ms=10, rep_ms=60, min_reps=5)
        cfg = kw["config"]
        g = kw.get("q_tiles_per_block", 1)
        nb = fv.hbm_bytes(batch, n, n, heads, d, cfg, q_tiles_per_block=g)
        if kw.get("_ablate_o_traffic"):
            nb = {**nb, "total": nb["total"] - bh_o_bytes(nb, batch, n, heads, d, cfg)}
        abl.add({"variant": name}, "flash v1 (numba)", t, tflops(flops, t.median_ms),
                bytes=nb["total"], gbps=gbps(nb["total"], t.median_ms), config=str(cfg),
                blocks=math.ceil(math.ceil(n / cfg.block_m) / (g or 10**9)) * batch * heads)
        if not kw.get("_ablate_o_traffic") and tflops(flops, t.median_ms) > best[0]:
            best = (tflops(flops, t.median_ms), kw)
    best_kw = best[1]
    cfg = best_kw["config"]
    console.print(f"sweep runs the fastest variant: {best_kw}")
    # correctness of what is timed, on one batch
    o, _ = fv.flash_attn_v1(q, k, v, **best_kw)
    assert_close(o[:1], attention_ref(q[:1], k[:1], v[:1])[0], dtype=torch.float32)
    for causal, dtype in ((True, torch.float32), (False, torch.float16)):
        qq, kk, vv = (x.to(dtype) for x in (q, k, v))
        f = attention_flops(batch, n, n, heads, d, causal=causal)
        t, _ = measure(lambda: fv.flash_attn_v1(qq, kk, vv, causal=causal, **best_kw),
                       warmup_ms=10, rep_ms=60, min_reps=5)
        name = "causal" if causal else "float16 inputs"
        abl.add({"variant": name + " (fastest variant)"}, "flash v1 (numba)", t,
                tflops(f, t.median_ms), variant=str(best_kw))
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (qq, kk, vv))
        t, _ = measure(lambda: torch_math(qt, kt, vt, causal), warmup_ms=10, rep_ms=60, min_reps=5)
        peer = "torch math (TF32 off)" if dtype == torch.float32 else "torch math (float16 inputs)"
        abl.add({"variant": name + " (fastest variant)"}, peer, t, tflops(f, t.median_ms), peer=True)
        del qt, kt, vt, qq, kk, vv
    del q, k, v, o
    torch.cuda.empty_cache()
    abl.print()
    abl.save()

    # --- The sweep: 512 .. 16k, and one length where standard attention does not fit --------
    fwd = BenchReport("07_flash_v1", "fwd", metric="TFLOPS",
                      title="Attention forward, float32, d 64, 16k tokens (batch = 16384 / N), "
                            "32 heads", ceilings=ceilings)
    plot = {"flash v1 (numba)": [], "standard (lesson 06)": [], "torch math (TF32 off)": []}
    points = [(n, tokens // n, heads) for n in (512, 1024, 2048, 4096, 8192, 16384)]
    points.append((32768, 1, 16))  # S + P = 128 GiB: standard attention cannot run
    for n, batch, hh in points:
        case = {"N": n, "batch": batch, "heads": hh}
        q, k, v = inputs(batch, n, hh, d, seed=n)
        io = 3 * q.numel() * 4
        flops = attention_flops(batch, n, n, hh, d)
        reps = dict(warmup_ms=10, rep_ms=60, min_reps=5) if n < 32768 else \
            dict(warmup_ms=0, rep_ms=0, min_reps=3)
        g = best_kw.get("q_tiles_per_block", 1)
        runs = [("flash v1 (numba)", False, lambda: fv.flash_attn_v1(q, k, v, **best_kw),
                 fv.hbm_bytes(batch, n, n, hh, d, cfg, q_tiles_per_block=g)["total"],
                 fv.peak_bytes(batch, n, n, hh, d))]
        runs.append(("standard (lesson 06)", False, lambda: sa.standard_attention(q, k, v),
                     mem.standard_bytes(batch, n, n, hh, d)["total"],
                     mem.standard_peak_bytes(batch, n, n, hh, d)))
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        runs.append(("torch math (TF32 off)", True, lambda: torch_math(qt, kt, vt, False), None, None))
        for impl, peer, fn, nbytes, analytic_peak in runs:
            free = torch.cuda.mem_get_info()[0]
            if analytic_peak is not None and analytic_peak - io > free:
                # standard attention: computed first, so no device time is spent on a sure OOM
                fwd.add(case, impl, None, None, peer=peer, oom=True,
                        peak_gib_analytic=analytic_peak / GIB, free_gib=free / GIB)
                plot[impl].append((n, None))
                console.print(f"N={n}: {impl} needs {analytic_peak / GIB:.0f} GiB > "
                              f"{free / GIB:.0f} GiB free: out of memory")
                continue
            t, peak = measure(fn, **reps)
            if t is None:
                fwd.add(case, impl, None, None, peer=peer, oom=True)
                plot[impl].append((n, None))
                continue
            # peak: allocated during the call, plus the inputs the caller holds (Q, K, V)
            fwd.add(case, impl, t, tflops(flops, t.median_ms), peer=peer,
                    variant=str(best_kw) if impl.startswith("flash") else None,
                    peak_gib=(peak + io) / GIB,
                    peak_gib_analytic=None if analytic_peak is None else analytic_peak / GIB,
                    bytes=nbytes, gbps=None if nbytes is None else gbps(nbytes, t.median_ms))
            plot[impl].append((n, tflops(flops, t.median_ms), (peak + io) / GIB))
        if n <= 8192:  # what was timed is right: v1 against torch, one batch element, 2 heads
            o, _ = fv.flash_attn_v1(q[:1, :, :2], k[:1, :, :2], v[:1, :, :2], **best_kw)
            ref = torch_math(qt[:1, :2], kt[:1, :2], vt[:1, :2], False).transpose(1, 2)
            assert_close(o, ref, dtype=torch.float32, atol=2e-5, rtol=2e-4)
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()
    fwd.print()
    path = fwd.save()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for impl, pts in plot.items():
        ok = [p for p in pts if p[1] is not None]
        ax1.plot([p[0] for p in ok], [p[1] for p in ok], "o-", label=impl)
        ax2.plot([p[0] for p in ok], [p[2] for p in ok], "o-", label=impl)
        for p in pts:
            if p[1] is None:
                ax2.annotate("OOM", (p[0], torch.cuda.get_device_properties(0).total_memory / GIB),
                             ha="center")
    ax1.axhline(ceilings["fp32_tflops"], color="gray", lw=0.8, ls="--", label="cuBLAS fp32 matmul")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.legend(fontsize=8)
    ax1.set_ylabel("TFLOPS (4 b N^2 h d / time)")
    ax1.set_title("speed, float32")
    ax2.set_yscale("log")
    ax2.set_ylabel("peak GiB (measured)")
    ax2.axhline(torch.cuda.get_device_properties(0).total_memory / GIB, color="red", lw=0.8)
    ax2.set_title("peak memory")
    fig.suptitle(f"FlashAttention v1 vs standard attention, {runtime.probe_gpu().name}")
    fig.tight_layout()
    png = path.parent / f"flash_v1-{gpu_slug()}.png"
    fig.savefig(png, dpi=110)
    console.print(f"saved {path} and {png}")


def bh_o_bytes(nb, batch, n, heads, d, cfg):
    """The O part of the O/l/m traffic (what the no-O-traffic ablation removes)."""
    return nb["o_l_m"] * (2 * d) / (2 * d + 4)


if args.bench:
    bench()
else:
    check()
