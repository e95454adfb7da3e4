"""One way to check a kernel's output.

* :func:`poisoned` / :func:`poison`: outputs start as NaN, so an element the kernel
  forgot to write cannot pass (zeros would hide it).
* :func:`assert_close`: dtype-aware tolerances, NaN never passes, and a message that says
  how far off the worst element is and where.
* :func:`assert_error_within`: flash-attn's rule of thumb for low-precision kernels: the
  kernel's error against a high-precision reference may be at most ``factor`` times the
  error of the same computation done by PyTorch in the input dtype, plus a small slack.

All of them take torch tensors or NumPy arrays.
"""

from __future__ import annotations

import numpy as np

# (atol, rtol) per dtype of the *output*. float32 kernels differ from a float64 or
# float32 reference by summation order only (~1e-6 relative); fp16 keeps 11 significant
# bits (~5e-4), bf16 only 8 (~4e-3): the tolerances leave a few ulps for accumulation.
TOLERANCES = {
    "float64": (1e-10, 1e-8),
    "float32": (1e-5, 1e-4),
    "float16": (2e-3, 2e-3),
    "bfloat16": (1.6e-2, 1.6e-2),
}


def _to_numpy(x) -> np.ndarray:
    try:
        import torch
        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", dtype=torch.float64).numpy()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(x, "copy_to_host"):  # numba device array
        x = x.copy_to_host()
    return np.asarray(x, dtype=np.float64)


def _dtype_name(x) -> str:
    """'float32' for a tensor or array, and for a dtype given as such (``dtype=torch.float16``,
    ``np.float32``, ``"bfloat16"``); 'float64' for anything without a dtype."""
    if isinstance(x, str):
        return x.replace("torch.", "")
    if isinstance(x, type) and issubclass(x, np.generic):
        return np.dtype(x).name
    if hasattr(x, "dtype"):
        x = x.dtype
    elif not isinstance(x, np.dtype) and type(x).__name__ != "dtype":
        return "float64"
    return str(x).replace("torch.", "")


def poison(x):
    """Fill a float array/tensor with NaN in place and return it."""
    if hasattr(x, "fill_"):
        x.fill_(float("nan"))
    else:
        x[...] = np.nan
    return x


def poisoned(shape, dtype, device=None):
    """A new NaN-filled torch tensor (use for outputs the kernel must fully write)."""
    import torch
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rel_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| (Frobenius); inf if anything is NaN."""
    a, e = _to_numpy(actual), _to_numpy(expected)
    if np.isnan(a).any():
        return float("inf")
    denom = np.linalg.norm(e)
    return float(np.linalg.norm(a - e) / (denom if denom > 0 else 1.0))


def max_abs_error(actual, expected) -> float:
    a, e = _to_numpy(actual), _to_numpy(expected)
    finite = np.isfinite(e)
    if np.isnan(a).any() or (a[~finite] != e[~finite]).any():
        return float("inf")
    with np.errstate(invalid="ignore"):  # inf - inf where both are inf: not counted
        return float(np.abs(a - e)[finite].max(initial=0.0))


def assert_close(actual, expected, *, dtype=None, atol=None, rtol=None, name="output"):
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    Tolerances default from ``dtype`` (or ``actual``'s dtype). Infinities must match
    exactly (lse of an empty row is +inf); NaN in ``actual`` always fails.
    """
    dname = _dtype_name(dtype if dtype is not None else actual)
    d_atol, d_rtol = TOLERANCES.get(dname, TOLERANCES["float32"])
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a, e = _to_numpy(actual), _to_numpy(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
    if a.size == 0:
        return
    nan = np.isnan(a) & ~np.isnan(e)
    if nan.any():
        idx = tuple(int(i) for i in np.argwhere(nan)[0])
        raise AssertionError(f"{name}: {int(nan.sum())} of {a.size} elements are NaN "
                             f"(first at {idx}): never written, or computed from garbage")
    inf = ~np.isfinite(e)
    if (a[inf] != e[inf]).any():
        idx = tuple(int(i) for i in np.argwhere(inf & (a != e))[0])
        raise AssertionError(f"{name}: at {idx} expected {e[idx]}, got {a[idx]}")
    with np.errstate(invalid="ignore"):  # inf - inf where both are inf: masked next
        err = np.where(inf, 0.0, np.abs(a - e))
    bound = atol + rtol * np.where(inf, 0.0, np.abs(e))
    bad = err > bound
    if bad.any():
        idx = np.unravel_index(int(np.argmax(err - bound)), err.shape)
        raise AssertionError(
            f"{name} ({dname}): {int(bad.sum())} of {a.size} elements out of tolerance "
            f"(atol={atol:g}, rtol={rtol:g}); worst at {tuple(int(i) for i in idx)}: "
            f"got {a[idx]:.6g}, expected {e[idx]:.6g}; max abs error "
            f"{err.max():.3g}, relative error {rel_error(a, e):.3g}")


def assert_error_within(actual, baseline, reference, *, factor: float = 2.0,
                        slack: float = 1e-5, name="output"):
    """flash-attn's test rule: max|actual - ref| <= factor * max|baseline - ref| + slack.

    ``baseline`` is the same computation done by PyTorch in the kernel's own precision
    (e.g. attention on bf16 tensors); ``reference`` is the float32/float64 ground truth.
    A low-precision kernel is then held to "no worse than PyTorch at that precision".
    """
    err = max_abs_error(actual, reference)
    base = max_abs_error(baseline, reference)
    if not err <= factor * base + slack:
        raise AssertionError(f"{name}: max abs error {err:.3g} exceeds {factor:g} x "
                             f"PyTorch-in-same-precision error {base:.3g} + {slack:g}")


def check_same_dtype_device(who: str, tensors: dict, dtypes, why_not: dict | None = None):
    """Input validation the kernels' wrappers share, before any launch.

    ``tensors`` maps argument names to torch tensors that must share one dtype (one of
    ``dtypes``; ``why_not`` may explain an unsupported one) and one device, the device
    the active runtime launches on (``cuda`` on a GPU, ``cpu`` under emulation).
    Raises TypeError/ValueError with one sentence naming the problem.
    """
    from common import runtime

    (n0, t0), *rest = tensors.items()
    for name, t in rest:
        if t.dtype != t0.dtype:
            raise TypeError(f"{who}: dtypes differ: {n0} {t0.dtype} vs {name} {t.dtype}; "
                            "cast one of them")
        if t.device != t0.device:
            raise ValueError(f"{who}: devices differ: {n0} on {t0.device}, {name} on {t.device}")
    if t0.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        reason = (why_not or {}).get(t0.dtype, "")
        raise TypeError(f"{who}: dtype {str(t0.dtype).replace('torch.', '')} is not supported "
                        f"(supported: {names}){': ' + reason if reason else ''}")
    want = runtime.torch_device()
    if t0.device.type != want:
        where = ("this machine runs the kernels on the GPU" if want == "cuda" else
                 "under emulation the kernels run on the CPU")
        raise ValueError(f"{who}: the inputs are on {t0.device}, but {where}: move them with "
                         f".to('{want}')")


def check_attention_inputs(q, k, v, softmax_scale, *, dtypes, head_dims) -> float:
    """Validate (batch, seqlen, heads, headdim) q, k, v for the Numba attention kernels
    (same heads for q and k/v), before any launch; return the softmax scale as a float."""
    import math

    import torch

    from common import runtime

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, headdim), "
                             f"got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"dtype {q.dtype} is not supported ({names})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    want = runtime.torch_device()
    if q.device.type != want:
        raise ValueError(f"tensors are on {q.device} but the kernels run on "
                         f"{'the GPU' if want == 'cuda' else 'the CPU simulator'}: "
                         f"move them to '{want}'")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, "
                         "heads and headdim")
    if q.shape[3] not in head_dims:
        raise ValueError(f"head dim {q.shape[3]} is not supported (one of {head_dims})")
    scale = q.shape[3] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return scale
