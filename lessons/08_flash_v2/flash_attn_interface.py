"""flash-attn's Python interface, on lesson 08's Triton kernels: a drop-in.

Matches ``flash_attn/flash_attn_interface.py`` of flash-attn **2.8.3**: the same functions,
positional order, argument names, defaults and return values, so code written for
flash-attn (transformers, training loops, flash-attn's own tests) runs unchanged:

    out = flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                          window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                          deterministic=False, return_attn_probs=False)
    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                                 causal=False, window_size=(-1, -1), softcap=0.0,
                                 alibi_slopes=None, deterministic=False,
                                 return_attn_probs=False, block_table=None)

plus the packed forms (``flash_attn_qkvpacked_func``, ``flash_attn_kvpacked_func`` and
their varlen twins), which split their packed tensor into views: no copy.
With ``return_attn_probs=True`` every function returns ``(out, softmax_lse, None)``:
flash-attn returns the attention probabilities only when dropout is on.

What differs, and says so instead of computing something else:

* ``dropout_p > 0`` raises NotImplementedError (evaluation and most LLM training use 0.0);
* ``block_table`` (a paged KV cache in the varlen call) raises NotImplementedError;
* ``deterministic`` is accepted and changes nothing: our backward is always deterministic
  (dK/dV are owned by one program per key block, dQ by one per query block: no atomics).

Three properties that a serving engine or ``torch.compile`` needs:

1. **No host synchronisation.** The varlen functions check their ``cu_seqlens`` on the
   device (non-decreasing, inside the packed tensor, no sequence longer than max_seqlen)
   and raise at the next synchronisation through ``torch._assert_async``, with a message
   naming the argument. The kernels clamp every index, so whatever the values, nothing
   outside the given tensors is read or written. Shapes, dtypes and devices are checked
   on the host before any launch.
2. **Custom ops.** The forward and backward are ``torch.library.custom_op`` s
   (``course::flash_attn_fwd``, ``course::flash_attn_bwd``) with fake implementations
   and autograd, so ``torch.compile(fullgraph=True)`` traces a model that calls them
   without a graph break, and a default call can be captured in a CUDA graph.
3. **Any head dim up to 256**, padded inside the kernel (never by copying your tensors).
"""

from __future__ import annotations

import math
from typing import Optional

from common import runtime  # selects GPU or interpreter before triton is imported

import torch
import triton
import triton.language as tl

import flash_attn as fa

FLASH_ATTN_VERSION = "2.8.3"   # the flash-attn release whose interface this matches


# ======================================================================================
# Device-side value checks (no host sync)
# ======================================================================================

@triton.jit
def _cu_seqlens_ok_kernel(cu_ptr, ok_ptr, n, total, max_seqlen, BLOCK: tl.constexpr):
    """ok = cu is non-decreasing, 0 <= cu[0], cu[-1] <= total, every length <= max_seqlen."""
    bad = 0
    for start in range(0, n - 1, BLOCK):
        i = start + tl.arange(0, BLOCK)
        live = i < n - 1
        a = tl.load(cu_ptr + i, mask=live, other=0)
        b = tl.load(cu_ptr + i + 1, mask=live, other=0)
        length = b - a
        bad += tl.sum((live & ((length < 0) | (length > max_seqlen))).to(tl.int32))
    first = tl.load(cu_ptr)
    last = tl.load(cu_ptr + n - 1)
    bad += (first < 0).to(tl.int32) + (last > total).to(tl.int32)
    tl.store(ok_ptr, bad == 0)


def _check_cu_seqlens_on_device(cu: torch.Tensor, name: str, total: int, max_seqlen: int):
    """One tiny launch and one asynchronous assert: an error surfaces at the next sync."""
    ok = torch.empty((), dtype=torch.bool, device=cu.device)
    n = cu.numel()
    _cu_seqlens_ok_kernel[(1,)](cu, ok, n, total, max_seqlen,
                                BLOCK=min(1024, triton.next_power_of_2(max(n - 1, 1))))
    torch._assert_async(ok, f"{name} is invalid: it must be non-decreasing, within "
                            f"[0, {total}] (the packed length), and no sequence may be "
                            f"longer than max_seqlen ({max_seqlen})")


def _check_cu_seqlens_shape(cu, name, device):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, q on {device}")
    if not cu.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


# ======================================================================================
# The custom ops: what torch.compile and autograd see
# ======================================================================================

def _problem(q, k, v, cu_q, cu_k, max_sq, max_sk, scale, causal, wl, wr, softcap, alibi):
    return fa._Problem(q, k, v, scale, causal, cu_q, cu_k,
                       max_sq if cu_q is not None else None,
                       max_sk if cu_k is not None else None,
                       window=(wl, wr), softcap=softcap, alibi_slopes=alibi)


def _lse_shape(q, cu_q):
    if cu_q is not None:                 # packed: (heads, total_q)
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op("course::flash_attn_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
            max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
            window_left: int, window_right: int, softcap: float,
            alibi_slopes: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if cu_seqlens_q is not None:   # value checks on the device, inside the op (compiles)
        _check_cu_seqlens_on_device(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q)
        _check_cu_seqlens_on_device(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k)
    p = _problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 softmax_scale, causal, window_left, window_right, softcap, alibi_slopes)
    if k.shape[0 if p.varlen else 1] == 0 or max_seqlen_k == 0:
        # no keys at all: every row is empty (zeros, lse = +inf), nothing to launch
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full(_lse_shape(q, cu_seqlens_q), math.inf,
                         dtype=torch.float32, device=q.device)
        return out, lse
    return fa._flash_fwd(q, k, v, p)


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap, alibi_slopes):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32))


@torch.library.custom_op("course::flash_attn_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor,
            cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
            max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
            window_left: int, window_right: int, softcap: float,
            alibi_slopes: Optional[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 softmax_scale, causal, window_left, window_right, softcap, alibi_slopes)
    if k.shape[0 if p.varlen else 1] == 0 or max_seqlen_k == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return fa._flash_bwd(dout, q, k, v, out, lse, p)


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal, window_left, window_right, softcap, alibi_slopes):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_sq, max_sk, scale, causal, wl, wr, softcap, alibi) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi)
    ctx.consts = (max_sq, max_sk, scale, causal, wl, wr, softcap)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
    max_sq, max_sk, scale, causal, wl, wr, softcap = ctx.consts
    dq, dk, dv = _bwd_op(dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out,
                         lse, cu_q, cu_k, max_sq, max_sk, scale, causal, wl, wr, softcap,
                         alibi)
    return (dq, dk, dv) + (None,) * 10   # q, k, v get gradients; the rest are constants


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ======================================================================================
# flash-attn 2.8.3's functions
# ======================================================================================

def _maybe_contiguous(x):
    """flash-attn's rule: only a non-unit last stride forces a copy."""
    if isinstance(x, torch.Tensor) and x.dim() and x.stride(-1) != 1:
        return x.contiguous()
    return x                      # (anything else is rejected by the checks that follow)


def _check_options(q, dropout_p, window_size, softcap, alibi_slopes, batch):
    if dropout_p is None or float(dropout_p) != 0.0:
        raise NotImplementedError(
            f"dropout_p={dropout_p}: attention dropout is not implemented in these kernels; "
            "pass dropout_p=0.0 (as flash-attn expects for evaluation)")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints (left, right), -1 meaning "
                         f"unbounded, got {window_size!r}")
    if not isinstance(softcap, (int, float)) or math.isnan(softcap):
        raise ValueError(f"softcap must be a float (0.0 = off), got {softcap!r}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError("alibi_slopes must be a torch.Tensor (nheads,) or (batch, nheads)")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}")
        h = q.shape[-2]
        if tuple(alibi_slopes.shape) not in ((h,), (batch, h)):
            raise ValueError(f"alibi_slopes must be (nheads={h},) or (batch={batch}, "
                             f"nheads={h}), got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.stride(-1) != 1:
            raise ValueError("alibi_slopes must have a contiguous last dimension")


def _scale(q, softmax_scale):
    return float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Exact attention. q (batch, seqlen_q, nheads, headdim), k and v (batch, seqlen_k,
    nheads_k, headdim), nheads a multiple of nheads_k (MQA/GQA); float16 or bfloat16;
    headdim <= 256.

    causal is aligned bottom-right; window_size=(left, right) keeps keys j with
    i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right; softcap > 0
    caps the scores at softcap * tanh(s / softcap); alibi_slopes (nheads,) or (batch,
    nheads) float32 adds -slope * |i + seqlen_k - seqlen_q - j| to the scores.
    A row that sees no key outputs zeros (lse = +inf).

    Returns out (batch, seqlen_q, nheads, headdim), or with return_attn_probs
    (out, softmax_lse (batch, nheads, seqlen_q) float32, None).
    """
    q, k, v = (_maybe_contiguous(x) for x in (q, k, v))
    fa._check_common(q, k, v, 4, "(batch, seqlen, heads, headdim)")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v seqlens differ: {k.shape[1]} vs {v.shape[1]}")
    _check_options(q, dropout_p, window_size, softcap, alibi_slopes, q.shape[0])
    out, lse = _fwd_op(q, k, v, None, None, q.shape[1], k.shape[1], _scale(q, softmax_scale),
                       bool(causal), int(window_size[0]), int(window_size[1]), float(softcap),
                       alibi_slopes)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """Attention over packed sequences: q (total_q, nheads, headdim), k and v (total_k,
    nheads_k, headdim); cu_seqlens_q/_k int32 (batch + 1,) cumulative lengths; sequence
    b is rows cu_seqlens[b] .. cu_seqlens[b+1] - 1. Options as in flash_attn_func.

    The values of cu_seqlens are checked on the device (no host sync): a bad value raises
    at the next synchronisation, and nothing outside the tensors is read meanwhile.
    Returns out (total_q, nheads, headdim), or with return_attn_probs
    (out, softmax_lse (nheads, total_q) float32, None).
    """
    if block_table is not None:
        raise NotImplementedError("block_table (a paged KV cache) is not implemented in "
                                  "flash_attn_varlen_func; pass packed k and v")
    q, k, v = (_maybe_contiguous(x) for x in (q, k, v))
    fa._check_common(q, k, v, 3, "(total_tokens, heads, headdim)")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v token counts differ: {k.shape[0]} vs {v.shape[0]}")
    _check_cu_seqlens_shape(cu_seqlens_q, "cu_seqlens_q", q.device)
    _check_cu_seqlens_shape(cu_seqlens_k, "cu_seqlens_k", q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe different batch sizes: "
                         f"{cu_seqlens_q.numel() - 1} vs {cu_seqlens_k.numel() - 1}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, torch.Tensor) or int(m) != m or m < 0:
            raise ValueError(f"{name} must be a non-negative Python int, got {m!r}")
    batch = cu_seqlens_q.numel() - 1
    _check_options(q, dropout_p, window_size, softcap, alibi_slopes, batch)
    out, lse = _fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                       int(max_seqlen_k), _scale(q, softmax_scale), bool(causal),
                       int(window_size[0]), int(window_size[1]), float(softcap), alibi_slopes)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv (batch, seqlen, 3, nheads, headdim): q, k, v are views of it (no copy)."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError("qkv must be (batch, seqlen, 3, nheads, headdim)")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """kv (batch, seqlen_k, 2, nheads_k, headdim): k and v are views of it (no copy)."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError("kv must be (batch, seqlen_k, 2, nheads_k, headdim)")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv (total, 3, nheads, headdim) with one cu_seqlens for queries and keys."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError("qkv must be (total_tokens, 3, nheads, headdim)")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """kv (total_k, 2, nheads_k, headdim): k and v are views of it (no copy)."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError("kv must be (total_k, 2, nheads_k, headdim)")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                  softcap, alibi_slopes, deterministic, return_attn_probs)


__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func", "FLASH_ATTN_VERSION"]
