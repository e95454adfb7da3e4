"""Reference implementations: the one ground truth each kernel is checked against.

Attention here follows flash-attn's conventions, so every lesson can compare to it:

* layout (batch, seqlen, heads, headdim); ``softmax_scale`` defaults to headdim ** -0.5;
* grouped-query / multi-query attention: heads_q a multiple of heads_k, query head ``h``
  reads key/value head ``h // (heads_q // heads_k)``;
* ``causal`` is aligned bottom-right when seqlen_q != seqlen_k (flash-attn >= 2.1):
  query ``i`` sees keys ``j <= i + seqlen_k - seqlen_q``;
* a query row that sees no key at all outputs zeros and has lse = +inf (flash-attn's and
  FlashMLA's convention);
* value head dim may differ from the query/key head dim (MLA decoding: 576 and 512);
* the log-sum-exp is natural-log, float32-or-wider, shape (batch, heads_q, seqlen_q);
* flash-attn 2.8.3's options, with its exact semantics (flash_api.cpp, mask.h, alibi.h):
  ``window_size=(left, right)``: query ``i`` sees keys
  ``i + sk - sq - left <= j <= i + sk - sq + right`` (-1 = unbounded, normalised as
  flash-attn does on the host: see :func:`flash_window`); ``softcap > 0``: the scaled
  score becomes ``softcap * tanh(score / softcap)``; ``alibi_slopes`` (heads_q,) or
  (batch, heads_q) float32: a bias added to the (scaled, capped) score, ``+slope * j``
  when the mask is causal (flash-attn's kernel: a row constant away from the documented
  form, so the same output but a different lse), ``-slope * |i + sk - sq - j|`` otherwise.

Everything is computed in ``compute_dtype`` (float32 by default, float64 for the
strictest checks) from upcast inputs, on whatever device the inputs are on.
"""

from __future__ import annotations

import math

import torch


def _check_attention_shapes(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D (batch, seqlen, heads, headdim)")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"batch/seqlen/heads mismatch: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"heads_q={q.shape[2]} is not a multiple of heads_k={k.shape[2]}")


def flash_window(window_size=(-1, -1), causal=False, seqlen_q=1, seqlen_k=1,
                 has_alibi=False):
    """flash-attn 2.8.3's host normalisation of (causal, window_size).

    Returns ``(is_causal, window)``: ``window`` is None (no mask beyond the causal one)
    or ``(left, right)``, both >= 0. ``seqlen_q``/``seqlen_k`` are max_seqlen_q/_k for
    varlen. mha_fwd: a side >= seqlen_k becomes -1; seqlen_q == 1 without ALiBi drops
    causal (the same mask); causal sets right = 0. set_params_fprop: the mask is causal iff
    left < 0 and right == 0 (window (-1, 0) *is* causal); otherwise, where one side is
    bounded, the unbounded side becomes seqlen_k (for the right side that is a real bound
    when seqlen_q > seqlen_k + 1: flash-attn's kernel applies it, so we do too).
    """
    wl, wr = (int(w) for w in window_size)
    if wl >= seqlen_k:
        wl = -1
    if wr >= seqlen_k:
        wr = -1
    if seqlen_q == 1 and not has_alibi:
        causal = False
    if causal:
        wr = 0
    is_causal = wl < 0 and wr == 0
    if is_causal or (wl < 0 and wr < 0):
        return is_causal, None
    return False, (wl if wl >= 0 else seqlen_k, wr if wr >= 0 else seqlen_k)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  softmax_scale: float | None = None, causal: bool = False,
                  compute_dtype: torch.dtype = torch.float32, *, window_size=(-1, -1),
                  softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                  _normalised=None):
    """Exact attention. Returns ``(out, lse)``.

    out: (batch, seqlen_q, heads_q, headdim_v) in ``compute_dtype``;
    lse: (batch, heads_q, seqlen_q) in ``compute_dtype``, +inf for rows with no key.
    With ``alibi_slopes`` the bias is added and the softmax taken in float32 or wider
    (as flash-attn's own test reference does), so lse is then at least float32.
    """
    _check_attention_shapes(q, k, v)
    batch, seqlen_q, heads_q, d = q.shape
    seqlen_k, heads_k = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    group = heads_q // heads_k
    if _normalised is None:
        _normalised = flash_window(window_size, causal, seqlen_q, seqlen_k,
                                   alibi_slopes is not None)
    causal, window = _normalised

    qf = q.to(compute_dtype).transpose(1, 2)                       # b, hq, sq, d
    kf = k.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vf = v.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale             # b, hq, sq, sk
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    i = torch.arange(seqlen_q, device=q.device)[:, None]
    j = torch.arange(seqlen_k, device=q.device)[None, :]
    if alibi_slopes is not None:
        wide = torch.promote_types(compute_dtype, torch.float32)
        slopes = alibi_slopes.to(q.device, wide).reshape(-1, heads_q)[..., None, None]
        if causal:
            bias = slopes * j.to(wide)
        else:
            bias = -slopes * (i + (seqlen_k - seqlen_q) - j).abs().to(wide)
        s = s.to(wide) + bias                                      # (1 or b), hq, sq, sk
    if causal:
        s = s.masked_fill(j > i + (seqlen_k - seqlen_q), float("-inf"))
    if window is not None:
        wl, wr = window
        s = s.masked_fill((j > i + (seqlen_k - seqlen_q) + wr)
                          | (j < i + (seqlen_k - seqlen_q) - wl), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                               # -inf where no key
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])     # exp(-inf) = 0 rows
    out = torch.matmul(p.to(vf.dtype), vf).transpose(1, 2)         # b, sq, hq, dv
    lse = torch.where(empty, math.inf, lse)
    return out.contiguous(), lse


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None,
                         causal=False, compute_dtype=torch.float32, *, window_size=(-1, -1),
                         softcap=0.0, alibi_slopes=None, max_seqlen_q=None,
                         max_seqlen_k=None):
    """Attention over packed sequences (flash-attn's varlen layout).

    q: (total_q, heads_q, d); k, v: (total_k, heads_k, d[v]); cu_seqlens_*: int32
    (batch + 1,) cumulative lengths. Returns out (total_q, heads_q, dv) and lse
    (heads_q, total_q), each sequence attended on its own. Options as in attention_ref;
    the window is normalised against ``max_seqlen_q``/``max_seqlen_k`` as flash-attn does
    (default: the longest sequences). Rows outside every sequence stay 0 with lse +inf.
    """
    total_q, heads_q = q.shape[0], q.shape[1]
    wide = compute_dtype if alibi_slopes is None else torch.promote_types(compute_dtype,
                                                                          torch.float32)
    out = torch.zeros(total_q, heads_q, v.shape[-1], dtype=compute_dtype, device=q.device)
    lse = torch.full((heads_q, total_q), math.inf, dtype=wide, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if max_seqlen_q is None:
        max_seqlen_q = max(b - a for a, b in zip(cq[:-1], cq[1:]))
    if max_seqlen_k is None:
        max_seqlen_k = max(b - a for a, b in zip(ck[:-1], ck[1:]))
    norm = flash_window(window_size, causal, max_seqlen_q, max_seqlen_k,
                        alibi_slopes is not None)
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0:
            continue
        if k1 == k0:  # no keys: zeros and +inf, already there
            continue
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
        o_b, lse_b = attention_ref(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                   softmax_scale, causal, compute_dtype, softcap=softcap,
                                   alibi_slopes=slopes, _normalised=norm)
        out[q0:q1] = o_b[0]
        lse[:, q0:q1] = lse_b[0]
    return out, lse


def attention_flops(batch: int, seqlen_q: int, seqlen_k: int, heads: int, headdim: int,
                    causal: bool = False, mode: str = "fwd") -> float:
    """FLOPs in the FlashAttention papers' convention.

    forward: 4 * b * sq * sk * h * d (two matmuls), halved when causal;
    backward: 2.5x forward (five matmuls, the recomputation of S included);
    ``mode`` is "fwd", "bwd" or "fwd_bwd".
    """
    f = 4.0 * batch * seqlen_q * seqlen_k * heads * headdim
    if causal:
        f /= 2
    return {"fwd": f, "bwd": 2.5 * f, "fwd_bwd": 3.5 * f}[mode]


def paged_mla_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                         cache_seqlens: torch.Tensor, head_dim_v: int = 512,
                         softmax_scale: float | None = None, causal: bool = False,
                         compute_dtype: torch.dtype = torch.float32):
    """Attention over a paged KV cache, FlashMLA's decoding convention. Returns ``(out, lse)``.

    q: (batch, seqlen_q, heads_q, d); k_cache: (num_pages, page_size, heads_k, d), where
    the values are the first ``head_dim_v`` channels of the keys (MLA: d = 576, dv = 512);
    block_table: (batch, max_pages) page indices, sequence ``b``'s token ``j`` lives in page
    ``block_table[b, j // page_size]`` at row ``j % page_size``; cache_seqlens: (batch,).
    Only the slots a sequence owns are read: the first ``ceil(len / page_size)`` table
    entries and the first ``len`` rows they cover, so garbage anywhere else is harmless.
    ``causal`` (seqlen_q > 1, speculative decoding): query ``i`` sees keys
    ``j <= len - seqlen_q + i``, attention_ref's bottom-right alignment.

    out: (batch, seqlen_q, heads_q, head_dim_v), lse: (batch, heads_q, seqlen_q), both in
    ``compute_dtype``; a query with no visible key gives zeros and lse = +inf.
    """
    batch, seqlen_q, heads_q, d = q.shape
    page_size = k_cache.shape[1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(batch, seqlen_q, heads_q, head_dim_v, dtype=compute_dtype,
                      device=q.device)
    lse = torch.full((batch, heads_q, seqlen_q), math.inf, dtype=compute_dtype,
                     device=q.device)
    for b, n in enumerate(cache_seqlens.tolist()):
        if n <= 0:
            continue
        pages = block_table[b, :(n + page_size - 1) // page_size].long()
        k = k_cache[pages].flatten(0, 1)[:n]                       # n, heads_k, d
        o_b, lse_b = attention_ref(q[b:b + 1], k[None], k[None, ..., :head_dim_v],
                                   scale, causal, compute_dtype)
        out[b], lse[b] = o_b[0], lse_b[0]
    return out, lse
