"""Lesson 04: parallel reduction. Harris's ladder in Numba-CUDA, sum and max of float32.

Runs every rung (parallel_reduction.RUNGS) on random data, for sum and for max, and checks
  * bit for bit against the NumPy spec of its order of operations (reduction_order.spec);
    the atomic rung, whose blocks add in any order, within the bound of that last step;
  * against a float64 sum, within the rung's error bound gamma(d) * sum|x|;
then prints how the error of each order of summation grows with n (float32, uniform
[0, 1) data: no cancellation, so the relative error is the whole story). Under emulation
those errors come from the specs, which the tests prove equal to the kernels bit for bit.

--bench (GPU only): every rung's GB/s on 2^28 float32 beside torch.sum / torch.amax in
the same run, the measured errors of every rung against n up to 2^28, and two plots.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # noqa: E401,E702
from common.cli import lesson_args  # noqa: E402


def _add_arguments(parser):
    parser.add_argument("--n", type=int, default=None,
                        help="elements for the correctness run (default: 2^24+3 on a GPU, "
                             "300 under emulation)")


args = lesson_args(__doc__, _add_arguments)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import parallel_reduction as pr  # noqa: E402
import reduction_order as ro  # noqa: E402
from common import runtime  # noqa: E402

console = Console()
if not console.is_terminal:  # a pipe or a log: do not squeeze the tables to 80 columns
    console = Console(width=120)
rng = np.random.default_rng(4)


def check_result(x_np: np.ndarray, op: str, rung: str, got: float, launches) -> tuple[str, float]:
    """Compare a kernel's result with its spec; return (verdict, error vs float64)."""
    exact = float(x_np.astype(np.float64).sum()) if op == "sum" else float(x_np.max())
    err = abs(got - exact)
    spec = ro.spec(x_np, op, rung, pr.BLOCK, launches)
    if rung == "grid_stride_atomic":
        if op == "max":
            assert got == float(spec.max()), f"{rung} max: {got} != {spec.max()}"
            verdict = "= spec"
        else:
            centre, slack = ro.atomic_result_bound(spec)
            assert abs(got - centre) <= slack, f"{rung}: {got} not within {slack} of {centre}"
            verdict = "in atomic bound"
    else:
        assert np.float32(got) == spec, f"{rung} {op}: {got!r} != spec {spec!r} (bitwise)"
        verdict = "= spec"
    if op == "sum":
        bound = ro.error_bound(x_np, rung, pr.BLOCK, launches)
        assert err <= bound, f"{rung}: error {err} above its bound {bound}"
    else:
        assert err == 0, f"max is exact, got error {err}"
    return verdict, err


def correctness():
    n = args.n or runtime.pick(2**24 + 3, 300)
    x_np = rng.standard_normal(n).astype(np.float32)
    x = torch.from_numpy(x_np).to(runtime.torch_device())
    table = Table(title=f"every rung on n = {n:,} random float32 (block {pr.BLOCK}); bound = "
                        "gamma(d) * sum|x|; '= spec': bit for bit equal to its NumPy spec")
    for col in ("rung", "op", "grids", "result", "|err| vs f64", "bound", "check"):
        table.add_column(col, justify="left" if col in ("rung", "op", "check") else "right")
    for rung, r in pr.RUNGS.items():
        launches = pr.passes(rung, n)
        for op in ("sum", "max"):
            got = float(pr.reduce(x, op, rung).item())
            verdict, err = check_result(x_np, op, rung, got, launches)
            bound = ro.error_bound(x_np, rung, pr.BLOCK, launches) if op == "sum" else 0.0
            table.add_row(r.title if op == "sum" else "", op,
                          " + ".join(str(g) for g, _ in launches), f"{got:.7g}",
                          f"{err:.2e}", f"{bound:.2e}", f"[green]{verdict}[/green]")
    console.print(table)
    empty = torch.empty(0, device=runtime.torch_device())
    assert pr.reduce_sum(empty).item() == 0.0 and pr.reduce_max(empty).item() == -np.inf
    console.print("empty input: sum = 0, max = -inf (the identities), no launch.")


def error_growth():
    """Relative error of each order against n, from the specs (== the kernels)."""
    sizes = [2**k for k in range(8, 21, 3)]
    table = Table(title="relative error |s - exact| / sum|x| of float32 sums of uniform [0,1) "
                        "data, from the specs (= the kernels, bit for bit); seq = left to right")
    table.add_column("n", justify="right")
    names = ["sequential_cpu"] + [r for r in pr.RUNGS if r != "grid_stride_atomic"]
    for name in names:
        table.add_column("seq" if name == "sequential_cpu" else pr.RUNGS[name].title[0],
                         justify="right")
    table.add_column("gamma(log2 n)", justify="right")
    for n in sizes:
        x = rng.random(n, dtype=np.float32)
        exact = x.astype(np.float64).sum()
        row = [f"2^{int(np.log2(n))}"]
        for name in names:
            if name == "sequential_cpu":
                s = ro.sequential_sum(x)
            else:
                s = ro.spec(x, "sum", name, pr.BLOCK, pr.passes(name, n))
            row.append(f"{abs(float(s) - exact) / exact:.1e}")
        row.append(f"{ro.gamma(int(np.ceil(np.log2(n)))):.1e}")
        table.add_row(*row)
    console.print(table)


def main():
    if args.bench:
        import reduction_bench
        reduction_bench.run(console)
        return
    correctness()
    error_growth()
    console.rule("[green]lesson 04: every check passed[/green]")


if __name__ == "__main__":
    main()
