"""The machine's measured ceilings: what "% of the hardware" is a fraction of.

Datasheet numbers are leads; the course reports fractions of what *this* GPU measured:

* ``copy_gbps``: a 4 GiB device-to-device copy, counting bytes read plus bytes written
  (3.03 TB/s on our H100, against 3.35 TB/s on the datasheet);
* ``bf16_tflops``: an 8192^3 bf16 matrix product through cuBLAS on random data
  (~780 TFLOPS on our H100, against ~990 dense on the datasheet).

Measured once per GPU and cached in ``~/.cache/gpu-kernel-course/``; ``fresh=True``
measures again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from common import runtime
from common.results import gpu_slug
from common.timing import bench, gbps, tflops


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "gpu-kernel-course" / f"ceilings-{gpu_slug()}.json"


def measure_ceilings(fresh: bool = False) -> dict | None:
    """``{"gpu", "copy_gbps", "bf16_tflops"}`` for this GPU, or None under emulation."""
    if runtime.is_emulated():
        return None
    path = _cache_file()
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    import torch

    n = 4 * 2**30 // 4  # 4 GiB of float32
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src), flush_l2=False)
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t_mm = bench(lambda: a @ b, flush_l2=False)
    out = {"gpu": runtime.probe_gpu().name,
           "copy_gbps": gbps(2 * n * 4, t_copy.median_ms),
           "bf16_tflops": tflops(2 * m**3, t_mm.median_ms)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out
