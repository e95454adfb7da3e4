"""The plan's two knobs on the memory-bound cases (GPU only).

    python lessons/09_mla/plan_sweep.py

`chunks_per_part` (a split is at most 1/chunks of a share) and `min_split_blocks` (but
never below this many key blocks), for h_q 16 and 32 (s_q 1) at mean lengths 4096, 8192
and 16384, fixed and varying: 12 cases, each variant timed in the same run. Prints one
line per case and the mean GB/s of each variant; writes the raw rows to
results/plan_sweep-<gpu>.json. Its run chose 3 and 32 for both tiles; `timeline.py
--variants` then refined them per tile (see default_config).
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # noqa: E401,E702
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from common import runtime  # noqa: E402  (before triton)

VARIANTS = [(3, 32), (2, 32), (4, 32), (3, 16), (3, 64), (4, 16), (6, 16)]  # (chunks, min)


def main():
    import torch
    from flash_mla import flash_mla_with_kvcache, get_mla_metadata
    from common.results import gpu_slug
    from common.timing import bench, gbps
    import problems as m

    here = pathlib.Path(__file__).resolve().parent
    rows, total = [], {v: 0.0 for v in VARIANTS}
    for mean in (4096, 8192, 16384):
        for varlen in (False, True):
            lens = m.flashmla_lens(128, mean, varlen, 2, seed=mean)
            k_cache, bt, cs = m.paged_cache(lens, 1, torch.bfloat16, seed=mean)
            for hq in (16, 32):
                q = torch.randn(128, 1, hq, 576, device="cuda", dtype=torch.bfloat16)
                _, nbytes = m.flashmla_flops_bytes(lens, 1, hq, 1)
                line = []
                for chunks, min_blocks in VARIANTS:
                    meta, ns = get_mla_metadata(cs, hq, 1, chunks_per_part=chunks,
                                                min_split_blocks=min_blocks)
                    t = bench(lambda: flash_mla_with_kvcache(q, k_cache, bt, cs, 512, meta, ns,
                                                             check_lengths=False))
                    g = gbps(nbytes, t.median_ms)
                    total[(chunks, min_blocks)] += g
                    line.append(f"{chunks}/{min_blocks}:{g:.0f}({int(ns[-1])})")
                    rows.append(dict(mean=mean, varlen=varlen, hq=hq, chunks=chunks,
                                     min_blocks=min_blocks, gbps=g, splits=int(ns[-1])))
                print(mean, "var" if varlen else "fix", hq, " ".join(line), flush=True)
    print({f"{c}/{mn}": round(v / 12) for (c, mn), v in total.items()})
    out = pathlib.Path(os.environ.get("RESULTS_DIR") or here / "results")
    path = out / f"plan_sweep-{gpu_slug()}.json"
    path.write_text(json.dumps({"gpu": torch.cuda.get_device_name(),
                                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                "rows": rows}, indent=1))
    print(f"saved {path}")


if __name__ == "__main__":
    if runtime.is_emulated():
        print("plan_sweep.py times the decode kernel on a GPU; nothing to do under emulation.")
    else:
        main()
