"""flash-attn 2.8.3's options in lesson 08's kernels, forward and backward.

Sliding window, softcap, ALiBi, any head dim 1..256, and varlen robustness (whatever
cu_seqlens holds, no kernel reads or writes outside its tensors), each checked against the
float32 reference (common/reference.py) with flash-attn's error rule (test_flash_v2's
``_run_and_check``) and NaN-poisoned outputs. Under the interpreter the sizes are small
(tens of rows; tiles (64, 32) forward and dQ, (32, 64) dK/dV); the ``gpu`` tests run the
same checks at real sizes.
"""

import math

import pytest
import torch

from common import runtime
from common.checks import assert_close
from common.reference import attention_ref, attention_varlen_ref

import flash_attn as fa
from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
from test_flash_v2 import _poisoned_outputs_and_default_tiles, _rand, _run_and_check  # noqa: F401

DEV = runtime.torch_device()
gpu = pytest.mark.gpu


def _slopes(shape, gen):
    """ALiBi-like slopes: float32, in (0.05, 0.55)."""
    return (torch.rand(shape, generator=gen) * 0.5 + 0.05).to(DEV)


def check_batched(b, sq, sk, hq, hk, d, causal=False, window=(-1, -1), softcap=0.0,
                  alibi=None, scale=None, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = _rand((b, sq, hq, d), dtype, gen)
    k = _rand((b, sk, hk, d), dtype, gen)
    v = _rand((b, sk, hk, d), dtype, gen)
    dout = _rand(q.shape, dtype, gen)
    slopes = None if alibi is None else _slopes((hq,) if alibi == "heads" else (b, hq), gen)

    def ours(q_, k_, v_, c):
        return flash_attn_func(q_, k_, v_, softmax_scale=scale, causal=c, window_size=window,
                               softcap=softcap, alibi_slopes=slopes,
                               return_attn_probs=True)[:2]

    def ref(q_, k_, v_, c, cdt):
        return attention_ref(q_, k_, v_, scale, c, cdt, window_size=window, softcap=softcap,
                             alibi_slopes=slopes)

    _run_and_check(ours, ref, q, k, v, dout, causal)


def check_varlen(lens_q, lens_k, hq, hk, d, causal=False, window=(-1, -1), softcap=0.0,
                 alibi=None, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(),  # noqa: E731
                                   dtype=torch.int32, device=DEV)
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    q = _rand((sum(lens_q), hq, d), dtype, gen)
    k = _rand((sum(lens_k), hk, d), dtype, gen)
    v = _rand((sum(lens_k), hk, d), dtype, gen)
    dout = _rand(q.shape, dtype, gen)
    slopes = None if alibi is None else _slopes((hq,) if alibi == "heads" else
                                                (len(lens_q), hq), gen)

    def ours(q_, k_, v_, c):
        return flash_attn_varlen_func(q_, k_, v_, cu_q, cu_k, max(lens_q), max(lens_k),
                                      causal=c, window_size=window, softcap=softcap,
                                      alibi_slopes=slopes, return_attn_probs=True)[:2]

    def ref(q_, k_, v_, c, cdt):
        return attention_varlen_ref(q_, k_, v_, cu_q, cu_k, None, c, cdt, window_size=window,
                                    softcap=softcap, alibi_slopes=slopes)

    _run_and_check(ours, ref, q, k, v, dout, causal)


# --------------------------------------------------------------------------------------
# Sliding window

@pytest.mark.parametrize("sq,sk,window,causal", [
    (70, 70, (0, 0), False),          # the diagonal only
    (70, 70, (5, 3), False),          # small, both sides
    (70, 70, (200, 300), False),      # larger than seqlen: normalised to (-1, -1)
    (70, 70, (9, -1), False),         # right side unbounded
    (70, 70, (-1, 6), False),         # left side unbounded
    (90, 70, (12, -1), True),         # with causal: right = 0
    (33, 97, (20, 4), False),         # seqlen_q < seqlen_k: bottom-right
    (97, 33, (20, 4), False),         # seqlen_q > seqlen_k: empty rows at the top
    (97, 20, (3, -1), False),         # right -1 -> seqlen_k, a real bound here (flash-attn)
    (60, 60, (-1, 0), False),         # window (-1, 0) is causal
])
def test_window(sq, sk, window, causal):
    check_batched(1, sq, sk, 2, 1, 32, causal=causal, window=window, seed=sq + sk)


@pytest.mark.parametrize("w", [0, 1, 31, 32, 33, 63, 64, 65])
def test_window_edges_on_every_block_residue(w):
    """Window edges at and around the 32- and 64-row tile boundaries, both sides."""
    check_batched(1, 101, 101, 1, 1, 16, window=(w, (3 * w + 7) % 70), seed=w)


@pytest.mark.parametrize("sq,sk", [(16, 200), (200, 16)])
def test_window_skips_blocks_outside(sq, sk):
    """Blocks that no window reaches are never loaded: NaN there cannot reach anything.

    (16, 200): keys 0..159 are outside every query's window (forward, dQ); (200, 16): query
    rows 0..159 see no key (dK/dV must skip their blocks; they output 0 with lse +inf)."""
    gen = torch.Generator().manual_seed(sq)
    q = _rand((1, sq, 2, 32), torch.bfloat16, gen)
    k = _rand((1, sk, 2, 32), torch.bfloat16, gen)
    v = _rand((1, sk, 2, 32), torch.bfloat16, gen)
    dout = _rand(q.shape, torch.bfloat16, gen)
    window = (8, 8)
    far = slice(0, 160)
    qn, kn, vn, dn = (x.clone() for x in (q, k, v, dout))
    if sk > sq:
        kn[:, far] = vn[:, far] = float("nan")
    else:
        qn[:, far] = dn[:, far] = float("nan")
    qs, ks, vs = (x.clone().requires_grad_() for x in (qn, kn, vn))
    out, lse, _ = flash_attn_func(qs, ks, vs, window_size=window, return_attn_probs=True)
    out.backward(dn)
    qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
    ref, ref_lse = attention_ref(qf, kf, vf, window_size=window)
    ref.backward(dout.float())
    tol = dict(atol=3e-2, rtol=3e-2)
    if sk > sq:
        assert_close(out, ref, **tol, name="out")
        assert_close(qs.grad, qf.grad, **tol, name="dq")
        assert_close(ks.grad[:, 160:], kf.grad[:, 160:], **tol, name="dk")
        assert_close(vs.grad[:, 160:], vf.grad[:, 160:], **tol, name="dv")
        # dK/dV key blocks (64 wide) 0..127 are skipped whole: exactly 0. (Keys 128..159
        # share a block with seen keys: their own gradient rows are NaN, like their input.)
        assert (ks.grad[:, :128] == 0).all() and (vs.grad[:, :128] == 0).all()
    else:
        assert (out[:, far] == 0).all() and torch.isposinf(lse[:, :, far]).all()
        # dQ query blocks (64 rows) 0..127 are skipped whole: exactly 0
        assert (qs.grad[:, :128] == 0).all()
        assert_close(out[:, 160:], ref[:, 160:], **tol, name="out")
        assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3, name="lse")
        assert_close(qs.grad[:, 160:], qf.grad[:, 160:], **tol, name="dq")
        assert_close(ks.grad, kf.grad, **tol, name="dk")
        assert_close(vs.grad, vf.grad, **tol, name="dv")


# --------------------------------------------------------------------------------------
# softcap and ALiBi

@pytest.mark.parametrize("softcap,scale,causal", [
    (5.0, None, False),       # tanh in its curved range: the derivative matters
    (100.0, 50.0, False),     # scores up to +-100: exp overflows without the max shift
    (2.0, 1.0, True),
])
def test_softcap(softcap, scale, causal):
    check_batched(2, 45, 70, 2, 2, 32, causal=causal, softcap=softcap, scale=scale,
                  seed=int(softcap))


@pytest.mark.parametrize("alibi", ["heads", "batch_heads"])
@pytest.mark.parametrize("causal,window,sq,sk", [
    (False, (-1, -1), 50, 70), (True, (-1, -1), 70, 50), (False, (6, 11), 70, 70),
    (False, (-1, 0), 40, 40)])   # window (-1, 0): causal, so +slope * j
def test_alibi(alibi, causal, window, sq, sk):
    check_batched(2, sq, sk, 2, 1, 32, causal=causal, window=window, alibi=alibi, seed=sq)


def test_alibi_causal_lse_is_flash_attns():
    """With the causal mask flash-attn adds +slope * j (not -slope * (i - j)): the lse
    includes it. Written out by hand here, independent of the reference. One query row
    keeps causal when ALiBi is on (flash-attn drops it only without ALiBi)."""
    gen = torch.Generator().manual_seed(3)
    q = _rand((1, 1, 2, 32), torch.float16, gen)
    k = _rand((1, 20, 2, 32), torch.float16, gen)
    slopes = torch.tensor([0.25, 0.5], device=DEV)
    out, lse, _ = flash_attn_func(q, k, k, causal=True, alibi_slopes=slopes,
                                  return_attn_probs=True)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * 32 ** -0.5
    s = s + slopes[None, :, None, None] * torch.arange(20, device=DEV).float()
    assert_close(lse, torch.logsumexp(s, -1), atol=1e-3, rtol=1e-3)


def test_every_feature_at_once_gqa():
    check_batched(2, 66, 77, 6, 2, 40, window=(13, 21), softcap=4.0, alibi="batch_heads",
                  seed=11)


# --------------------------------------------------------------------------------------
# Head dims 1..256, padded inside the kernels

@pytest.mark.parametrize("d", [1, 7, 8, 40, 72, 80, 160, 192, 256])
def test_any_headdim(d):
    check_batched(1, 37, 45, 2, 1, d, causal=d % 2 == 0, seed=d)


# --------------------------------------------------------------------------------------
# Varlen

@pytest.mark.parametrize("opts", [
    dict(window=(7, 2)), dict(causal=True, window=(10, -1)), dict(softcap=3.0),
    dict(alibi="batch_heads"), dict(causal=True, alibi="heads", window=(9, 0))])
def test_varlen_features_with_empty_sequences(opts):
    check_varlen([3, 0, 1, 40, 17], [5, 4, 0, 40, 30], 4, 2, 24, **opts)


@pytest.mark.parametrize("causal", [False, True])
def test_tensor_descriptor_path_with_features(monkeypatch, causal):
    monkeypatch.setattr(fa, "_tma_ok", lambda *t: True)
    check_batched(1, 80, 70, 2, 1, 40, causal=causal, window=(20, 5), softcap=3.0,
                  alibi="heads", seed=5)
    check_varlen([9, 0, 50], [20, 3, 50], 2, 2, 80, causal=causal, window=(15, 15), seed=6)


# --------------------------------------------------------------------------------------
# Garbage cu_seqlens: the kernels clamp, nothing outside the tensors is touched

def _clamped(cu, total, max_len):
    """The sequences the kernels compute: start into [0, total], end into [start, total],
    length at most max_seqlen (what _sequence does)."""
    out = []
    for a, b in zip(cu[:-1], cu[1:]):
        a = min(max(a, 0), total)
        b = min(max(b, a), total)
        out.append((a, a + min(b - a, max_len)))
    return out


@pytest.mark.parametrize("cu_q,cu_k,max_q,max_k", [
    ([0, 30, 10, 10], [0, 25, 5, 40], 40, 40),          # decreasing (keys overlap)
    ([0, 30, 10, 10], [0, 25, 30, 60], 40, 40),         # decreasing, no overlap
    ([0, 20, 500], [-7, 10, 900], 40, 40),              # past the end, negative start
    ([-9, 20, 48], [0, 30, 60], 40, 40),                # negative start of the queries
    ([0, 50, 60], [0, 44, 60], 20, 17),                 # longer than max_seqlen
    ([5, 25, 30], [3, 33, 38], 30, 30),                 # cu[0] > 0 and unused tail rows
    ([0, 30, 10, 45], [0, 20, 40, 60], 40, 40),         # overlapping sequences
])
def test_garbage_cu_seqlens_stay_inside(monkeypatch, cu_q, cu_k, max_q, max_k):
    """q, k, v are views into NaN-filled buffers; every buffer the kernels write is a view
    into a NaN-filled guard buffer: nothing outside may be read (no NaN in the rows
    computed) or written (the guards stay NaN). Rows computed once match the reference."""
    guards = []

    def guarded_empty(shape, dtype=None, device=None):
        n = math.prod(shape)
        buf = torch.full((n + 4096,), float("nan"), dtype=dtype, device=device)
        guards.append((buf, 2048, n))
        return buf[2048:2048 + n].view(shape)
    monkeypatch.setattr(fa, "_empty", guarded_empty)

    gen = torch.Generator().manual_seed(len(cu_q))
    total_q, total_k, hq, hk, d = 48, 60, 2, 1, 32
    bq = torch.full((total_q + 40, hq, d), float("nan"), dtype=torch.float16, device=DEV)
    bk = torch.full((total_k + 40, hk, d), float("nan"), dtype=torch.float16, device=DEV)
    bv = bk.clone()
    bd = bq.clone()
    for buf in (bq, bk, bv, bd):
        buf[20:-20] = _rand(buf[20:-20].shape, torch.float16, gen)
    q, k, v, dout = bq[20:-20], bk[20:-20], bv[20:-20], bd[20:-20]
    cq = torch.tensor(cu_q, dtype=torch.int32, device=DEV)
    ck = torch.tensor(cu_k, dtype=torch.int32, device=DEV)
    for opts in (dict(), dict(window=(5, 3), softcap=2.0)):
        p = fa._Problem(q, k, v, None, True, cq, ck, max_q, max_k, **opts)
        out, lse = fa._flash_fwd(q, k, v, p)
        dq, dk, dv = fa._flash_bwd(dout, q, k, v, out, lse, p)
        for buf, off, n in guards:
            assert torch.isnan(buf[:off]).all() and torch.isnan(buf[off + n:]).all(), \
                "a kernel wrote outside its output"
        guards.clear()

        seq_q, seq_k = _clamped(cu_q, total_q, max_q), _clamped(cu_k, total_k, max_k)
        hits_q = torch.zeros(total_q, dtype=torch.int32)
        hits_k = torch.zeros(total_k, dtype=torch.int32)
        for (a, b), (c, e) in zip(seq_q, seq_k):
            hits_q[a:b] += 1
            hits_k[c:e] += 1    # (a sequence without queries writes dK = dV = 0)
        rows_q, rows_k = hits_q > 0, hits_k > 0
        for name, t, rows in (("out", out, rows_q), ("dq", dq, rows_q), ("dk", dk, rows_k),
                              ("dv", dv, rows_k)):
            assert torch.isfinite(t[rows]).all(), f"{name}: NaN reached a computed row"
        if (hits_q > 1).any() or (hits_k > 1).any():
            continue  # overlapping sequences race: only "no NaN, no crash" is defined
        for (a, b), (c, e) in zip(seq_q, seq_k):
            if b == a:
                continue
            qf, kf, vf = (x.float().requires_grad_() for x in (q[a:b], k[c:e], v[c:e]))
            if e == c:
                assert (out[a:b] == 0).all() and torch.isposinf(lse[:, a:b]).all()
                continue
            ref, ref_lse = attention_ref(qf[None], kf[None], vf[None], causal=True,
                                         softcap=p.softcap, _normalised=fa_norm(p))
            ref.backward(dout[None, a:b].float())
            tol = dict(atol=1e-2, rtol=1e-2)
            assert_close(out[a:b], ref[0], **tol, name="out")
            assert_close(lse[:, a:b], ref_lse[0], atol=2e-3, rtol=1e-3, name="lse")
            assert_close(dq[a:b], qf.grad, **tol, name="dq")
            assert_close(dk[c:e], kf.grad, **tol, name="dk")
            assert_close(dv[c:e], vf.grad, **tol, name="dv")


def fa_norm(p):
    """The reference's (is_causal, window) from a _Problem's normalisation."""
    return p.causal, (p.window if p.local else None)


# --------------------------------------------------------------------------------------
# Real sizes on the GPU

@gpu
@pytest.mark.parametrize("window", [(0, 0), (256, 0), (128, 128), (1000, -1), (-1, 300),
                                    (4095, 4095), (17, 250)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_window(window, causal):
    check_batched(2, 4096, 4096, 4, 2, 128, causal=causal, window=window, seed=window[0])
    check_batched(2, 1000, 3000, 4, 4, 64, causal=causal, window=window, seed=window[1])
    check_batched(1, 3000, 1000, 4, 1, 64, causal=causal, window=window, seed=7)


@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("softcap,scale", [(30.0, None), (50.0, 1.0), (5.0, None)])
def test_gpu_softcap(d, softcap, scale):
    for causal in (False, True):
        check_batched(2, 2048, 2048, 8, 2, d, causal=causal, softcap=softcap, scale=scale,
                      seed=d)


@gpu
@pytest.mark.parametrize("alibi", ["heads", "batch_heads"])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)),
                                           (False, (256, 256)), (True, (512, -1))])
def test_gpu_alibi(alibi, causal, window):
    check_batched(2, 2048, 2048, 8, 8, 128, causal=causal, window=window, alibi=alibi, seed=1)
    check_batched(2, 777, 1500, 8, 2, 64, causal=causal, window=window, alibi=alibi, seed=2)


@gpu
@pytest.mark.parametrize("d", [8, 40, 72, 80, 100, 160, 192, 200, 255, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_any_headdim(d, causal):
    check_batched(2, 1000, 1000, 4, 2, d, causal=causal, seed=d)
    check_batched(1, 513, 1200, 2, 2, d, causal=causal, dtype=torch.float16, window=(100, 20),
                  seed=d + 1)


@gpu
@pytest.mark.parametrize("d", [64, 80, 128])
def test_gpu_varlen_features(d):
    lens_q = [0, 1, 1000, 17, 513, 2048, 1]
    lens_k = [5, 0, 1000, 300, 64, 2048, 1]
    for opts in (dict(window=(128, 0)), dict(causal=True, window=(300, -1)),
                 dict(softcap=20.0), dict(alibi="batch_heads", causal=True),
                 dict(window=(64, 64), softcap=10.0, alibi="heads")):
        check_varlen(lens_q, lens_k, 8, 2, d, seed=d, **opts)


@gpu
def test_gpu_pointer_path_with_features(monkeypatch):
    monkeypatch.setattr(fa, "_tma_ok", lambda *t: False)
    check_batched(2, 1500, 1500, 4, 2, 128, causal=True, window=(300, -1), softcap=20.0,
                  alibi="heads", seed=3)
    check_batched(2, 1000, 777, 4, 4, 80, window=(64, 64), seed=4)


@gpu
def test_gpu_garbage_cu_seqlens(monkeypatch):
    test_garbage_cu_seqlens_stay_inside(monkeypatch, [0, 300, 100, 100],
                                        [-50, 200, 9000, 9100], 400, 400)
