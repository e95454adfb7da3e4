"""Warp-level intrinsics for Numba's CUDA simulator (which has none of them).

Numba's simulator runs every CUDA thread of a block as a Python thread, and its
``cuda`` object inside a kernel (``numba.cuda.simulator.kernelapi.FakeCUDAModule``)
knows ``syncthreads`` and atomics but not ``shfl_*_sync``, ``syncwarp`` or the vote
functions (docs/environment.md). A reduction that ends with warp shuffles could then be
tested only on a GPU. This module adds them, with the semantics the GPU has:

* **Same signatures as Numba's compiled intrinsics** (``numba/cuda/intrinsics.py``,
  ``cudadecl.py``): ``shfl_sync(mask, value, src_lane)``, ``shfl_up_sync(mask, value,
  delta)``, ``shfl_down_sync(mask, value, delta)``, ``shfl_xor_sync(mask, value,
  lane_mask)``, ``syncwarp(mask=0xffffffff)``, ``all_sync``, ``any_sync``, ``eq_sync``,
  ``ballot_sync``, ``match_any_sync``, ``match_all_sync``, ``lanemask_lt``. Numba's
  shuffles take no ``width`` argument: they compile to PTX ``shfl.sync`` with the clamp
  operand ``c = 0x1f`` (``0`` for ``up``), i.e. one 32-lane segment. Nothing here
  accepts an argument Numba would refuse, so code that passes under emulation compiles
  for the GPU.
* **The PTX definition of the source lane** (PTX ISA, ``shfl.sync``), including the
  segment (``width``) encoding of ``c`` that CUDA C's ``__shfl_*_sync(..., width)`` uses:
  :func:`ptx_source_lane` is that pseudo-code line by line, and :func:`shuffle` exposes
  it with a ``width`` for code that wants CUDA C's sub-warp segments (an emulator-only
  helper: Numba has no such argument). ``b`` is used modulo 32 (``b[4:0]``), the mask
  as 32 bits, exactly as the hardware does. A lane whose source is out of its segment
  gets its own value back.
* **Synchronisation like the hardware.** A call returns only when every lane named in
  ``mask`` that exists in the block and has not exited has made a call with the same
  mask: a per-warp barrier with an exchange buffer. Lanes of one warp may run separate
  exchanges on disjoint masks (independent thread scheduling, Volta and later).
  Lanes named in the mask that do not exist (the last warp of a block of, say, 48
  threads) or have exited are not waited for, as on the GPU.
* **Undefined behaviour is an error, not a silent value.** Where CUDA says the result
  is undefined the emulator raises :class:`WarpSyncError` naming the lanes: the caller's
  own lane missing from ``mask``; lanes of one mask calling different intrinsics;
  a shuffle reading a lane that did not take part (exited, absent, or outside ``mask``);
  a lane named in ``mask`` stuck in ``syncthreads`` while the others wait at a warp
  barrier (a deadlock on the GPU); no progress for ``WARP_SIM_TIMEOUT`` seconds (60).
  Value types outside Numba's (``int32/int64/float32/float64`` for shuffles and
  matches) raise ``TypeError``, as Numba's typing would.

What it cannot do: ``activemask()`` depends on which lanes the hardware happens to have
converged, which Python threads do not model, so it stays missing (AttributeError), as
does anything else not listed above. Threads of a simulated block share memory under
the GIL, so a missing ``syncwarp`` between shared-memory steps is *not* reliably caught
as a race; the barrier it provides when present is real.

Use: ``from common import warp_sim; warp_sim.install()`` in the kernel module. Under a
real GPU ``install()`` does nothing and returns False (Numba's compiled intrinsics are
used); under emulation it adds the functions to ``FakeCUDAModule`` (only those the
simulator lacks) and records each simulated thread with its block so that exits and
``syncthreads`` waits can be seen. ``install()`` is idempotent.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from common import runtime

WARP_SIZE = 32
FULL_MASK = 0xFFFFFFFF

# shfl.sync modes, numbered as in PTX and Numba's intrinsics.py
MODE_IDX, MODE_UP, MODE_DOWN, MODE_BFLY = 0, 1, 2, 3
_MODE_NAMES = {MODE_IDX: "shfl_sync", MODE_UP: "shfl_up_sync", MODE_DOWN: "shfl_down_sync",
               MODE_BFLY: "shfl_xor_sync"}

# How long a lane may wait at a warp barrier without any progress before it is called a
# hang, and how long a lane named in the mask may sit in syncthreads() before that is
# called a deadlock (the grace period covers the simulator's own release of syncthreads).
TIMEOUT_S = float(os.environ.get("WARP_SIM_TIMEOUT", "60"))
SYNCTHREADS_GRACE_S = 0.5
_POLL_S = 0.005


class WarpSyncError(RuntimeError):
    """A warp intrinsic was used in a way whose result is undefined on the GPU."""


# ----------------------------------------------------------------------------------------
# The PTX definition of shfl.sync, as pure functions (no threads): easy to test alone.

def clamp_operand(mode: int, width: int = WARP_SIZE) -> int:
    """The ``c`` operand CUDA C passes to ``shfl.sync`` for a segment of ``width`` lanes.

    ``c[12:8]`` is the segment mask (``32 - width``) and ``c[4:0]`` the clamp: 31 for
    idx/down/bfly (the last lane of the segment) and 0 for up (the first). Numba's
    intrinsics use ``width = 32``: ``0x1f``, or ``0`` for ``up``.
    """
    if width not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"width must be a power of two from 1 to 32, got {width}")
    seg = (WARP_SIZE - width) << 8
    return seg if mode == MODE_UP else seg | 0x1F


def ptx_source_lane(mode: int, lane: int, b: int, c: int) -> tuple[int, bool]:
    """``(j, pval)``: the lane ``lane`` reads from, per the PTX ISA pseudo-code of
    ``shfl.sync``; ``pval`` False means the source was out of range and ``j = lane``."""
    bval = b & 0x1F
    cval = c & 0x1F
    segmask = (c >> 8) & 0x1F
    max_lane = (lane & segmask) | (cval & ~segmask & 0x1F)
    min_lane = lane & segmask
    if mode == MODE_UP:
        j = lane - bval
        pval = j >= max_lane
    elif mode == MODE_DOWN:
        j = lane + bval
        pval = j <= max_lane
    elif mode == MODE_BFLY:
        j = lane ^ bval
        pval = j <= max_lane
    elif mode == MODE_IDX:
        j = min_lane | (bval & ~segmask & 0x1F)
        pval = j <= max_lane
    else:
        raise ValueError(f"unknown shfl mode {mode}")
    return (j if pval else lane), pval


# ----------------------------------------------------------------------------------------
# Value checks that mirror Numba's typing of the compiled intrinsics.

_SHFL_TYPES = (np.int32, np.int64, np.float32, np.float64)


def _check_shfl_value(name: str, value):
    if isinstance(value, (bool, np.bool_)) or not (
            isinstance(value, (int, float)) or isinstance(value, _SHFL_TYPES)):
        raise TypeError(f"{name} only supports 32- and 64-bit ints and floats "
                        f"(int32, int64, float32, float64), got {type(value).__name__}")


def _check_int(name: str, what: str, x) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: {what} must be an integer, got {type(x).__name__}")
    return int(x)


def _bits(value) -> int:
    """The bit pattern Numba's match_*_sync compares (floats by their bits)."""
    if isinstance(value, float) and not isinstance(value, np.floating):
        value = np.float64(value)
    if isinstance(value, int) and not isinstance(value, np.integer):
        value = np.int64(value)
    arr = np.asarray(value)
    return int(arr.view(np.int64 if arr.itemsize == 8 else np.int32))


def _as_int32(bits: int) -> np.int32:
    """Numba types ballot/match results as int32: bit 31 set reads negative."""
    return np.uint32(bits & FULL_MASK).view(np.int32)


# ----------------------------------------------------------------------------------------
# The per-warp barrier and exchange buffer.

@dataclass
class _Round:
    """One exchange: the lanes of ``mask`` deposit (value, b) and wait for the results."""
    op: str
    mask: int
    expected: int  # lanes of the mask that exist in the block
    arrivals: dict = field(default_factory=dict)  # lane -> (value, b)
    results: dict | None = None
    error: str | None = None


class _Warp:
    def __init__(self, index: int, lanes_in_block: int):
        self.index = index
        self.lanes_in_block = lanes_in_block  # 32, or fewer in a block's last warp
        self.cond = threading.Condition()
        self.pending: dict[int, _Round] = {}  # mask -> the round still gathering lanes


_registry_lock = threading.Lock()


def _block_threads(manager) -> dict:
    """thread_id -> BlockThread of one simulated block (filled by the patched __init__)."""
    return manager.__dict__.setdefault("_warp_sim_threads", {})


def _warp_of(thread) -> _Warp:
    manager = thread._manager
    w = thread.thread_id // WARP_SIZE
    with _registry_lock:
        warps = manager.__dict__.setdefault("_warp_sim_warps", {})
        warp = warps.get(w)
        if warp is None:
            nthreads = int(np.prod(manager._block_dim))
            warp = warps[w] = _Warp(w, min(WARP_SIZE, nthreads - w * WARP_SIZE))
    return warp


def _current_lane_thread(name: str):
    t = threading.current_thread()
    if not hasattr(t, "thread_id") or not hasattr(t, "_manager"):
        raise WarpSyncError(f"cuda.{name} was called outside a simulated CUDA kernel")
    return t


def _lane_state(thread, warp: _Warp, lane: int) -> str:
    """'absent' (no such thread in the block), 'exited', 'failed' (exited by an error),
    'syncthreads', or 'running'."""
    if lane >= warp.lanes_in_block:
        return "absent"
    other = _block_threads(thread._manager).get(warp.index * WARP_SIZE + lane)
    if other is None:
        return "running"  # not created yet: it will come
    if getattr(other, "_warp_sim_exited", False):
        # set by the patched BlockThread.run when the kernel returned (or raised)
        return "failed" if getattr(other, "exception", None) else "exited"
    # (not Thread.is_alive(): it is False also for a thread that is still starting)
    if other.syncthreads_blocked:
        return "syncthreads"
    return "running"


def _lanes(mask: int):
    return [lane for lane in range(WARP_SIZE) if mask >> lane & 1]


def _exchange(name: str, op: str, mask, value, b, compute):
    """Barrier over the lanes of ``mask`` in the caller's warp; return ``compute``'s
    result for the caller's lane. ``compute(arrivals, present_lanes)`` runs once, in the
    last lane to arrive, and returns {lane: result} (or raises WarpSyncError)."""
    thread = _current_lane_thread(name)
    mask = _check_int(name, "mask", mask) & FULL_MASK
    lane = thread.thread_id % WARP_SIZE
    if not mask >> lane & 1:
        raise WarpSyncError(
            f"cuda.{name}: lane {lane} (thread {thread.thread_id}) called it with mask "
            f"{mask:#010x}, which does not name it: undefined on the GPU")
    warp = _warp_of(thread)

    def missing(rnd):
        """Lanes of the mask that must still arrive; raise on a deadlock."""
        out = []
        for other in _lanes(rnd.mask):
            if other in rnd.arrivals:
                continue
            state = _lane_state(thread, warp, other)
            if state in ("absent", "exited"):
                continue
            out.append((other, state))
        return out

    def try_complete(rnd) -> bool:
        if rnd.results is not None or rnd.error is not None:
            return True
        # fast path: every existing lane of the mask is here; else look for exited ones
        if len(rnd.arrivals) < rnd.expected and missing(rnd):
            return False
        try:
            rnd.results = compute(rnd.arrivals, sorted(rnd.arrivals))
        except WarpSyncError as e:
            rnd.error = str(e)
        if warp.pending.get(rnd.mask) is rnd:
            del warp.pending[rnd.mask]
        warp.cond.notify_all()
        return True

    with warp.cond:
        rnd = warp.pending.get(mask)
        if rnd is None:
            expected = sum(1 for o in _lanes(mask) if o < warp.lanes_in_block)
            rnd = warp.pending[mask] = _Round(op, mask, expected)
        elif rnd.op != op:
            first = min(rnd.arrivals)
            raise WarpSyncError(
                f"lanes of mask {mask:#010x} called different warp intrinsics: lane {first} "
                f"cuda.{rnd.op}, lane {lane} cuda.{op}: undefined on the GPU")
        rnd.arrivals[lane] = (value, b)
        start = last_progress = time.monotonic()
        seen_arrivals = len(rnd.arrivals)
        stuck_since: dict[int, float] = {}
        while not try_complete(rnd):
            warp.cond.wait(_POLL_S)
            if getattr(thread, "abort", False):
                raise RuntimeError("simulator aborted this block (another thread failed)")
            now = time.monotonic()
            if len(rnd.arrivals) != seen_arrivals:
                seen_arrivals, last_progress = len(rnd.arrivals), now
            waiting_for = missing(rnd)
            for other, state in waiting_for:
                if state == "failed":  # pass its error on: it is the cause, not us
                    exc = _block_threads(thread._manager)[warp.index * WARP_SIZE + other].exception
                    raise WarpSyncError(
                        f"lane {other} of warp {warp.index} stopped with an error while lane "
                        f"{lane} waited for it in cuda.{op}: {exc[0] if exc else '?'}")
                if state == "syncthreads":
                    since = stuck_since.setdefault(other, now)
                    if now - since > SYNCTHREADS_GRACE_S:
                        raise WarpSyncError(
                            f"deadlock: lane {lane} of warp {warp.index} waits in cuda.{op} "
                            f"(mask {mask:#010x}) for lane {other}, which waits in "
                            "cuda.syncthreads(): every lane of the mask must reach the "
                            "warp intrinsic")
                else:
                    stuck_since.pop(other, None)
            if now - last_progress > TIMEOUT_S:
                raise WarpSyncError(
                    f"lane {lane} of warp {warp.index} waited {now - start:.0f} s in "
                    f"cuda.{op} (mask {mask:#010x}) for lanes "
                    f"{[o for o, _ in waiting_for]}, which never arrived")
        if rnd.error is not None:
            raise WarpSyncError(rnd.error)
        return rnd.results[lane]


# ----------------------------------------------------------------------------------------
# The intrinsics.

def _shfl(name: str, mode: int, mask, value, b, c: int):
    _check_shfl_value(name, value)
    b = _check_int(name, "the lane/delta argument", b)

    def compute(arrivals, present):
        out = {}
        for lane, (_, lane_b) in arrivals.items():
            j, _ = ptx_source_lane(mode, lane, lane_b, c)
            if j not in arrivals:
                raise WarpSyncError(
                    f"cuda.{name}: lane {lane} reads lane {j}, which did not take part "
                    f"(not in mask {mask & FULL_MASK:#010x}, exited or absent): the value "
                    "is undefined on the GPU")
            src = arrivals[j][0]
            own = arrivals[lane][0]
            out[lane] = type(own)(src)  # one register type for the whole warp
        return out

    return _exchange(name, f"{name}/c={c:#x}", mask, value, b, compute)


def shfl_sync(mask, value, src_lane):
    """Every lane reads ``value`` of lane ``src_lane`` (mod 32)."""
    return _shfl("shfl_sync", MODE_IDX, mask, value, src_lane, clamp_operand(MODE_IDX))


def shfl_up_sync(mask, value, delta):
    """Lane i reads lane ``i - delta``; lanes below ``delta`` keep their own value."""
    return _shfl("shfl_up_sync", MODE_UP, mask, value, delta, clamp_operand(MODE_UP))


def shfl_down_sync(mask, value, delta):
    """Lane i reads lane ``i + delta``; lanes from ``32 - delta`` keep their own value."""
    return _shfl("shfl_down_sync", MODE_DOWN, mask, value, delta, clamp_operand(MODE_DOWN))


def shfl_xor_sync(mask, value, lane_mask):
    """Lane i reads lane ``i ^ lane_mask`` (the butterfly exchange)."""
    return _shfl("shfl_xor_sync", MODE_BFLY, mask, value, lane_mask, clamp_operand(MODE_BFLY))


def shuffle(mode: int, mask, value, b, width: int = WARP_SIZE):
    """CUDA C's ``__shfl*_sync(mask, value, b, width)`` in segments of ``width`` lanes.

    Emulator-only (Numba's intrinsics have no ``width``): for tests of the segment
    semantics and for code that prototypes CUDA C behaviour. ``width=32`` is exactly the
    corresponding Numba intrinsic.
    """
    return _shfl(_MODE_NAMES[mode], mode, mask, value, b, clamp_operand(mode, width))


def syncwarp(mask=FULL_MASK):
    """Wait until every (existing, non-exited) lane of ``mask`` reaches a syncwarp with
    the same mask; memory written before it is visible to those lanes after it."""
    _exchange("syncwarp", "syncwarp", mask, None, 0,
              lambda arrivals, present: {lane: None for lane in arrivals})


def _check_predicate(name: str, predicate):
    if not isinstance(predicate, (bool, int, np.integer, np.bool_)):
        raise TypeError(f"{name}: predicate must be an integer or boolean, "
                        f"got {type(predicate).__name__}")
    return bool(predicate)


def _vote(name: str, mask, predicate, reduce):
    p = _check_predicate(name, predicate)

    def compute(arrivals, present):
        preds = {lane: v for lane, (v, _) in arrivals.items()}
        r = reduce(preds)
        return {lane: r for lane in arrivals}

    return _exchange(name, name, mask, p, 0, compute)


def all_sync(mask, predicate):
    """True if the predicate is true on every participating lane of ``mask``."""
    return _vote("all_sync", mask, predicate, lambda p: all(p.values()))


def any_sync(mask, predicate):
    """True if the predicate is true on any participating lane of ``mask``."""
    return _vote("any_sync", mask, predicate, lambda p: any(p.values()))


def eq_sync(mask, predicate):
    """True if the predicate is the same on every participating lane of ``mask``."""
    return _vote("eq_sync", mask, predicate, lambda p: len(set(p.values())) <= 1)


def ballot_sync(mask, predicate):
    """Bit i set if lane i took part and its predicate is true (int32, as Numba types it)."""
    return _vote("ballot_sync", mask, predicate,
                 lambda p: _as_int32(sum(1 << lane for lane, v in p.items() if v)))


def match_any_sync(mask, value):
    """Mask of the participating lanes whose ``value`` has the same bits as the caller's."""
    _check_shfl_value("match_any_sync", value)

    def compute(arrivals, present):
        bits = {lane: _bits(v) for lane, (v, _) in arrivals.items()}
        return {lane: _as_int32(sum(1 << o for o in bits if bits[o] == bits[lane]))
                for lane in arrivals}

    return _exchange("match_any_sync", "match_any_sync", mask, value, 0, compute)


def match_all_sync(mask, value):
    """``(mask of participants, True)`` if all their values have the same bits, else
    ``(0, False)``."""
    _check_shfl_value("match_all_sync", value)

    def compute(arrivals, present):
        bits = {_bits(v) for (v, _) in arrivals.values()}
        same = len(bits) == 1
        r = (_as_int32(sum(1 << lane for lane in arrivals)) if same else np.int32(0), same)
        return {lane: r for lane in arrivals}

    return _exchange("match_all_sync", "match_all_sync", mask, value, 0, compute)


def lanemask_lt():
    """Bits of the lanes below the caller's (uint32): no synchronisation involved."""
    lane = _current_lane_thread("lanemask_lt").thread_id % WARP_SIZE
    return np.uint32((1 << lane) - 1)


INTRINSICS = {
    "shfl_sync": shfl_sync, "shfl_up_sync": shfl_up_sync,
    "shfl_down_sync": shfl_down_sync, "shfl_xor_sync": shfl_xor_sync,
    "syncwarp": syncwarp, "all_sync": all_sync, "any_sync": any_sync, "eq_sync": eq_sync,
    "ballot_sync": ballot_sync, "match_any_sync": match_any_sync,
    "match_all_sync": match_all_sync, "lanemask_lt": lanemask_lt,
}

_installed: list[str] | None = None


def install() -> bool:
    """Give the simulator the intrinsics above (emulation only); True if active."""
    global _installed
    if not runtime.is_emulated():
        return False
    if _installed is not None:
        return True
    from numba.cuda.simulator import kernel as sim_kernel
    from numba.cuda.simulator.kernelapi import FakeCUDAModule

    installed = []
    for name, fn in INTRINSICS.items():
        if hasattr(FakeCUDAModule, name):  # a future simulator that has its own: keep it
            continue
        # FakeCUDAModule is the `cuda` object inside a simulated kernel: methods get self
        setattr(FakeCUDAModule, name, staticmethod(fn))
        installed.append(name)

    # Record each simulated thread with its block, and mark it when its kernel returns,
    # so a waiting lane can tell a lane that has not started yet (wait for it) from one
    # that exited (do not) or sits in syncthreads() (deadlock).
    block_thread = sim_kernel.BlockThread
    if not getattr(block_thread, "_warp_sim_patched", False):
        original_init = block_thread.__init__

        def __init__(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            _block_threads(self._manager)[self.thread_id] = self

        original_run = block_thread.run

        def run(self):
            try:
                original_run(self)
            finally:
                self._warp_sim_exited = True

        block_thread.__init__ = __init__
        block_thread.run = run
        block_thread._warp_sim_patched = True
    _installed = installed
    return True


def installed_names() -> list[str]:
    """The intrinsics this module added to the simulator (empty on a GPU)."""
    return list(_installed or [])
