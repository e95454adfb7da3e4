"""One forward and one backward launch at the benchmark's d=128, seqlen 4096 shape, with
fixed tiles (no autotuning), for Nsight Compute:

    ncu --clock-control none --kernel-name regex:"_attn_fwd_kernel|_attn_bwd_dkdv_kernel" \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python3 lessons/08_flash_v2/flash_profile.py
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import runtime  # noqa: E402

import torch  # noqa: E402

import flash_attn as fa  # noqa: E402

if __name__ == "__main__":
    if not runtime.is_gpu():
        sys.exit("flash_profile.py profiles GPU kernels: it needs a GPU")
    b, s, h, d = 4, 4096, 16, 128
    causal = "--causal" in sys.argv
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    p = fa._Problem(q, k, v, None, causal)
    out, lse = fa._flash_fwd(q, k, v, p, tile=fa.FWD_TILES[d][0])
    fa._flash_bwd(torch.randn_like(out), q, k, v, out, lse, p,
                  tiles={"dkdv": fa.DKDV_TILES[d][0], "dq": fa.DQ_TILES[d][0]})
    torch.cuda.synchronize()
    print("profiled: fwd tile", fa.FWD_TILES[d][0], "dkdv tile", fa.DKDV_TILES[d][0])
