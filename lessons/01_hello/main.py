"""Lesson 01: hello, GPU. Who each thread is, what the GPU is made of, and C++ from Python.

Runs, in order, and checks every result against NumPy:
  1. hello_kernel: a few threads print their block, thread, warp and lane;
  2. global_index / whoami / grid_stride_index: every thread writes its index into an
     array, at ragged sizes and several block sizes;
  3. the device's properties through cuda.core, and what each means for later lessons
     (under emulation: what Numba's simulator pretends);
  4. a CUDA C++ SAXPY compiled with NVRTC (no GPU needed), launched on the GPU if any.

--bench (GPU only): the NVRTC SAXPY against torch.add(y, x, alpha=a), in GB/s and as a
fraction of the measured copy bandwidth; saves results/saxpy-<gpu>.json and .png.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # noqa: E401,E702
from common.cli import lesson_args  # noqa: E402


def _add_arguments(parser):
    parser.add_argument("--ptx", action="store_true",
                        help="print the whole PTX of the SAXPY kernel, not only its key lines")


args = lesson_args(__doc__, _add_arguments)

# Only now, with the runtime selected, import what loads numba (the lesson's modules).
import time  # noqa: E402

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

import device_props  # noqa: E402
import hello_kernels as hk  # noqa: E402
import nvrtc_saxpy  # noqa: E402
from common import runtime  # noqa: E402
from common.checks import assert_close  # noqa: E402

console = Console()
rng = np.random.default_rng(2024)


def part1_hello():
    console.rule("1. Threads say hello: hello_kernel[2, 4]()")
    hk.say_hello(num_blocks=2, block_size=4)
    where = ("blocks run one after another, threads of a block as Python threads"
             if runtime.is_emulated() else
             "blocks and warps are scheduled in no fixed order; lines of one warp stay together")
    console.print(f"[dim]8 threads, 8 lines. Order: {where}.[/dim]")


def part2_indices():
    console.rule("2. Which element is mine? i = blockIdx.x * blockDim.x + threadIdx.x")
    # The picture of README.md, computed: 10 elements, blocks of 4 threads (3 blocks; the
    # last has 2 idle threads).
    who = hk.whoami(10, block_size=4)
    pic = Table(title="whoami(n=10, block_size=4): who wrote element i", show_header=True)
    pic.add_column("element i", style="bold")
    for i in range(10):
        pic.add_column(str(i), justify="right")
    for field in ("block", "thread", "warp", "lane"):
        pic.add_row(field, *[str(v) for v in who[field]])
    console.print(pic)

    checks = Table(title="every thread writes its index; each result == its NumPy spec")
    for col in ("kernel", "n", "block x grid", "idle threads", "spec"):
        checks.add_column(col, justify="left" if col in ("kernel", "spec") else "right")

    def row(kernel, n, block, grid, spec, idle=None):
        idle = grid * block - n if idle is None else idle
        checks.add_row(kernel, f"{n:,}", f"{block} x {grid:,}", f"{idle:,}", f"[green]{spec}[/green]")

    sizes = runtime.pick([1, 17, 1000, 10_000_019], [1, 17, 1000])
    for n in sizes:
        for block in (32, 256, 1024):
            got = hk.global_index(n, block_size=block)
            assert_close(got, np.arange(n), atol=0, rtol=0, name=f"global_index(n={n}, block={block})")
            row("global_index", n, block, hk.num_blocks_for(n, block), "arange(n)")

    # A block of 48 threads is one full warp and half of another.
    n = runtime.pick(1_000_003, int(rng.integers(100, 300)))
    got = hk.whoami(n, block_size=48)
    spec = hk.whoami_spec(n, block_size=48)
    for field in spec:
        assert_close(got[field], spec[field], atol=0, rtol=0, name=f"whoami {field}")
    row("whoami", n, 48, hk.num_blocks_for(n, 48), "whoami_spec")

    # Grid-stride: the grid is sized for the machine, not for the data.
    block, blocks = runtime.pick((256, 4 * 132), (32, 2))
    n = runtime.pick(10_000_019, 1000)
    index, writer = hk.grid_stride_index(n, block_size=block, num_blocks=blocks)
    want_index, want_writer = hk.grid_stride_spec(n, block, blocks)
    assert_close(index, want_index, atol=0, rtol=0, name="grid_stride index")
    assert_close(writer, want_writer, atol=0, rtol=0, name="grid_stride writer")
    row("grid_stride", n, block, blocks, f"writer = i % {block * blocks}", idle=max(0, block * blocks - n))
    console.print(checks)


def part3_device():
    console.rule("3. What the GPU is made of (cuda.core.Device().properties)")
    facts = None
    try:
        props = device_props.read_properties(0)
        facts = device_props.explain(props)
        title = f"{props['name']}: properties and what they mean for the course"
    except RuntimeError as e:
        console.print(f"[yellow]{e}.[/yellow]")
    if facts is not None:
        _fact_table(title, facts)
    if runtime.is_emulated():
        _fact_table("Numba's CUDA simulator: what it pretends", device_props.simulator_facts())


def _fact_table(title, facts):
    table = Table(title=title)
    table.add_column("property", style="bold")
    table.add_column("value", justify="right")
    table.add_column("what it means")
    for f in facts:
        table.add_row(f.name, f.value, f.meaning)
    console.print(table)


# What each key PTX instruction of SAXPY is, for the annotated listing.
_PTX_NOTES = [
    ("%ctaid.x", "blockIdx.x  (ctaid: cooperative thread array = block)"),
    ("%ntid.x", "blockDim.x"),
    ("%tid.x", "threadIdx.x"),
    ("setp.", "i >= n ? sets a predicate ..."),
    ("bra", "... and idle threads branch to the end"),
    ("ld.global.nc", "load x[i] / y[i] through the read-only cache (const __restrict__)"),
    ("fma.rn.f32", "a * x[i] + y[i]: one fused multiply-add, rounded once"),
    ("st.global", "store out[i]"),
]


def part4_nvrtc():
    console.rule("4. CUDA C++ from Python: NVRTC -> cubin -> launch (cuda.core)")
    console.print(nvrtc_saxpy.SAXPY_SOURCE.strip(), highlight=False, markup=False, soft_wrap=True)
    if runtime.is_gpu():
        from cuda.core import Device
        dev = Device(0)
        dev.set_current()
        arch = f"sm_{dev.arch}"   # a cubin runs only on the arch it was built for
    else:
        arch = nvrtc_saxpy.DEFAULT_ARCH
    t0 = time.perf_counter()
    module = nvrtc_saxpy.saxpy_module(arch)
    ms = (time.perf_counter() - t0) * 1e3
    cubin = module.code
    assert cubin[:4] == b"\x7fELF", "a cubin is an ELF file"
    console.print(f"\nNVRTC compiled saxpy.cu for {arch} in {ms:.0f} ms: a {len(cubin):,}-byte "
                  f"cubin (ELF) - no GPU or driver was needed for this step.")

    ptx = nvrtc_saxpy.ptx_of(nvrtc_saxpy.SAXPY_SOURCE, name="saxpy.cu", arch=arch)
    if args.ptx:
        console.print(ptx, highlight=False, markup=False, soft_wrap=True)
    else:
        table = Table(title=f"key lines of the PTX ({len(ptx.splitlines())} lines; --ptx prints all)")
        table.add_column("PTX", style="cyan", no_wrap=True)
        table.add_column("what it is")
        for line in ptx.splitlines():
            for key, note in _PTX_NOTES:
                if key in line:
                    table.add_row(escape(" ".join(line.split())), escape(note))
                    break
        console.print(table)

    if not runtime.is_gpu():
        console.print("[yellow]Launching needs a GPU: skipped under emulation "
                      "(the compile above is the part that runs anywhere).[/yellow]")
        return
    import torch
    from common.checks import poisoned
    kernel = nvrtc_saxpy.load_saxpy(0)
    console.print(f"loaded on the GPU: {kernel.num_arguments} arguments, "
                  f"{kernel.attributes.num_regs} registers per thread")
    table = Table(title="saxpy (NVRTC, launched with cuda.core) vs NumPy float64")
    for col in ("n", "block", "max abs error", "check"):
        table.add_column(col, justify="right")
    for n, block in ((1, 32), (17, 128), (1000, 256), (runtime.pick(10_000_019, 4099), 256)):
        a = float(rng.standard_normal())
        x = torch.randn(n, device="cuda")
        y = torch.randn(n, device="cuda")
        out = poisoned((n,), torch.float32, "cuda")
        nvrtc_saxpy.saxpy(a, x, y, out=out, block_size=block)
        want = np.float32(a).astype(np.float64) * x.cpu().double().numpy() + y.cpu().double().numpy()
        assert_close(out, want, name=f"saxpy n={n}")
        err = float(np.abs(out.cpu().double().numpy() - want).max())
        table.add_row(f"{n:,}", str(block), f"{err:.2e}", "[green]ok[/green]")
    console.print(table)


def benchmark():
    """NVRTC SAXPY vs torch at sizes from launch-bound to bandwidth-bound."""
    import torch

    from common.ceilings import measure_ceilings
    from common.checks import poisoned
    from common.results import BenchReport
    from common.timing import bench, gbps

    ceilings = measure_ceilings()
    report = BenchReport("01_hello", "saxpy", metric="GB/s", ceilings=ceilings,
                         title="SAXPY out = a*x + y, float32: NVRTC C++ kernel vs torch")
    a = 1.7
    for n in (2**16, 2**20, 2**24, 2**28):
        x = torch.randn(n, device="cuda")
        y = torch.randn(n, device="cuda")
        out = poisoned((n,), torch.float32, "cuda")
        out_ref = torch.empty_like(x)
        nbytes = 3 * n * 4  # read x, read y, write out: 4 bytes each per element
        t_ours = bench(lambda: nvrtc_saxpy.saxpy(a, x, y, out=out))
        t_torch = bench(lambda: torch.add(y, x, alpha=a, out=out_ref))
        assert_close(out, out_ref, name=f"saxpy n={n}")  # the timed output, checked
        for impl, t, peer in (("nvrtc saxpy", t_ours, False),
                              ("torch.add(y, x, alpha=a)", t_torch, True)):
            v = gbps(nbytes, t.median_ms)
            report.add({"n": n}, impl, t, v, peer=peer,
                       pct_of_copy=round(100 * v / ceilings["copy_gbps"], 1))
        del x, y, out, out_ref
    report.print()
    path = report.save()
    _plot(report, ceilings, path.with_suffix(".png"))
    console.print(f"saved {path} and {path.with_suffix('.png').name}")


def _plot(report, ceilings, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for impl in dict.fromkeys(r.impl for r in report.rows):
        rows = [r for r in report.rows if r.impl == impl]
        ax.plot([r.case["n"] for r in rows], [r.value for r in rows], marker="o", label=impl)
    ax.axhline(ceilings["copy_gbps"], ls="--", c="gray",
               label=f"measured copy ceiling {ceilings['copy_gbps']:,.0f} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("elements n (float32)")
    ax.set_ylabel("GB/s (3 x 4 bytes per element)")
    ax.set_title(f"SAXPY on {runtime.probe_gpu().name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main():
    if args.bench:
        benchmark()
        return
    part1_hello()
    part2_indices()
    part3_device()
    part4_nvrtc()
    console.rule("[green]lesson 01: every check passed[/green]")


if __name__ == "__main__":
    main()
