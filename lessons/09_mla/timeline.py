"""Where the time of one decode call goes: the decode kernel's programs on a per-SM timeline.

    python lessons/09_mla/timeline.py              # FlashMLA's memory-bound cases (GPU only)
    python lessons/09_mla/timeline.py --variants   # and the equal plan with other knobs

For each case (batch 128, h_q x s_q <= 32 rows, mean length 4096 / 8192 / 16384, fixed
and varying) and each work plan below, it measures
- the whole call (``common.timing.bench``, as ``main.py --bench`` does), the same from a
  CUDA graph (no host in the way), and the host time per call (``common.timing.host_us``),
- the two kernels apart (``torch.profiler``): the decode kernel and the combine,
- one traced call: every decode program records its SM and its start and end on the GPU's
  global timer (``flash_mla_with_kvcache(..., trace=...)``), and ``summarize`` turns that
  into how busy the SMs were, when the first SM ran out of work (the tail), and how many
  programs shared an SM. (Per-program durations are not fitted to a cost per block: with
  two programs per SM sharing the bandwidth, and lone programs at the end running faster,
  such a fit mixes the three regimes.)
Prints one table; writes results/timeline-<gpu>.json (summaries, and the raw trace of the
drawn cases) and results/timeline-<gpu>.png (the drawn cases' timelines).

The trace costs a few instructions per program; at 64 rows it adds register spills, so
use it where this script does: on the memory-bound cases.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # noqa: E401,E702
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from common import runtime  # noqa: E402  (before triton)

HERE = pathlib.Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------
# The analysis: plain numpy, so it is tested on machines without a GPU.

def summarize(sm, t0, t1, blocks, num_sms):
    """Per-call figures from one traced decode launch.

    sm, t0, t1: per program, its SM and its start and end (ns); blocks: its key blocks
    (0 for the plan's unused rows, which return at once). Returns a dict of:
    span_us (first start to last end), busy (the SMs' busy time / (num_sms x span)),
    first_idle_us (when the first SM had no program left; SMs that got none count as 0),
    tail_us (span - first_idle), start_us (the last SM's first start), resident (most
    programs running at once on one SM), programs (with work).
    """
    sm, t0, t1, blocks = (np.asarray(x, dtype=np.int64) for x in (sm, t0, t1, blocks))
    origin = t0.min()
    work = blocks > 0
    end = t1[work].max() if work.any() else t1.max()
    span = max(end - origin, 1)
    busy, last_end, first_start, resident = 0, [], [], 1
    for s in range(num_sms):
        mine = work & (sm == s)
        if not mine.any():
            last_end.append(origin)
            continue
        starts, ends = t0[mine], t1[mine]
        order = np.argsort(starts)
        starts, ends = starts[order], ends[order]
        first_start.append(starts[0])
        last_end.append(ends.max())
        cur_s, cur_e = starts[0], ends[0]       # union of the intervals
        for a, b in zip(starts[1:], ends[1:]):
            if a > cur_e:
                busy += cur_e - cur_s
                cur_s, cur_e = a, b
            else:
                cur_e = max(cur_e, b)
        busy += cur_e - cur_s
        # programs at once: +1 at each start, -1 at each end
        events = sorted([(a, 1) for a in starts] + [(b, -1) for b in ends],
                        key=lambda e: (e[0], e[1]))
        now = 0
        for _, d in events:
            now += d
            resident = max(resident, now)
    first_idle = min(last_end) - origin
    return dict(span_us=span / 1e3, busy=busy / (num_sms * span),
                first_idle_us=first_idle / 1e3, tail_us=(span - first_idle) / 1e3,
                start_us=(max(first_start) - origin) / 1e3 if first_start else 0.0,
                resident=int(resident), programs=int(work.sum()))


def lanes(sm, t0, t1):
    """A lane per program so that programs overlapping on one SM are drawn side by side."""
    lane = np.zeros(len(sm), dtype=np.int64)
    free = {}                                   # sm -> end time of each lane
    for i in np.argsort(t0, kind="stable"):
        ends = free.setdefault(int(sm[i]), [])
        for k, e in enumerate(ends):
            if e <= t0[i]:
                ends[k] = t1[i]
                lane[i] = k
                break
        else:
            ends.append(t1[i])
            lane[i] = len(ends) - 1
    return lane


# ----------------------------------------------------------------------------------------
# The measurements (GPU).

def plans(variants):
    """(name, plan_mla_splits arguments): the default plan first; with --variants also
    the equal plan with other knobs."""
    out = [("equal (default)", {}), ("shares (FlashMLA's)", {"plan": "shares"})]
    if variants:
        out += [("equal, no split cost", {"split_cost": 0.0}),
                ("equal, split cost x2", {"split_cost": "x2"}),
                ("equal, split cost x4", {"split_cost": "x4"})]
    return out


def kernel_us(fn, names, calls=10):
    """Mean device time per call of each kernel whose name contains one of `names`."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = dict.fromkeys(names, 0.0)
    for ev in prof.key_averages():
        for name in names:
            if name in ev.key:
                total = getattr(ev, "self_device_time_total", None)
                if total is None:
                    total = ev.self_cuda_time_total
                out[name] += total / calls
    return out


def trace_call(run, meta, rows, cfg):
    """One traced call (after an L2 flush): per program [sm, t0, t1, blocks]."""
    import torch
    import flash_mla
    from common.timing import flush_l2_cache
    grid = flash_mla.decode_grid(rows, 1, meta.shape[0], cfg)
    trace = torch.zeros(3 * grid[0] * grid[1] * grid[2], dtype=torch.int64, device="cuda")
    flush_l2_cache()
    run(trace)
    torch.cuda.synchronize()
    rec = trace.view(grid[2], grid[1], grid[0], 3).cpu().numpy()
    m = meta.cpu().numpy().astype(np.int64)
    pages = np.where(m[:, 0] >= 0, -(-m[:, 2] // 64) - m[:, 1] // 64, 0)
    blocks = np.broadcast_to(pages[:, None, None], rec.shape[:3])
    return (rec[..., 0].ravel(), rec[..., 1].ravel(), rec[..., 2].ravel(), blocks.ravel())


def main(variants=False):
    import torch
    import flash_mla
    import problems
    from flash_mla import flash_mla_with_kvcache, plan_mla_splits
    from common.checks import assert_close
    from common.results import environment, gpu_slug
    from common.timing import bench, gbps, host_us

    num_sms = flash_mla._num_sm(torch.device("cuda"))
    draw = {(4096, True, 16, 1), (8192, False, 16, 1)}   # cases whose timelines are drawn
    rows_out, traces = [], {}
    header = (f"{'case':>22} {'plan':>20} {'GB/s':>6} {'call':>6} {'graph':>6} {'host':>5} "
              f"{'decode':>6} "
              f"{'comb.':>5} {'span':>6} {'busy':>5} {'1st idle':>8} {'tail':>5} "
              f"{'start':>5} {'res':>3} {'progs':>5}")
    print(header)
    for mean in (4096, 8192, 16384):
        for varlen in (False, True):
            lens = problems.flashmla_lens(128, mean, varlen, 2, seed=mean)
            k_cache, bt, cs = problems.paged_cache(lens, 1, torch.bfloat16, seed=mean)
            for hq, sq in ((16, 1), (32, 1), (16, 2)):
                rows = hq * sq
                cfg = flash_mla.default_config(rows)
                q = torch.randn(128, sq, hq, 576, device="cuda", dtype=torch.bfloat16)
                _, nbytes = problems.flashmla_flops_bytes(lens, sq, hq, 1)
                ref = None
                for name, kw in plans(variants):
                    if isinstance(kw.get("split_cost"), str):     # a multiple of the default
                        kw = dict(kw, split_cost=cfg.split_cost * float(kw["split_cost"][1:]))
                    # the 2025 form (the plan's tensors passed in), so that each variant
                    # can be planned and traced; the default plan is what a default
                    # call with get_mla_metadata()'s sched meta makes
                    meta, ns = plan_mla_splits(cs, rows, 1, **kw)

                    def run(trace=None):
                        return flash_mla_with_kvcache(q, k_cache, bt, cs, 512, meta, ns,
                                                      causal=sq > 1,
                                                      trace=trace)
                    out, _ = run()
                    if ref is None:
                        ref = out
                    assert_close(out, ref, dtype=torch.bfloat16, name=name)
                    t = bench(run)
                    t_graph = bench(run, cuda_graph=True)
                    host = host_us(run)
                    k = kernel_us(run, ("_mla_decode_kernel", "_mla_combine_kernel"))
                    sm, t0, t1, blocks = trace_call(run, meta, rows, cfg)
                    s = summarize(sm, t0, t1, blocks, num_sms)
                    case = f"{mean} {'var' if varlen else 'fix'} h{hq} s{sq}"
                    row = dict(mean=mean, varlen=varlen, h_q=hq, s_q=sq, plan=name,
                               splits=int(ns[-1]), gbps=gbps(nbytes, t.median_ms),
                               call_us=t.median_ms * 1e3, graph_us=t_graph.median_ms * 1e3,
                               host_us=host,
                               decode_us=k["_mla_decode_kernel"],
                               combine_us=k["_mla_combine_kernel"], **s)
                    rows_out.append(row)
                    if (mean, varlen, hq, sq) in draw and name in dict(plans(False)):
                        lane = lanes(sm, t0, t1)
                        traces[f"{case} | {name}"] = dict(
                            sm=sm.tolist(), t0=(t0 - t0.min()).tolist(),
                            t1=(t1 - t0.min()).tolist(), blocks=blocks.tolist(),
                            lane=lane.tolist())
                    print(f"{case:>22} {name:>20} {row['gbps']:6.0f} {row['call_us']:6.1f} "
                          f"{row['graph_us']:6.1f} {host:5.0f} "
                          f"{row['decode_us']:6.1f} {row['combine_us']:5.1f} "
                          f"{s['span_us']:6.1f} {s['busy']:5.2f} {s['first_idle_us']:8.1f} "
                          f"{s['tail_us']:5.1f} {s['start_us']:5.1f} {s['resident']:3d} "
                          f"{s['programs']:5d}", flush=True)
            del k_cache, bt
            torch.cuda.empty_cache()
    out = pathlib.Path(os.environ.get("RESULTS_DIR") or HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    slug = gpu_slug()
    path = out / f"timeline-{slug}.json"
    path.write_text(json.dumps({
        "gpu": torch.cuda.get_device_name(), "environment": environment(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "columns": {"call_us": "whole call, median (common.timing.bench)",
                    "graph_us": "the same, replayed from a CUDA graph",
                    "host_us": "host time per call (common.timing.host_us)",
                    "decode_us/combine_us": "torch.profiler, mean of 10 calls",
                    "the rest": "one traced call, see timeline.summarize"},
        "rows": rows_out, "traces": traces}, indent=None))
    print(f"saved {path}")
    plot(traces, num_sms, out / f"timeline-{slug}.png")


def plot(traces, num_sms, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm
    fig, axes = plt.subplots(len(traces), 1, figsize=(12, 3.2 * len(traces)), squeeze=False)
    for ax, (title, tr) in zip(axes[:, 0], sorted(traces.items())):
        sm, t0, t1, blocks, lane = (np.asarray(tr[k]) for k in ("sm", "t0", "t1", "blocks",
                                                                  "lane"))
        work = blocks > 0
        nl = max(1, lane.max() + 1)
        colors = cm.viridis(blocks[work] / max(1, blocks.max()))
        ax.barh(sm[work] + lane[work] / nl, (t1 - t0)[work] / 1e3, left=t0[work] / 1e3,
                height=0.9 / nl, color=colors, edgecolor="none")
        ax.set_xlim(0, t1[work].max() / 1e3 * 1.01)
        ax.set_ylim(0, num_sms)
        ax.set_ylabel("SM")
        ax.set_title(f"{title}: one bar per decode program, colour = key blocks", fontsize=9)
    axes[-1, 0].set_xlabel("time since the first program started (us)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


if __name__ == "__main__":
    if runtime.is_emulated():
        print("timeline.py reads the GPU's SM ids and clock; nothing to do under emulation.")
    else:
        main(variants="--variants" in sys.argv[1:])
        # Everything is saved. Skip the interpreter's teardown: with torch.profiler (CUPTI)
        # and Triton's launcher both loaded, torch 2.11 / triton 3.6 abort there with
        # "free(): invalid pointer", which would read like a failure.
        sys.stdout.flush()
        os._exit(0)
