"""Compile the decode kernel for an H100 (sm_90) without a GPU and report what it became.

    python lessons/09_mla/mla_compile_report.py                 # the default configs
    python lessons/09_mla/mla_compile_report.py 64,512,8,2 16,512,4,2   # BLOCK_M,DV,warps,stages

Triton compiles to a cubin for any target on any machine (its wheel ships ptxas), so the
compiler's answers cost no GPU time: registers per thread, bytes spilled to local memory,
shared memory per program, and the tensor-core layouts (which warps share which rows).
The README's "what limits us" quotes this report (made with triton 3.6.0, the GPU
image's version; other versions print other numbers).
"""

import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

# The kernel module imports common.runtime, which would switch Triton to its interpreter
# on a machine without a GPU; here we want the real compiler, so stand in for it.
os.environ.pop("TRITON_INTERPRET", None)
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]
import common  # noqa: E402

_rt = types.ModuleType("common.runtime")
_rt.is_emulated = lambda: False
_rt.is_gpu = lambda: True
sys.modules["common.runtime"] = common.runtime = _rt

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import flash_mla  # noqa: E402


def compile_decode(block_m, block_dv, num_warps, num_stages, seqlen_q=1, heads_q=128,
                   causal=False, dtype="bf16"):
    """Compile _mla_decode_kernel as a bench call (heads_k = 1) would; return a report."""
    fn = flash_mla._mla_decode_kernel
    rows = seqlen_q * heads_q
    ints = dict(stride_qb=seqlen_q * heads_q * 576, stride_qs=heads_q * 576, stride_qh=576,
                stride_kp=64 * 576, stride_kt=576, stride_kh=576, stride_bt=256,
                stride_ob=seqlen_q * heads_q * 512, stride_os=heads_q * 512, stride_oh=512,
                stride_lb=heads_q * seqlen_q, stride_lh=seqlen_q, stride_as=rows * 512,
                stride_ah=rows * 512, seqlen_q=seqlen_q, group=heads_q, rows=rows)
    unspecialized = {"batch", "max_len", "num_pages", "max_splits"}   # do_not_specialize
    ptrs = dict(q_ptr=dtype, k_ptr=dtype, out_ptr=dtype, block_table_ptr="i32",
                seqlens_ptr="i32", meta_ptr="i32", num_splits_ptr="i32", lse_ptr="fp32",
                o_acc_ptr="fp32", lse_acc_ptr="fp32", trace_ptr="i64", flags_ptr="i32")
    consts = dict(CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=64, D_LATENT=512, D_ROPE=64,
                  BLOCK_DV=block_dv, META=8, DOT_FP32=False, TRACE=False)
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):     # what the launcher would specialize on
        if name in ptrs:
            sig[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in consts:
            sig[name], constexprs[name] = "constexpr", consts[name]
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif name in unspecialized:
            sig[name] = "i32"
        elif ints[name] == 1:
            sig[name], constexprs[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    # The cubin Triton built (with its own ptxas): registers and stack frame (= spills).
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    mma = re.findall(r"#mma\d* = #ttg.nvidia_mma<\{versionMajor = (\d), versionMinor = \d, "
                     r"warpsPerCTA = \[(\d+), (\d+)\]", k.asm["ttgir"])
    return {"regs": int(regs.group(1)) if regs else None,
            "stack_bytes (spills)": int(stack.group(1)) if stack else None,
            "smem_bytes": k.metadata.shared,
            "mma layouts (version, warps along M x N)": [f"v{v} {m}x{n}" for v, m, n in mma]}


def main(argv):
    configs = ([tuple(int(x) for x in a.split(",")) for a in argv] if argv else
               [tuple(flash_mla.default_config(r))[:4] for r in (16, 32, 128, 256)])
    print(f"triton {triton.__version__}, target sm_90, heads_q 128, seqlen_q 1, bf16")
    for cfg in configs:
        try:
            print(cfg, compile_decode(*cfg))
        except Exception as e:  # e.g. too much shared memory is caught at launch, not here
            print(cfg, "failed:", type(e).__name__, str(e)[:200])


if __name__ == "__main__":
    main(sys.argv[1:])
