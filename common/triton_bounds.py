"""Out-of-bounds loads and stores made loud under Triton's interpreter.

On a GPU, a ``tl.load`` whose lanes reach past the end of a tensor reads whatever lies
there (or faults, if the page is unmapped); ``compute-sanitizer`` reports it. Triton's
interpreter (``TRITON_INTERPRET=1``) does neither: it dereferences every pointer of the
block as a raw CPU address, so a kernel that forgot ``mask=`` reads a few bytes of the
CPU heap past the tensor, ignores them (the store was masked) and passes its tests. It
prints no warning either (checked with triton 3.6 and 3.9: ``_interpreter.load`` is plain
C++ with no bounds test). Under the interpreter, this module checks each access the way
compute-sanitizer's memcheck does on a GPU:

* when a kernel is launched, the memory of every tensor argument (its whole storage, so
  views and offsets are fine) is noted as an *allocation*;
* a masked ``tl.load`` without ``other=`` gives NaN in its masked-off lanes (floating
  types): Triton leaves those values undefined, the interpreter makes them 0, which
  would hide a kernel that sums or multiplies them (an accumulation along K, say);
* each ``tl.load`` / ``tl.store`` checks its **active** lanes (the ones ``mask`` lets through;
  masked-off lanes may point anywhere, that is what the mask is for): every address,
  with its element size, must lie inside one allocation. If one does not, the launch
  fails with :class:`OutOfBoundsAccess`, naming the nearest tensor argument and by how
  many elements the access misses it.

Use it with ``with checked(): kernel[grid](...)`` or ``install()`` / ``uninstall()``; the
test suite turns it on for every lesson test under emulation (root ``conftest.py``). It
does nothing on a GPU: there, ``make sanitize`` is the tool.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np


class OutOfBoundsAccess(IndexError):
    """An active lane of a tl.load / tl.store addressed memory outside every tensor argument."""


_state = threading.local()
_installed: dict = {}


def _allocations() -> list[tuple[int, int, str]]:
    return getattr(_state, "allocs", None) or []


def _note_args(fn, args_hst, kwargs_hst):
    """(start, end, description) of the storage behind each tensor argument."""
    import inspect

    names = list(inspect.signature(fn).parameters)
    allocs = []

    def note(name, a):
        if isinstance(a, (tuple, list)):
            for i, x in enumerate(a):
                note(f"{name}[{i}]", x)
            return
        base = getattr(a, "base", None)
        if base is not None and hasattr(a, "block_shape") and hasattr(base, "data_ptr"):
            a = base  # a TensorDescriptor: its tensor
        t = getattr(a, "base", a) if type(a).__name__ == "TensorWrapper" else a
        if not hasattr(t, "untyped_storage"):
            return
        st = t.untyped_storage()
        allocs.append((st.data_ptr(), st.data_ptr() + st.nbytes(),
                       f"{name} ({str(t.dtype).replace('torch.', '')}"
                       f"{list(t.shape)}, storage of {st.nbytes()} bytes)"))

    for i, a in enumerate(args_hst):
        note(names[i] if i < len(names) else f"arg{i}", a)
    for k, a in kwargs_hst.items():
        note(k, a)
    return allocs


def _check(kind: str, ptrs, mask, itemsize: int):
    allocs = _allocations()
    if not allocs:
        return
    addr = np.asarray(ptrs.data).astype(np.uint64, copy=False)
    active = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
    a = addr[active].astype(np.int64).ravel()
    if a.size == 0:
        return
    starts = np.array([s for s, _, _ in allocs], np.int64)
    ends = np.array([e for _, e, _ in allocs], np.int64)
    inside = (a[:, None] >= starts[None, :]) & (a[:, None] + itemsize <= ends[None, :])
    bad = ~inside.any(axis=1)
    if not bad.any():
        return
    first = int(a[bad][0])
    # nearest allocation, and how far off the access is, in elements
    dist = np.where(first < starts, starts - first, np.maximum(0, first + itemsize - ends))
    j = int(np.argmin(dist))
    s, e, what = allocs[j]
    where = (f"element {(first - s) // itemsize} of the {(e - s) // itemsize} in the storage"
             if first >= s else f"{(s - first + itemsize - 1) // itemsize} element(s) "
             "before the start")
    raise OutOfBoundsAccess(
        f"{kind} out of bounds under the Triton interpreter: {int(bad.sum())} active "
        f"lane(s) outside every tensor argument; the first is {where} of {what}. "
        f"A missing or wrong mask= (or offsets that step past the tensor)?")


def install() -> None:
    """Check every load/store of every interpreted launch from now on (idempotent)."""
    if _installed:
        return
    from triton.runtime import interpreter as it

    orig_init = it.GridExecutor._init_args_hst
    orig_call = it.GridExecutor.__call__
    orig_load = it.InterpreterBuilder.create_masked_load
    orig_store = it.InterpreterBuilder.create_masked_store

    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        _state.allocs = _note_args(self.fn, args_hst, kwargs_hst)
        return args_hst, kwargs_hst

    def __call__(self, *args, **kwargs):
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            _state.allocs = None

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        dtype_tt = ptrs.get_element_ty()
        dtype_np = np.dtype(it._get_np_dtype(dtype_tt))
        _check("tl.load", ptrs, mask, dtype_np.itemsize)
        if other is None and (dtype_np.kind == "f" or dtype_tt.is_bf16()):
            # tl.load: "If other is None, the masked-out value is undefined." The
            # interpreter returns 0, which hides a kernel that relies on it: NaN here
            # (bfloat16 is held as uint16 bits by the interpreter: 0x7FC0 is its NaN).
            nan = np.nan if dtype_np.kind == "f" else 0x7FC0
            other = it.TensorHandle(np.full(np.shape(ptrs.data), nan, dtype=dtype_np), dtype_tt)
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_policy):
        _check("tl.store", ptrs, mask, np.dtype(it._get_np_dtype(ptrs.get_element_ty())).itemsize)
        return orig_store(self, ptrs, value, mask, cache_policy)

    _installed.update(module=it, init=orig_init, call=orig_call, load=orig_load,
                      store=orig_store)
    it.GridExecutor._init_args_hst = _init_args_hst
    it.GridExecutor.__call__ = __call__
    it.InterpreterBuilder.create_masked_load = create_masked_load
    it.InterpreterBuilder.create_masked_store = create_masked_store


def uninstall() -> None:
    if not _installed:
        return
    it = _installed["module"]
    it.GridExecutor._init_args_hst = _installed["init"]
    it.GridExecutor.__call__ = _installed["call"]
    it.InterpreterBuilder.create_masked_load = _installed["load"]
    it.InterpreterBuilder.create_masked_store = _installed["store"]
    _installed.clear()


@contextlib.contextmanager
def checked():
    """``with checked():`` every interpreted launch inside is bounds-checked."""
    was = bool(_installed)
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
