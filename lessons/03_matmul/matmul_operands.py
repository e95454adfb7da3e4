"""Checking the operands of ``C = A @ B`` before anything is launched.

Both kernel modules of this lesson (``matmul_numba``, ``matmul_triton``) call
:func:`check_matmul_operands` first, so a wrong call fails with one sentence that names
the problem instead of a kernel reading out of bounds.
"""

from __future__ import annotations

import torch

from common.checks import check_same_dtype_device


def check_matmul_operands(a, b, *, dtypes: tuple, who: str, why_not: dict | None = None):
    """Validate ``a`` (M x K) and ``b`` (K x N); return ``(M, N, K)``.

    Any strides are accepted (row-major, transposed views, slices): the kernels take the
    strides as arguments. What is rejected: non-tensors, non-2-D, sparse layouts, mismatched
    inner dimensions, dtypes or devices, a dtype the kernel does not implement, and a
    device the kernels cannot address (``cuda`` on a GPU; ``cpu`` under emulation).
    """
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.layout != torch.strided:
            raise ValueError(f"{who}: {name} is a {x.layout} tensor; only dense (strided) "
                             "tensors can be addressed by these kernels")
        if x.dim() != 2:
            raise ValueError(f"{who}: {name} must be 2-D (a matrix), got shape {tuple(x.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"{who}: inner dimensions differ: a is {tuple(a.shape)}, b is "
                         f"{tuple(b.shape)} (a.shape[1] must equal b.shape[0])")
    check_same_dtype_device(who, {"a": a, "b": b}, dtypes, why_not)
    M, K = a.shape
    N = b.shape[1]
    return M, N, K


def max_element_offset(x: torch.Tensor) -> int:
    """The largest element offset a kernel computes for ``x``: sum (size-1) * stride."""
    return sum((s - 1) * st for s, st in zip(x.shape, x.stride()) if s > 0)


def output_for(a: torch.Tensor, b: torch.Tensor, out, M: int, N: int, who: str) -> torch.Tensor:
    """``out`` checked (shape (M, N), a's dtype and device, no overlap with a or b), or a
    new (M, N) tensor. Tests pass a NaN-filled ``out``: an element the kernel never
    writes stays NaN and fails the check."""
    if out is None:
        return torch.empty((M, N), dtype=a.dtype, device=a.device)
    if not isinstance(out, torch.Tensor) or out.layout != torch.strided:
        raise TypeError(f"{who}: out must be a dense torch.Tensor")
    if tuple(out.shape) != (M, N) or out.dtype != a.dtype or out.device != a.device:
        raise ValueError(f"{who}: out must be ({M}, {N}) {a.dtype} on {a.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if out.numel() and 0 in out.stride():
        raise ValueError(f"{who}: out has a zero stride: several elements share memory")
    for name, x in (("a", a), ("b", b)):
        if _spans_overlap(out, x):
            raise ValueError(f"{who}: out overlaps {name}; the kernel would overwrite its "
                             "own input while reading it")
    return out


def _spans_overlap(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.numel() == 0 or y.numel() == 0:
        return False
    x0, y0 = x.data_ptr(), y.data_ptr()
    x1 = x0 + (max_element_offset(x) + 1) * x.element_size()
    y1 = y0 + (max_element_offset(y) + 1) * y.element_size()
    return x0 < y1 and y0 < x1
