"""One launch of each kernel at the benchmark's N = 4096 shape, for Nsight Compute.

    ncu --clock-control none --metrics dram__bytes_read.sum,dram__bytes_write.sum,... \\
        python lessons/07_flash_v1/ncu_targets.py

Runs, once each: lesson 06's three kernels (scores, softmax_rows, pv), then FlashAttention
v1 with one and two Q tiles per block and with one block per (batch, head). The README's "what
limits the kernel" quotes the DRAM bytes, L2 bytes, FMA-pipe and shared-memory utilization
that ncu reports for these launches (results/ncu-<gpu>.csv).
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # noqa: E401,E702

from common.cli import lesson_args

args = lesson_args(__doc__)

import torch  # noqa: E402

from common.lessons import import_lesson_module  # noqa: E402

import flash_v1 as fv  # noqa: E402

if fv.runtime.is_emulated():
    sys.exit("ncu_targets.py profiles real launches: it needs a GPU")

sa = import_lesson_module("06", "standard_attention")
batch, n, heads, d = 4, 4096, 32, 64
g = torch.Generator(device=fv.runtime.torch_device()).manual_seed(0)
q, k, v = (torch.randn(batch, n, heads, d, generator=g, device=fv.runtime.torch_device())
           for _ in range(3))
sa.standard_attention(q, k, v)
fv.flash_attn_v1(q, k, v, q_tiles_per_block=1)
fv.flash_attn_v1(q, k, v, q_tiles_per_block=2)
fv.flash_attn_v1(q, k, v, q_tiles_per_block=None)
torch.cuda.synchronize()
print("launched: qk_scores, softmax_rows, pv, flash_v1 with 1 and 2 Q tiles per block, "
      "flash_v1 with one block per (b, h)")
