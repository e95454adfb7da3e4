"""Lesson 09: Multi-head Latent Attention, decoded by a FlashMLA-compatible Triton kernel.

    python lessons/09_mla/main.py            # MLA both ways, then the kernel vs the reference
    python lessons/09_mla/main.py --bench    # FlashMLA's benchmark: ours, torch, the ceilings
    python lessons/09_mla/main.py --sweep    # tile-config sweep on five representative cases
    python lessons/09_mla/main.py --model    # a DeepSeek-style decoder: tokens/s, ours vs torch
    python lessons/09_mla/main.py --bench --quick   # a few cases of the benchmark
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # noqa: E401,E702

from common.cli import lesson_args


def _more(parser):
    parser.add_argument("--sweep", action="store_true",
                        help="compare tile configs of the decode kernel (GPU only)")
    parser.add_argument("--model", action="store_true",
                        help="a DeepSeek-style decoder (mla_model.py) serving requests: "
                             "tokens/s with our kernel vs the torch path")
    parser.add_argument("--quick", action="store_true",
                        help="with --bench or --model: a few cases only (minutes -> ~1 min; "
                             "saved under *_quick names)")


args = lesson_args(__doc__, _more)

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import runtime  # noqa: E402
from common.checks import assert_close, rel_error  # noqa: E402
from common.ceilings import measure_ceilings  # noqa: E402
from common.reference import paged_mla_decode_ref  # noqa: E402
from common.results import BenchReport  # noqa: E402
from common.timing import bench, gbps, tflops  # noqa: E402

import flash_mla  # noqa: E402
from problems import (flashmla_flops_bytes, flashmla_lens, paged_cache,  # noqa: E402
                      torch_gather_sdpa, triton_cdiv)
from flash_mla import (HEAD_DIM_K, HEAD_DIM_V, MLAConfig,  # noqa: E402
                       flash_mla_with_kvcache, get_mla_metadata, plan_mla_splits)
from mla_layer import DEEPSEEK_V2, MLALayer, MLAShapes, cache_bytes_per_token  # noqa: E402

console = Console()
DEV = runtime.torch_device()
LESSON = pathlib.Path(__file__).resolve().parent.name


# ----------------------------------------------------------------------------------------
# Without --bench: MLA both ways, then the kernel against the reference.

def show_mla_layer():
    layer = MLALayer(MLAShapes(), seed=0)
    gen = torch.Generator().manual_seed(0)
    naive_cache, latent_cache, worst = {}, {}, 0.0
    steps, batch = 6, 2
    for t in range(steps):
        x = torch.randn(batch, layer.shapes.d_model, generator=gen, dtype=torch.float64)
        pos = torch.full((batch,), t)
        a = layer.decode_naive(x, pos, naive_cache)
        b = layer.decode_absorbed(x, pos, latent_cache)
        assert_close(b, a, atol=1e-10, rtol=1e-9, name="absorbed vs naive")
        worst = max(worst, rel_error(b, a))
    console.print(f"MLA layer {layer.shapes}: {steps} decode steps, naive and absorbed forms "
                  f"agree to {worst:.1e} (float64).")
    table = Table(title="KV cache per token and layer (bf16)")
    for col in ("shapes", "naive: per-head K,V", "MLA: c_kv + k_pe", "ratio"):
        table.add_column(col, justify="right")
    for name, shapes in (("this lesson's", layer.shapes), ("DeepSeek-V2/V3", DEEPSEEK_V2)):
        bpt = cache_bytes_per_token(shapes)
        table.add_row(f"{name} ({shapes.n_heads} heads)",
                      f"{bpt['naive (per-head K and V)']:,} B",
                      f"{bpt['MLA latent (c_kv + k_pe)']:,} B", f"{bpt['ratio']:.0f}x")
    console.print(table)


def check_kernel():
    cases = runtime.pick(
        gpu=[(flashmla_lens(64, 2048, True, 2, seed=1), 2, 128, True),
             (flashmla_lens(64, 4096, True, 1, seed=2), 1, 16, False)],
        emulation=[([1, 100, 0, 700], 2, 16, True), ([70, 5], 1, 32, False)])
    table = Table(title="flash_mla_with_kvcache vs paged_mla_decode_ref (float32)")
    for col in ("batch", "max len", "s_q", "h_q", "causal", "splits", "rel err out",
                "max err lse"):
        table.add_column(col, justify="right")
    for lens, sq, hq, causal in cases:
        k_cache, block_table, cache_seqlens = paged_cache(lens, 1, torch.bfloat16, seed=len(lens))
        q = torch.randn(len(lens), sq, hq, HEAD_DIM_K, device=DEV).to(torch.bfloat16)
        sched, _ = get_mla_metadata()
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V,
                                          sched, causal=causal)   # plans into sched
        ref_out, ref_lse = paged_mla_decode_ref(q, k_cache, block_table, cache_seqlens,
                                                HEAD_DIM_V, causal=causal)
        assert_close(out, ref_out, dtype=torch.bfloat16, name="out")
        assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4, name="lse")
        finite = torch.isfinite(ref_lse)
        table.add_row(str(len(lens)), str(max(lens)), str(sq), str(hq), str(causal),
                      str(int(sched.num_splits[-1])), f"{rel_error(out, ref_out):.1e}",
                      f"{(lse[finite] - ref_lse[finite]).abs().max().item():.1e}")
    console.print(table)


# ----------------------------------------------------------------------------------------
# --sweep: tile configs on representative cases, fixed and varying lengths.

SWEEP_CONFIGS = [
    # block_m, block_dv, num_warps, num_stages. BLOCK_DV = 256 is left out: Triton 3.6
    # buffers the extra V slice too and needs ~280 KB of shared memory (227 KB available).
    MLAConfig(16, 512, 4, 2), MLAConfig(16, 512, 4, 3), MLAConfig(16, 512, 8, 2),
    MLAConfig(32, 512, 4, 2), MLAConfig(32, 512, 8, 2), MLAConfig(64, 512, 8, 2),
    MLAConfig(64, 512, 8, 3),
]
SWEEP_CASES = ((1, 16), (1, 32), (1, 64), (1, 128), (2, 128))   # (s_q, h_q), heads_k = 1


def sweep(batch=128, mean=4096, ceilings=None):
    """Time every config on each case, with every cache length `mean` and with lengths
    ~ N(mean, mean / 2); print the winner of each (lengths, rows)."""
    report = BenchReport(LESSON, "config_sweep", "GB/s",
                         f"Decode kernel tile configs, batch {batch}, cache length {mean} "
                         "(fixed, or varying ~ N(mean, mean/2)), bf16 (GB/s by FlashMLA's "
                         "byte formula; TFLOPS in the JSON)", ceilings)
    sms = flash_mla._num_sm(torch.device(DEV))
    best = {}
    for lengths in ("fixed", "varying"):
        lens = flashmla_lens(batch, mean, lengths == "varying", 2, seed=mean)
        k_cache, block_table, cache_seqlens = paged_cache(lens, 1, torch.bfloat16, seed=mean)
        for sq, hq in SWEEP_CASES:
            rows = sq * hq
            q = torch.randn(batch, sq, hq, HEAD_DIM_K, device=DEV, dtype=torch.bfloat16)
            flops, nbytes = flashmla_flops_bytes(lens, sq, hq, 1)
            meta0, ns0 = plan_mla_splits(cache_seqlens, rows, 1, num_sm_parts=sms)
            ref, _ = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, meta0,
                                            ns0, causal=sq > 1, config=MLAConfig())
            for cfg0 in SWEEP_CONFIGS:
                if rows >= 64 and cfg0.block_m < 32 or rows > 64 and cfg0.block_m == 16:
                    continue
                for per_sm in ((1, 2) if cfg0.block_m <= 32 and rows <= 32 else (1,)):
                    cfg = cfg0._replace(parts_per_sm=per_sm, resident_per_sm=per_sm)
                    slots = max(1, per_sm * sms // triton_cdiv(rows, cfg.block_m))
                    meta, ns = plan_mla_splits(cache_seqlens, rows, 1, num_sm_parts=slots,
                                               num_slots=slots)

                    def run():
                        return flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens,
                                                      512, meta, ns, causal=sq > 1, config=cfg)
                    try:
                        out, _ = run()
                        assert_close(out, ref, dtype=torch.bfloat16, name=str(cfg))
                        t = bench(run)
                    except Exception as e:  # out of shared memory, etc.: say so, go on
                        console.print(f"[red]{cfg} s_q={sq} h_q={hq}: {type(e).__name__}: "
                                      f"{str(e)[:200]}[/red]")
                        continue
                    case = {"lengths": lengths, "h_q": hq, "s_q": sq, "BLOCK_M": cfg.block_m,
                            "warps": cfg.num_warps, "stages": cfg.num_stages,
                            "parts/SM": per_sm}
                    report.add(case, "triton", t, gbps(nbytes, t.median_ms),
                               tflops=tflops(flops, t.median_ms), config=cfg._asdict())
                    console.print(f"{lengths} s_q={sq} h_q={hq:3d} {cfg}: "
                                  f"{t.median_ms * 1e3:8.1f} us "
                                  f"{gbps(nbytes, t.median_ms):8.0f} GB/s "
                                  f"{tflops(flops, t.median_ms):6.1f} TFLOPS")
                    key = (lengths, rows)
                    if key not in best or t.median_ms < best[key][0]:
                        best[key] = (t.median_ms, cfg)
        del k_cache, block_table
    report.print()
    for (lengths, rows), (_, cfg) in sorted(best.items()):
        console.print(f"best at {lengths} lengths, {rows} rows: {cfg} "
                      f"(default_config: {flash_mla.default_config(rows)})")
    console.print(f"saved {report.save()}")


# ----------------------------------------------------------------------------------------
# --bench: FlashMLA's benchmark.

def benchmark(batch=128, means=(4096, 8192, 16384), heads=(16, 32, 64, 128), suffix=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceilings = measure_ceilings()
    # default_config's tiles (chosen with --sweep), recorded with every row
    title = (f"MLA decoding, FlashMLA's setup: batch {batch}, heads_k 1, bf16, d_qk 576, "
             "d_v 512, pages of 64 in random order")
    rep_bw = BenchReport(LESSON, "mla_decode_gbps" + suffix, "GB/s", title, ceilings)
    rep_fl = BenchReport(LESSON, "mla_decode_tflops" + suffix, "TFLOPS", title, ceilings)
    dtype = torch.bfloat16
    for mean in means:
        for varlen in (False, True):
            lens = flashmla_lens(batch, mean, varlen, 2, seed=mean)
            k_cache, block_table, cache_seqlens = paged_cache(lens, 1, dtype, seed=mean)
            for hq in heads:
                for sq in (1, 2):
                    causal = sq > 1
                    q = torch.randn(batch, sq, hq, HEAD_DIM_K, device=DEV, dtype=dtype)
                    # What a user's default call does, and FlashMLA's benchmark too: one
                    # sched meta, planned by the first call (the check just below) and
                    # reused by every timed call. No host sync; the device-side value
                    # check (a flag and two torch._assert_async) is included.
                    sched, _ = get_mla_metadata()
                    scale = HEAD_DIM_K ** -0.5

                    def ours():
                        return flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens,
                                                      HEAD_DIM_V, sched, causal=causal)

                    def peer():
                        return torch_gather_sdpa(q, k_cache, block_table, cache_seqlens, scale,
                                                 causal)
                    out, _ = ours()
                    num_splits = sched.num_splits
                    t_ours = bench(ours)
                    # the same calls replayed from a CUDA graph: no host in the way (our
                    # Python wrapper's host time per call is close to the GPU's at 4096)
                    t_graph = bench(ours, cuda_graph=True)
                    # what the device-side value check costs: the same calls without it
                    flash_mla._DEVICE_CHECKS = False
                    try:
                        t_nocheck = bench(ours)
                    finally:
                        flash_mla._DEVICE_CHECKS = True
                    # the same kernel under FlashMLA's plan (equal shares in batch order),
                    # passed in the 2025 form (our planner's two tensors)
                    meta_sh, ns_sh = plan_mla_splits(cache_seqlens, sq * hq, 1, plan="shares")

                    def shares():
                        return flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens,
                                                      HEAD_DIM_V, meta_sh, ns_sh, causal=causal)
                    assert_close(shares()[0], out, dtype=dtype, name="shares plan")
                    t_shares = bench(shares)
                    try:
                        if hq == heads[0]:  # the peer computes the same thing (once per cache)
                            assert_close(peer(), out, dtype=dtype, name="torch peer")
                        t_peer = bench(peer)
                    except torch.OutOfMemoryError:
                        t_peer = None
                    if DEV == "cuda":
                        torch.cuda.empty_cache()
                    # FlashMLA's formulas, next to the timing they convert
                    flops, nbytes = flashmla_flops_bytes(lens, sq, hq, 1)
                    case = {"mean len": mean, "lengths": "varying" if varlen else "fixed",
                            "h_q": hq, "s_q": sq}
                    extra = dict(flops=flops, bytes=nbytes, splits=int(num_splits[-1]),
                                 config=flash_mla.default_config(sq * hq)._asdict())
                    for rep, conv in ((rep_bw, gbps), (rep_fl, tflops)):
                        amount = nbytes if conv is gbps else flops
                        rep.add(case, "triton (ours)", t_ours, conv(amount, t_ours.median_ms),
                                **extra)
                        rep.add(case, "ours, CUDA graph", t_graph,
                                conv(amount, t_graph.median_ms))
                        rep.add(case, "ours, no device check", t_nocheck,
                                conv(amount, t_nocheck.median_ms))
                        rep.add(case, "ours, FlashMLA's shares plan", t_shares,
                                conv(amount, t_shares.median_ms), splits=int(ns_sh[-1]))
                        rep.add(case, "torch gather+SDPA", t_peer,
                                None if t_peer is None else conv(amount, t_peer.median_ms),
                                peer=True)
                    rep_bw.add(case, "device copy (ceiling)", None, ceilings["copy_gbps"],
                               peer=True)
                    rep_fl.add(case, "cuBLAS bf16 matmul (ceiling)", None,
                               ceilings["bf16_tflops"], peer=True)
                    console.print(f"mean {mean:5d} {'var' if varlen else 'fix'} h_q {hq:3d} "
                                  f"s_q {sq}: ours {t_ours.median_ms * 1e3:8.1f} us "
                                  f"{gbps(nbytes, t_ours.median_ms):6.0f} GB/s "
                                  f"{tflops(flops, t_ours.median_ms):5.0f} TFLOPS | graph "
                                  f"{gbps(nbytes, t_graph.median_ms):6.0f} GB/s | no check "
                                  f"{gbps(nbytes, t_nocheck.median_ms):6.0f} GB/s | shares "
                                  f"{gbps(nbytes, t_shares.median_ms):6.0f} GB/s | torch "
                                  + ("OOM" if t_peer is None else
                                     f"{t_peer.median_ms * 1e3:8.1f} us "
                                     f"{gbps(nbytes, t_peer.median_ms):6.0f} GB/s"))
            del k_cache, block_table
            if DEV == "cuda":
                torch.cuda.empty_cache()
        for rep in (rep_bw, rep_fl):   # saved as we go: a run cut short keeps its rows
            rep.save()
    for rep in (rep_bw, rep_fl):
        rep.print()
        path = rep.save()
        console.print(f"saved {path}")
    plot(rep_bw, rep_fl,
         path.parent / f"mla_decode{suffix}-{path.stem.split('-', 1)[1]}.png", plt)


def plot(rep_bw, rep_fl, path, plt):
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, rep, unit in ((axes[0], rep_bw, "GB/s"), (axes[1], rep_fl, "TFLOPS")):
        for impl, style in (("triton (ours)", "-"), ("torch gather+SDPA", ":")):
            for mean, color in ((4096, "C0"), (8192, "C1"), (16384, "C2")):
                for lengths, marker in (("fixed", "o"), ("varying", "x")):
                    pts = sorted((r.case["h_q"] * r.case["s_q"], r.value) for r in rep.rows
                                 if r.impl == impl and r.case["mean len"] == mean
                                 and r.case["lengths"] == lengths and r.value)
                    if pts:
                        ax.plot(*zip(*pts), style, marker=marker, color=color,
                                label=f"{impl.split()[0]} {mean} {lengths}"
                                if impl.startswith("triton") or lengths == "fixed" else None)
        ceiling = [r.value for r in rep.rows if "ceiling" in r.impl][0]
        ax.axhline(ceiling, color="gray", ls="--", lw=1)
        ax.text(16, ceiling * 0.96, "measured ceiling", va="top", fontsize=8, color="gray")
        ax.set_ylim(0, ceiling * 1.08)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("query rows per kv head (h_q x s_q)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    axes[0].set_title("memory side (FlashMLA's byte count)")
    axes[1].set_title("compute side (FlashMLA's FLOP count)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(rep_bw.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    console.print(f"saved {path}")


if __name__ == "__main__":
    if args.model:
        import mla_model
        mla_model.serve_benchmark(quick=args.quick)
    elif args.bench:
        if args.quick:     # the headline cases: memory-bound and compute-bound, mean 4096
            benchmark(means=(4096,), heads=(16, 128), suffix="_quick")
        else:
            benchmark()
    elif args.sweep:
        if runtime.is_emulated():
            console.print("--sweep needs a GPU. Nothing to do.")
        else:
            sweep(ceilings=measure_ceilings())
    else:
        show_mla_layer()
        check_kernel()
