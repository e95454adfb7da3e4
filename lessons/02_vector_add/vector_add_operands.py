"""Checking the operands of ``out = a + b`` before anything is launched.

Both kernel modules of this lesson (``vector_add_numba``, ``vector_add_triton``) call
:func:`check_operands` first: every way a caller can get it wrong gets one sentence that
names the problem, *before* a launch, because a kernel handed the wrong thing does not
fail politely - it reads garbage, writes out of bounds, or dies with an unrelated message.
"""

from __future__ import annotations

import torch

from common.checks import check_same_dtype_device


def check_operands(a, b, out, *, dtypes: tuple, who: str, why_not: dict | None = None):
    """Validate ``a``, ``b`` (and ``out`` if given) for an elementwise kernel.

    Returns ``out``, allocated when None. Rules:

    * torch tensors, same shape, same dtype, same device;
    * the device is the one the kernels run on (``cuda`` on a GPU; ``cpu`` under
      emulation, where Numba's simulator and Triton's interpreter read host memory);
    * dtype in ``dtypes`` (``why_not`` maps a rejected dtype to the reason);
    * contiguous: the kernels address element ``i`` as ``base + i``, so a strided view
      (``x[::2]``, ``x.t()``) cannot be read as given - the error says to call
      ``.contiguous()``;
    * ``out`` does not overlap an input except by being the same tensor (in place is fine:
      each element is read before it is written, by the same thread).
    """
    for name, x in (("a", a), ("b", b)) + ((("out", out),) if out is not None else ()):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.layout != torch.strided:
            raise ValueError(f"{who}: {name} is a {x.layout} tensor; only dense (strided) tensors "
                             "can be addressed by these kernels")
    if a.shape != b.shape:
        raise ValueError(f"{who}: shapes differ: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    check_same_dtype_device(who, {"a": a, "b": b}, dtypes, why_not)
    for name, x in (("a", a), ("b", b)):
        if not x.is_contiguous():
            raise ValueError(f"{who}: {name} is not contiguous (strides {tuple(x.stride())}); "
                             f"the kernel reads element i at base + i: pass {name}.contiguous()")
    if out is None:
        return torch.empty_like(a, memory_format=torch.contiguous_format)
    if out.shape != a.shape or out.dtype != a.dtype or out.device != a.device:
        raise ValueError(f"{who}: out must have a's shape, dtype and device: got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{who}: out is not contiguous; pass a contiguous tensor")
    for name, x in (("a", a), ("b", b)):
        if out.data_ptr() != x.data_ptr() and _overlap(out, x):
            raise ValueError(f"{who}: out partly overlaps {name}; threads would read elements "
                             "other threads already wrote: use a separate output or exactly "
                             f"{name} (in place)")
    return out


def _overlap(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.numel() == 0 or y.numel() == 0:
        return False
    x0, y0 = x.data_ptr(), y.data_ptr()
    x1, y1 = x0 + x.numel() * x.element_size(), y0 + y.numel() * y.element_size()
    return x0 < y1 and y0 < x1
