"""Warm Triton's on-disk kernel cache from a pool of processes (used by main.py on a GPU).

Triton compiles a kernel at its first launch for each combination of constexprs (tile,
head dim, causal, ...) and input specialisation (which integers are divisible by 16), one
at a time, in the launching process: the benchmark's 30-odd variants would keep the GPU
waiting on the compiler for a minute or two. ``compile_job`` runs one small launch of one
variant in a worker process; the compiled binary lands in ~/.triton/cache, where the main
process finds it. The small inputs keep the same specialisation as the benchmark's
(every length and stride a multiple of 16).
"""

import os
import pathlib
import sys


def compile_job(job):
    """job = (kind, headdim, causal, tile, extra); returns None or an error message."""
    os.environ["COURSE_MODE"] = "gpu"
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    import torch
    import flash_ablation
    import flash_attn

    kind, d, causal, tile, extra = job
    flash_attn.AUTOTUNE = kind == "api"  # explicit tiles: compile just the ones asked for
    h = 2048 // d
    q, k, v = (torch.randn(1, 256, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    try:
        if kind == "api":  # the autotuned path: compiles every tile of the pruned set
            q.requires_grad_()
            flash_attn.flash_attn_func(q, k, v, causal=causal).sum().backward()
        elif kind == "fwd":
            p = flash_attn._Problem(q, k, v, None, causal)
            flash_attn._flash_fwd(q, k, v, p, use_tma=extra.get("tma"), tile=tile,
                                  early_qk=extra.get("early_qk"))
        elif kind == "bwd":
            p = flash_attn._Problem(q, k, v, None, causal)
            out, lse = flash_attn._flash_fwd(q, k, v, p)
            flash_attn._flash_bwd(torch.randn_like(out), q, k, v, out, lse, p,
                                  use_tma=extra.get("tma"), tiles={extra["which"]: tile})
        elif kind == "ablation":
            flash_ablation.attention_step(extra["step"], q, k, v, causal, tile=tile)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # reported by the caller; the main process will meet it again
        return f"{job}: {type(e).__name__}: {str(e)[:300]}"
