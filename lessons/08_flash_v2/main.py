"""Lesson 08: FlashAttention-2 in Triton, forward and backward.

    python lessons/08_flash_v2/main.py              check forward/backward against float32
    python lessons/08_flash_v2/main.py --bench      the papers' benchmark vs SDPA FA2 / cuDNN
    python lessons/08_flash_v2/main.py --ablation   v1 -> v2, one measured step at a time
    python lessons/08_flash_v2/main.py --sweep      TFLOPS of every tile in the tuning set
    python lessons/08_flash_v2/main.py --launch-overhead   seqlen 512/1024: eager vs CUDA graph
    python lessons/08_flash_v2/main.py --features   what each flash-attn option costs
    python lessons/08_flash_v2/main.py --model      a transformers Llama on our kernels vs sdpa
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # noqa: E401,E702

from common.cli import lesson_args  # noqa: E402


def _extra(parser):
    parser.add_argument("--ablation", action="store_true",
                        help="time each step from v1 to v2 on the same shapes (GPU only)")
    parser.add_argument("--sweep", action="store_true",
                        help="TFLOPS of every tile of the pruned tuning set (GPU only)")
    parser.add_argument("--launch-overhead", action="store_true",
                        help="seqlen 512 and 1024: eager launch vs CUDA graph, host time per call")
    parser.add_argument("--sweep-kernels", default="fwd,dkdv,dq",
                        help="with --sweep: which kernels (comma-separated)")
    parser.add_argument("--features", action="store_true",
                        help="the cost of each flash-attn option (window, softcap, ALiBi, head "
                             "dims 80/160/192) beside the plain kernel and SDPA (GPU only)")
    parser.add_argument("--model", action="store_true",
                        help="a randomly initialised transformers Llama: training and generate "
                             "tokens/s on our kernels vs sdpa")
    parser.add_argument("--quick", action="store_true",
                        help="with --bench: fewer sequence lengths (a smoke run)")


args = lesson_args(__doc__, _extra)

import math  # noqa: E402
import os  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
import multiprocessing as mp  # noqa: E402

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import runtime  # noqa: E402
from common.checks import assert_close, assert_error_within  # noqa: E402
from common.reference import attention_flops, attention_ref, attention_varlen_ref  # noqa: E402
from common.results import BenchReport, REPO, gpu_slug  # noqa: E402
from common.timing import bench, host_us, tflops  # noqa: E402

import flash_ablation  # noqa: E402
import flash_compile_cache  # noqa: E402
import flash_attn as fa  # noqa: E402
from flash_attn_interface import flash_attn_func, flash_attn_varlen_func  # noqa: E402

LESSON = "08_flash_v2"
console = Console()
DEV = runtime.torch_device()


# ======================================================================================
# Correctness run (default): a few shapes, forward and backward, against float32
# ======================================================================================

def _grads(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


def check_run():
    table = Table(title="FlashAttention-2 (Triton) vs float32 reference: max |error|")
    for col in ("case", "out", "dq", "dk", "dv", "PyTorch bf16 out"):
        table.add_column(col, justify="right")
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEV, torch.bfloat16)  # noqa: E731
    b, s, h, d = runtime.pick((2, 2048, 8, 128), (1, 113, 2, 64))
    for causal in (False, True):
        q, k, v, do = rnd(b, s, h, d), rnd(b, s, h // 2, d), rnd(b, s, h // 2, d), rnd(b, s, h, d)
        ours = _grads(lambda q_, k_, v_: flash_attn_func(q_, k_, v_, causal=causal), q, k, v, do)
        ref = _grads(lambda q_, k_, v_: attention_ref(q_, k_, v_, causal=causal)[0],
                     q.float(), k.float(), v.float(), do.float())
        pt = _grads(lambda q_, k_, v_: attention_ref(q_, k_, v_, causal=causal,
                                                     compute_dtype=torch.bfloat16)[0], q, k, v, do)
        errs = []
        for name, a, r, p in zip(("out", "dq", "dk", "dv"), ours, ref, pt):
            assert_error_within(a, p, r, slack=2e-3, name=name)
            errs.append(f"{(a.float() - r).abs().max().item():.2e}")
        table.add_row(f"b={b} s={s} hq={h} hk={h // 2} d={d} causal={causal}", *errs,
                      f"{(pt[0].float() - ref[0]).abs().max().item():.2e}")
    # varlen: sequences of 0, 1 and ragged lengths packed together
    lens = runtime.pick([0, 1, 1000, 513, 2048], [0, 1, 40, 17])
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
    q, k, v = rnd(sum(lens), 4, 64), rnd(sum(lens), 2, 64), rnd(sum(lens), 2, 64)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    ref, _ = attention_varlen_ref(q, k, v, cu, cu, causal=True)
    assert_close(out, ref, dtype=torch.bfloat16, name="varlen out")
    table.add_row(f"varlen lens={lens} causal", f"{(out.float() - ref).abs().max().item():.2e}",
                  "", "", "", "")
    console.print(table)
    console.print("[green]all checks passed[/green] (kernel error <= 2x PyTorch-bf16 error "
                  "+ slack, the flash-attn rule)")


# ======================================================================================
# Compiling in parallel: Triton compiles each (kernel, tile, head dim, causal, ...) once,
# serially, at its first launch. A process pool warms the on-disk cache first, so the
# benchmark spends the GPU's time measuring rather than waiting on the compiler.
# ======================================================================================

def precompile(jobs):
    if not jobs:
        return
    workers = min(len(jobs), max(1, (os.cpu_count() or 2) - 1), 15)
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        for err in pool.map(flash_compile_cache.compile_job, jobs):
            if err:
                console.print(f"[yellow]precompile: {err}[/yellow]")


# ======================================================================================
# --bench: the FlashAttention papers' setup against torch SDPA's FA2 and cuDNN backends
# ======================================================================================

def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def run(q, k, v, causal):
        # SDPA wants (b, h, s, d): a transposed view of flash-attn's (b, s, h, d), no copy
        with sdpa_kernel(backend):
            return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        is_causal=causal).transpose(1, 2)
    return run


def _impls():
    from torch.nn.attention import SDPBackend
    return [("triton FA2 (ours)", lambda q, k, v, c: flash_attn_func(q, k, v, causal=c), False),
            ("SDPA flash (FA2)", _sdpa(SDPBackend.FLASH_ATTENTION), True),
            ("SDPA cuDNN", _sdpa(SDPBackend.CUDNN_ATTENTION), True)]


def _call(fn, q, k, v, causal, mode):
    """One forward (no autograd) or one forward+backward, as a closure."""
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                fn(q, k, v, causal)
        return fwd
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)

    def fwd_bwd():
        qg.grad = kg.grad = vg.grad = None
        fn(qg, kg, vg, causal).backward(dout)
    return fwd_bwd


def _time_attention(fn, q, k, v, causal, mode, graph=False):
    """Median time of one forward (or forward+backward) call.

    graph=False: launched from Python, as a training script would (launch overhead
    included). graph=True: 20 calls captured in a CUDA graph and replayed, so only the
    GPU's time counts; applied to every implementation alike.
    """
    return bench(_call(fn, q, k, v, causal, mode), cuda_graph=graph)


def run_bench(quick=False):
    import time
    from common.ceilings import measure_ceilings
    seqlens = [512, 2048, 8192] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    t0 = time.time()
    precompile([("api", d, c, None, {}) for d in (64, 128) for c in (False, True)])
    console.print(f"precompiled in {time.time() - t0:.0f} s")
    report = BenchReport(LESSON, "bench", "TFLOPS",
                         "FlashAttention-2: 16k tokens, hidden 2048, bf16 (TFLOPS)",
                         ceilings=measure_ceilings())
    impls = _impls()
    for mode in ("fwd", "fwd_bwd"):
        for d in (64, 128):
            for causal in (False, True):
                for s in seqlens:
                    b, h = 16384 // s, 2048 // d
                    gen = torch.Generator(device="cuda").manual_seed(s + d)
                    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16,
                                           generator=gen) for _ in range(3))
                    flops = attention_flops(b, s, s, h, d, causal=causal, mode=mode)
                    case = {"mode": mode, "headdim": d, "causal": causal, "seqlen": s, "batch": b,
                            "heads": h}
                    line = []
                    for name, fn, peer in impls:
                        try:
                            t = _time_attention(fn, q, k, v, causal, mode)
                        except RuntimeError as e:  # a backend that refuses the shape
                            console.print(f"[yellow]{name} {case}: {e}[/yellow]")
                            t = None
                        val = tflops(flops, t.median_ms) if t else None
                        report.add(case, name, t, val, peer=peer)
                        line.append(f"{name} {val or 0:.0f}")
                    console.print(f"{mode} d={d} causal={causal} s={s}: " + ", ".join(line))
                    del q, k, v
                path = report.save()  # after every group: a cut-off run keeps what it measured
    report.print()
    console.print(f"saved {path}")
    console.print(f"autotuner's choices: {fa.best_tiles()}")
    plot_bench(report.to_dict(), path.with_suffix(".png"))


# ======================================================================================
# --features: what each of flash-attn's options costs, beside the plain kernel
# ======================================================================================

def _visible_pairs(sq, sk, causal, window):
    """(query, key) pairs a call attends to: the FLOPs that are useful work."""
    i = torch.arange(sq, dtype=torch.float64)[:, None]
    j = torch.arange(sk, dtype=torch.float64)[None, :]
    d = j - (i + sk - sq)
    left, right = window
    if causal:
        right = 0
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        keep &= d >= -left
    if right >= 0:
        keep &= d <= right
    return int(keep.sum())


def _sdpa_masked(causal, window, alibi):
    """SDPA with an explicit mask/bias: what a user without flash-attn would call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    cache = {}

    def run(q, k, v, _causal):
        sq, sk = q.shape[1], k.shape[1]
        if "bias" not in cache:
            i = torch.arange(sq, device=q.device)[:, None]
            j = torch.arange(sk, device=q.device)[None, :]
            d = j - (i + sk - sq)
            keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
            left, right = window
            right = 0 if causal else right
            if left >= 0:
                keep &= d >= -left
            if right >= 0:
                keep &= d <= right
            bias = torch.zeros(sq, sk, device=q.device).masked_fill(~keep, float("-inf"))
            if alibi is not None:
                bias = bias - alibi[:, None, None] * d.abs()[None]
            cache["bias"] = bias.to(q.dtype)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        attn_mask=cache["bias"]).transpose(1, 2)
    return run


def run_features(seqlen=8192):
    """Each option of flash_attn_func at the papers' shape (16k tokens, hidden 2048),
    timed as a user's default call (eager, autotuned), beside the plain kernel and the
    closest SDPA call in the same run. TFLOPS count only the (query, key) pairs the
    option leaves visible, so a window's speed-up shows as time, not as TFLOPS."""
    from torch.nn.attention import SDPBackend
    report = BenchReport(LESSON, "features", "TFLOPS",
                         f"flash-attn's options at seqlen {seqlen}, 16k tokens, hidden 2048, "
                         "bf16 (TFLOPS of the visible pairs)")
    alibi_of = lambda h: (2.0 ** (-8.0 * torch.arange(1, h + 1) / h)).cuda()  # noqa: E731
    cases = [  # (label, headdim, causal, window, softcap, alibi)
        ("plain", 128, False, (-1, -1), 0.0, False),
        ("plain causal", 128, True, (-1, -1), 0.0, False),
        ("window (1024, 0)", 128, False, (1024, 0), 0.0, False),
        ("window (512, 512)", 128, False, (512, 512), 0.0, False),
        ("softcap 50 causal", 128, True, (-1, -1), 50.0, False),
        ("ALiBi causal", 128, True, (-1, -1), 0.0, True),
        ("headdim 80", 80, True, (-1, -1), 0.0, False),
        ("headdim 192", 192, True, (-1, -1), 0.0, False),
    ]
    for mode in ("fwd", "fwd_bwd"):
        for label, d, causal, window, softcap, alibi in cases:
            b, h = 16384 // seqlen, max(1, 2048 // d)
            q, k, v = (torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16)
                       for _ in range(3))
            slopes = alibi_of(h) if alibi else None
            pairs = _visible_pairs(seqlen, seqlen, causal, window)
            flops = 4.0 * b * h * d * pairs * (3.5 if mode == "fwd_bwd" else 1.0)
            case = {"mode": mode, "option": label, "headdim": d, "seqlen": seqlen}
            ours = lambda q_, k_, v_, c, w=window, sc=softcap, sl=slopes: flash_attn_func(  # noqa: E731
                q_, k_, v_, causal=c, window_size=w, softcap=sc, alibi_slopes=sl)
            impls = [("triton FA2 (ours)", ours, False)]
            if window == (-1, -1) and softcap == 0.0 and not alibi:
                impls += [("SDPA flash (FA2)", _sdpa(SDPBackend.FLASH_ATTENTION), True),
                          ("SDPA cuDNN", _sdpa(SDPBackend.CUDNN_ATTENTION), True)]
            elif softcap == 0.0:
                impls += [("SDPA + mask/bias", _sdpa_masked(causal, window, slopes), True)]
            line = []
            for name, fn, peer in impls:
                try:
                    t = _time_attention(fn, q, k, v, causal, mode)
                except (RuntimeError, NotImplementedError) as e:
                    console.print(f"[yellow]{name} {case}: {str(e)[:160]}[/yellow]")
                    t = None
                val = tflops(flops, t.median_ms) if t else None
                report.add(case, name, t, val, peer=peer)
                line.append(f"{name} {t.median_ms if t else float('nan'):.3f} ms "
                            f"({val or 0:.0f})")
            console.print(f"{mode} {label}: " + ", ".join(line))
            del q, k, v
            path = report.save()  # after every case: a run cut short keeps what it measured
    report.print()
    console.print(f"saved {path}")


def run_launch_overhead(seqlens=(512, 1024)):
    """Short sequences: how much of each call is Python/launch overhead?

    Every implementation timed twice at the same shape: launched eagerly from Python (as
    in --bench) and replayed from a CUDA graph (GPU time only); for the eager launch
    also the host's time per call (``host_us``).
    """
    precompile([("api", d, c, None, {}) for d in (64, 128) for c in (False, True)])
    report = BenchReport(LESSON, "launch_overhead", "TFLOPS",
                         "Eager launch vs CUDA graph at short sequences (16k tokens, hidden "
                         "2048, bf16)")
    impls = _impls()
    for seqlen in seqlens:
        for mode in ("fwd", "fwd_bwd"):
            for d in (64, 128):
                for causal in (False, True):
                    b, h = 16384 // seqlen, 2048 // d
                    q, k, v = (torch.randn(b, seqlen, h, d, device="cuda",
                                           dtype=torch.bfloat16) for _ in range(3))
                    flops = attention_flops(b, seqlen, seqlen, h, d, causal=causal, mode=mode)
                    for launch in ("eager", "cuda graph"):
                        case = {"mode": mode, "headdim": d, "causal": causal,
                                "seqlen": seqlen, "launch": launch}
                        for name, fn, peer in impls:
                            extra = {}
                            try:
                                t = _time_attention(fn, q, k, v, causal, mode,
                                                    graph=launch == "cuda graph")
                                if launch == "eager":
                                    extra["host_us"] = host_us(_call(fn, q, k, v, causal,
                                                                     mode))
                            except Exception as e:
                                console.print(f"[yellow]{name} {case}: {type(e).__name__}: "
                                              f"{str(e)[:200]}[/yellow]")
                                t = None
                            report.add(case, name, t,
                                       tflops(flops, t.median_ms) if t else None, peer=peer,
                                       **extra)
                    report.save()
    report.print()
    console.print(f"saved {report.save()}")


def plot_bench(data, png):
    """The papers' figure: bars per sequence length, one panel per (pass, headdim, mask)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    impls = ["SDPA flash (FA2)", "SDPA cuDNN", "triton FA2 (ours)"]
    colors = {"SDPA flash (FA2)": "#9ecae1", "SDPA cuDNN": "#a1d99b", "triton FA2 (ours)": "#de2d26"}
    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    panels = [(m, d, c) for m in ("fwd", "fwd_bwd") for d in (64, 128) for c in (False, True)]
    for ax, (mode, d, causal) in zip(axes.flat, panels):
        sel = [r for r in rows if r["case"]["mode"] == mode and r["case"]["headdim"] == d
               and r["case"]["causal"] == causal]
        seqlens = sorted({r["case"]["seqlen"] for r in sel})
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            vals = [next((r["value"] or 0 for r in sel if r["impl"] == impl
                          and r["case"]["seqlen"] == s), 0) for s in seqlens]
            xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(seqlens))]
            bars = ax.bar(xs, vals, width, label=impl, color=colors[impl])
            for bar, val in zip(bars, vals):
                ax.text(bar.get_x() + bar.get_width() / 2, val + 5, f"{val:.0f}", ha="center",
                        va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(seqlens)))
        ax.set_xticklabels([f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
        ax.set_title(f"{'forward' if mode == 'fwd' else 'forward + backward'}, "
                     f"headdim {d}, {'causal' if causal else 'non-causal'}", fontsize=10)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOPS")
        ax.set_ylim(0, max([r["value"] or 0 for r in sel] + [1]) * 1.25)
    axes.flat[0].legend(loc="upper left", fontsize=8)
    env = data["environment"]
    fig.suptitle(f"Attention, bf16, 16k tokens, hidden 2048 - {env.get('gpu')}, "
                 f"torch {env['packages'].get('torch')}, triton {env['packages'].get('triton')}, "
                 f"{env['date']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    console.print(f"saved {png}")


# ======================================================================================
# --ablation: from v1 to v2, one step at a time, on the same shapes
# ======================================================================================

ABLATION_SHAPE = (4, 4096, 16, 128)  # batch, seqlen, heads, headdim: 16k tokens, hidden 2048
# step 5's tile: the best plain-pointer tile of the sweep at d=128 (450/392 TFLOPS there);
# step 6 keeps it, so that it measures the copy engine alone
ABLATION_TUNED = {False: (128, 128, 8, 3), True: (128, 128, 8, 3)}


def run_ablation():
    b, s, h, d = ABLATION_SHAPE
    steps = [("1. v1 loop order (K/V outer, O in HBM)", "v1"),
             ("2. v2 loop order (Q outer, parallel over seq blocks)", "v2_order"),
             ("3. + deferred normalisation, exp2", "deferred"),
             ("4. + causal skip, masked diagonal stage", "skip"),
             ("5. + tuned tiles and pipelining", "tuned"),
             ("6. + tensor descriptors (TMA)", "tma")]
    precompile([("ablation", d, c, None if st in ("v1", "v2_order", "deferred", "skip")
                 else ABLATION_TUNED[c], {"step": st}) for c in (False, True) for _, st in steps]
               + [("api", d, c, None, {}) for c in (False, True)])
    report = BenchReport(LESSON, "ablation", "TFLOPS",
                         f"From FlashAttention v1 to v2 in Triton: forward, b={b} s={s} h={h} "
                         f"d={d}, bf16 (TFLOPS)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    from torch.nn.attention import SDPBackend
    for causal in (False, True):
        case = {"causal": causal}
        flops = attention_flops(b, s, s, h, d, causal=causal)
        ref = attention_ref(q, k, v, causal=causal)[0]
        for label, step in steps:
            tile = None if step in ("v1", "v2_order", "deferred", "skip") else ABLATION_TUNED[causal]
            fn = lambda: flash_ablation.attention_step(step, q, k, v, causal, tile=tile)  # noqa: E731
            try:
                out = fn()
                err = (out.float() - ref).abs().max().item()
                t = bench(fn)
            except Exception as e:  # e.g. warp specialization refused by this Triton
                console.print(f"[yellow]{label}: {type(e).__name__}: {str(e)[:300]}[/yellow]")
                report.add(case, label, None, None, error=str(e)[:300])
                continue
            report.add(case, label, t, tflops(flops, t.median_ms), max_abs_err=err)
        t = _time_attention(lambda q_, k_, v_, c: flash_attn_func(q_, k_, v_, causal=c),
                            q, k, v, causal, "fwd")
        report.add(case, "7. autotuned flash_attn_func", t, tflops(flops, t.median_ms))
        for name, fn, _ in _impls()[1:]:
            t = _time_attention(fn, q, k, v, causal, "fwd")
            report.add(case, name, t, tflops(flops, t.median_ms), peer=True)
    report.print()
    path = report.save()
    console.print(f"saved {path}; autotuner's choices: {fa.best_tiles()}")
    plot_ablation(report.to_dict(), path.with_suffix(".png"))


def plot_ablation(data, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(16, 6), sharex=True)
    for ax, causal in zip(axes, (False, True)):
        rows = [r for r in data["rows"] if r["case"]["causal"] == causal]
        labels = [r["impl"] + (" (peer)" if r["peer"] else "") for r in rows][::-1]
        vals = [r["value"] or 0 for r in rows][::-1]
        colors = ["#9e9ac8" if r["peer"] else "#de2d26" for r in rows][::-1]
        bars = ax.barh(labels, vals, color=colors)
        for bar, val in zip(bars, vals):
            ax.text(val + 3, bar.get_y() + bar.get_height() / 2, f"{val:.0f}", va="center",
                    fontsize=8)
        ax.set_title("causal" if causal else "non-causal")
        ax.set_xlabel("TFLOPS (forward)")
    env = data["environment"]
    fig.suptitle(f"{data['title']} - {env.get('gpu')}, triton "
                 f"{env['packages'].get('triton')}, {env['date']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    console.print(f"saved {png}")


# ======================================================================================
# --sweep: every tile of the pruned set, forward and backward, headdim 64 and 128
# ======================================================================================

SWEEP_SEQLEN = 4096
# candidates (BLOCK_M, BLOCK_N, num_warps, num_stages); the pruned sets in flash_attn.TILES
# are the best few of these
SWEEP_TILES = {
    "fwd": {64: [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (128, 64, 4, 2),
                 (128, 64, 8, 3), (64, 64, 4, 3), (256, 64, 8, 2), (256, 64, 8, 3),
                 (256, 32, 8, 3), (128, 32, 4, 3)],
            128: [(128, 64, 4, 2), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3),
                  (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 2),
                  (256, 64, 8, 3), (256, 32, 8, 3), (128, 32, 4, 3)]},
    "dkdv": {64: [(64, 128, 8, 2), (32, 128, 4, 2), (64, 128, 8, 3), (64, 64, 4, 2),
                  (32, 64, 4, 3), (128, 128, 8, 2)],
             128: [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2),
                   (64, 128, 8, 1), (32, 128, 4, 2)]},
    "dq": {64: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                (64, 128, 4, 2)],
           128: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                 (64, 128, 8, 2), (128, 32, 8, 2)]},
}
PTR_TILES = 3  # the plain-pointer path is timed for the first few forward tiles only


def run_sweep(kernels=("fwd", "dkdv", "dq")):
    jobs = []
    for d in (64, 128):
        for causal in (False, True):
            for i, tile in enumerate(SWEEP_TILES["fwd"][d] if "fwd" in kernels else []):
                jobs.append(("fwd", d, causal, tile, {"tma": True}))
                # the same tile with the next Q K^T issued before the softmax
                jobs.append(("fwd", d, causal, tile, {"tma": True, "early_qk": True}))
                if i < PTR_TILES:
                    jobs.append(("fwd", d, causal, tile, {"tma": False}))
            for which in [k for k in ("dkdv", "dq") if k in kernels]:
                for tile in SWEEP_TILES[which][d]:
                    jobs.append(("bwd", d, causal, tile, {"tma": True, "which": which}))
    precompile(jobs)
    name = "sweep" if len(kernels) == 3 else "sweep_" + "_".join(kernels)
    report = BenchReport(LESSON, name, "TFLOPS",
                         f"Tile sweep at seqlen {SWEEP_SEQLEN}, 16k tokens, hidden 2048, bf16 "
                         "(TFLOPS of the kernel alone; backward kernels count their own FLOPs)")
    for kind, d, causal, tile, extra in jobs:
        s, h = SWEEP_SEQLEN, 2048 // d
        b = 16384 // s
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        p = fa._Problem(q, k, v, None, causal)
        fwd_flops = attention_flops(b, s, s, h, d, causal=causal)
        case = {"kernel": kind if kind == "fwd" else extra["which"], "headdim": d,
                "causal": causal}
        label = (f"{tile} " + ("tma" if extra.get("tma") else "ptr")
                 + (" early QK" if extra.get("early_qk") else ""))
        try:
            if kind == "fwd":
                t = bench(lambda: fa._flash_fwd(q, k, v, p, use_tma=extra["tma"], tile=tile,
                                                early_qk=extra.get("early_qk", False)))
                flops = fwd_flops
            else:
                out, lse = fa._flash_fwd(q, k, v, p)
                do = torch.randn_like(out)
                delta = torch.empty_like(lse)
                which = extra["which"]
                t = _time_bwd_kernel(which, do, q, k, v, out, lse, delta, p, tile)
                # dK/dV recomputes S and does 4 matmuls; dQ 3 matmuls (2 x b s^2 h d each)
                flops = fwd_flops / 2 * (4 if which == "dkdv" else 3)
            report.add(case, label, t, tflops(flops, t.median_ms))
        except Exception as e:
            console.print(f"[yellow]{case} {label}: {type(e).__name__}: {str(e)[:200]}[/yellow]")
            report.add(case, label, None, None, error=str(e)[:200])
    report.print()
    console.print(f"saved {report.save()}")


def _time_bwd_kernel(which, do, q, k, v, out, lse, delta, p, tile):
    """Time one backward kernel alone (the pre-pass computes delta once, outside)."""
    import triton
    fa._attn_bwd_preprocess[(triton.cdiv(p.sq, 64), p.batch * p.hq)](
        out, do, delta, p.cu_q, *p.strides(out), *p.strides(do), *p.lse_strides(lse), p.sq, p.hq,
        HEAD_DIM=p.d, BLOCK_D=p.block_d, IS_VARLEN=False, BLOCK_M=64)
    consts = p.consts(True)
    common = (*p.strides(q), *p.strides(k), *p.strides(v), *p.strides(do))
    bm, bn, w, s = tile
    if which == "dkdv":
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        args = (q, k, v, do, lse, delta, dk, dv, p.cu_q, p.cu_k, *common, *p.strides(dk),
                *p.strides(dv), *p.lse_strides(lse), p.sq, p.sk, p.hk, p.scale * fa.LOG2E,
                p.scale, p.key)
        grid = (triton.cdiv(p.sk, bn), p.batch * p.hk)
        return bench(lambda: fa._attn_bwd_dkdv_kernel[grid](*args, **consts, BLOCK_M=bm,
                                                             BLOCK_N=bn, num_warps=w, num_stages=s))
    dq = torch.empty_like(q)
    args = (q, k, v, do, lse, delta, dq, p.cu_q, p.cu_k, *common, *p.strides(dq),
            *p.lse_strides(lse), p.sq, p.sk, p.hq, p.scale * fa.LOG2E, p.scale, p.key)
    grid = (triton.cdiv(p.sq, bm), p.batch * p.hq)
    return bench(lambda: fa._attn_bwd_dq_kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn,
                                                      num_warps=w, num_stages=s))


if __name__ == "__main__":
    if (args.ablation or args.sweep or args.launch_overhead or args.features) \
            and runtime.is_emulated():
        print("--ablation, --sweep, --launch-overhead and --features time kernels: they need "
              "a GPU. Nothing to do.")
        sys.exit(0)
    if args.model:
        import llama_on_flash
        llama_on_flash.run_model_mode(console)
    elif args.features:
        run_features()
    elif args.bench:
        run_bench(quick=args.quick)
    elif args.ablation:
        run_ablation()
    elif args.launch_overhead:
        run_launch_overhead()
    elif args.sweep:
        run_sweep(tuple(args.sweep_kernels.split(",")))
    else:
        check_run()
