"""Host time of each layer of a launch, on a problem so small that the GPU never waits.

    python lessons/08_flash_v2/launch_cost.py      # GPU only; prints a table, saves it

Calls are issued back to back with no synchronisation between them, so the time per
call is what Python and the driver spend on the host. When that exceeds a call's GPU
time, the GPU idles between kernels: the call is host-bound (README, "Short sequences").
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # noqa: E401,E702
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import platform  # noqa: E402
import time  # noqa: E402

from common import runtime  # noqa: E402  (before triton)

if runtime.is_emulated():
    print("launch_cost.py times host launches on a GPU; nothing to do under emulation.")
    sys.exit(0)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.functional import scaled_dot_product_attention as sdpa  # noqa: E402

import flash_attn as fa  # noqa: E402
from common.results import gpu_slug  # noqa: E402
from common.timing import host_us  # noqa: E402


@triton.jit
def _tiny(X, n, B: tl.constexpr):
    i = tl.arange(0, B)
    tl.store(X + i, tl.load(X + i, mask=i < n) + 1, mask=i < n)


def main():
    x = torch.randn(128, device="cuda")
    b, s, h, d = 1, 128, 16, 128
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    p = fa._Problem(q, k, v, None, False)
    out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
    args = (q, k, v, out, lse, p.cu_q, p.cu_k, *p.strides(q), *p.strides(k), *p.strides(v),
            *p.strides(out), *p.lse_strides(lse), p.sq, p.sk, p.hq, p.scale * fa.LOG2E, p.key)
    consts = {**p.consts(fa._tma_ok(q, k, v, out)), "WARP_SPEC": False,
              "EARLY_QK": fa.EARLY_QK}
    grid = lambda meta: (triton.cdiv(p.sq, meta["BLOCK_M"]), p.batch * p.hq)  # noqa: E731
    triton.set_allocator(fa._allocator)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)

    def nograd():
        with torch.no_grad():
            fa.flash_attn_func(q, k, v)

    def fwd_bwd():
        qg.grad = kg.grad = vg.grad = None
        fa.flash_attn_func(qg, kg, vg).backward(dout)

    def sdpa_fwd_bwd():
        qg.grad = kg.grad = vg.grad = None
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa(qg.transpose(1, 2), kg.transpose(1, 2),
                 vg.transpose(1, 2)).transpose(1, 2).backward(dout)

    rows = {
        "a Triton kernel with 3 arguments": lambda: _tiny[(1,)](x, 100, B=128),
        "an eager torch op (torch.add)": lambda: torch.add(x, x),
        "_tma_ok(q, k, v, out)": lambda: fa._tma_ok(q, k, v, out),
        "_Problem(q, k, v, ...)": lambda: fa._Problem(q, k, v, None, False),
        "forward kernel, direct launch, explicit tile":
            lambda: fa._attn_fwd_kernel[grid](*args, **consts, BLOCK_M=128, BLOCK_N=64,
                                               num_warps=4, num_stages=2),
    }
    if fa._fwd_tuned is not None:
        rows["forward kernel through the autotuner"] = lambda: fa._fwd_tuned[grid](*args,
                                                                                  **consts)
    rows.update({
        "_flash_fwd (checks, buffers, launch)": lambda: fa._flash_fwd(q, k, v, p),
        "flash_attn_func, no grad": nograd,
        "flash_attn_func forward + backward": fwd_bwd,
        "SDPA flash forward + backward (peer)": sdpa_fwd_bwd,
    })
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"host time per call, {b}x{s}x{h}x{d} bf16 (GPU never the bottleneck)",
             f"{torch.cuda.get_device_name()}, {cpu}, {when}",
             f"torch {torch.__version__}, triton {triton.__version__}, "
             f"python {platform.python_version()}",
             ""]
    for name, fn in rows.items():
        lines.append(f"{name:46s} {host_us(fn, calls=300, warmup=5):8.1f} us")
    text = "\n".join(lines) + "\n"
    print(text)
    import os
    out_dir = pathlib.Path(os.environ.get("RESULTS_DIR")
                           or pathlib.Path(__file__).parent / "results")
    path = out_dir / f"launch_cost-{gpu_slug()}.txt"
    path.write_text(text)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
