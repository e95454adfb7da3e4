"""flash-attn 2.8.3's interface (flash_attn_interface.py): called as flash-attn's users call it.

* every function's parameters (names, order, defaults) are flash-attn 2.8.3's, and calls
  written the way flash-attn's own tests and transformers write them, positional and
  keyword, give the reference result;
* what is not implemented (dropout, block_table) raises instead of computing something else;
* the varlen functions never synchronise with the host: their cu_seqlens are checked on
  the device, a bad value raises (here at once: torch._assert_async on CPU tensors; on a
  GPU at the next sync), and nothing outside the given tensors is read meanwhile;
* the functions are custom ops: torch.compile(fullgraph=True) traces them, and on the GPU
  a default call is captured in a CUDA graph.
"""

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch

from common import runtime
from common.checks import assert_error_within, poison
from common.reference import attention_ref, attention_varlen_ref

import flash_attn as fa
import flash_attn_interface as fai
from flash_attn_interface import (flash_attn_func, flash_attn_kvpacked_func,
                                  flash_attn_qkvpacked_func, flash_attn_varlen_func,
                                  flash_attn_varlen_kvpacked_func,
                                  flash_attn_varlen_qkvpacked_func)

DEV = runtime.torch_device()
GPU = runtime.is_gpu()
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _poisoned_outputs_and_default_tiles(monkeypatch):
    monkeypatch.setattr(fa, "_empty", lambda *a, **k: poison(torch.empty(*a, **k)))
    monkeypatch.setattr(fa, "AUTOTUNE", False)


def _rand(shape, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(DEV, dtype)


def _slack(ref, dtype):
    return 2 * ((ref.to(dtype) + 0.3 - 0.3).float() - ref).abs().max().item() + 1e-6


def _check_out(out, q, k, v, **ref_kw):
    ref, _ = attention_ref(q.float(), k.float(), v.float(), **ref_kw)
    pt, _ = attention_ref(q, k, v, compute_dtype=q.dtype, **ref_kw)
    assert_error_within(out, pt, ref, slack=_slack(ref, q.dtype), name="out")


# --------------------------------------------------------------------------------------
# The signatures are flash-attn 2.8.3's (flash_attn/flash_attn_interface.py at v2.8.3)

_OPTS = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False),
         ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None),
         ("deterministic", False), ("return_attn_probs", False)]
_EMPTY = inspect.Parameter.empty
FLASH_ATTN_2_8_3 = {
    "flash_attn_func": [("q", _EMPTY), ("k", _EMPTY), ("v", _EMPTY)] + _OPTS,
    "flash_attn_qkvpacked_func": [("qkv", _EMPTY)] + _OPTS,
    "flash_attn_kvpacked_func": [("q", _EMPTY), ("kv", _EMPTY)] + _OPTS,
    "flash_attn_varlen_func": [("q", _EMPTY), ("k", _EMPTY), ("v", _EMPTY),
                               ("cu_seqlens_q", _EMPTY), ("cu_seqlens_k", _EMPTY),
                               ("max_seqlen_q", _EMPTY), ("max_seqlen_k", _EMPTY)]
                              + _OPTS + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [("qkv", _EMPTY), ("cu_seqlens", _EMPTY),
                                         ("max_seqlen", _EMPTY)] + _OPTS,
    "flash_attn_varlen_kvpacked_func": [("q", _EMPTY), ("kv", _EMPTY),
                                        ("cu_seqlens_q", _EMPTY), ("cu_seqlens_k", _EMPTY),
                                        ("max_seqlen_q", _EMPTY), ("max_seqlen_k", _EMPTY)]
                                       + _OPTS,
}


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_2_8_3))
def test_signature_is_flash_attn_2_8_3(name):
    params = inspect.signature(getattr(fai, name)).parameters.values()
    assert [(p.name, p.default) for p in params] == FLASH_ATTN_2_8_3[name]
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)


# --------------------------------------------------------------------------------------
# Calls as users write them

def test_positional_call_is_read_in_flash_attn_order():
    """flash_attn_func(q, k, v, 0.0, None, True): dropout 0, default scale, causal."""
    q, k, v = (_rand((1, 37, 2, 32), seed=s) for s in range(3))
    out = flash_attn_func(q, k, v, 0.0, None, True)
    assert isinstance(out, torch.Tensor)
    _check_out(out, q, k, v, causal=True)
    out2 = flash_attn_func(q, k, v, 0.0, 0.5, False, (-1, -1), 0.0, None, False, False)
    _check_out(out2, q, k, v, softmax_scale=0.5)


def test_return_attn_probs_gives_out_lse_none():
    q, k, v = (_rand((2, 19, 2, 32), seed=s) for s in range(3))
    out, lse, probs = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ref, lse_ref = attention_ref(q.float(), k.float(), v.float(), causal=True)
    assert probs is None and lse.dtype == torch.float32 and lse.shape == (2, 2, 19)
    torch.testing.assert_close(lse, lse_ref, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=True), atol=0, rtol=0)


def test_flash_attn_tests_call_form():
    """flash-attn's tests/test_flash_attn.py: options by keyword, lse and probs back."""
    q, k, v = (_rand((1, 23, 4, 64), seed=s) for s in range(3))
    k, v = k[:, :, :2], v[:, :, :2]  # GQA
    out, lse, s_dmask = flash_attn_func(q, k, v, 0.0, causal=True, window_size=(-1, -1),
                                        softcap=0.0, alibi_slopes=None,
                                        deterministic=True, return_attn_probs=True)
    assert s_dmask is None
    _check_out(out, q, k, v, causal=True)


def test_transformers_call_form():
    """transformers' _flash_attention_forward: q, k, v positional, the rest by keyword."""
    q, k, v = (_rand((2, 21, 2, 16), seed=s) for s in range(3))
    out = flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=0.3, causal=True)
    _check_out(out, q, k, v, softmax_scale=0.3, causal=True)
    lens = [5, 0, 9]
    cu = torch.tensor([0, 5, 5, 14], dtype=torch.int32, device=DEV)
    qv, kv_, vv = (_rand((14, 2, 16), seed=s) for s in range(3, 6))
    out = flash_attn_varlen_func(qv, kv_, vv, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                 max_seqlen_q=max(lens), max_seqlen_k=max(lens),
                                 dropout_p=0.0, softmax_scale=None, causal=True)
    ref, _ = attention_varlen_ref(qv.float(), kv_.float(), vv.float(), cu, cu, causal=True)
    pt, _ = attention_varlen_ref(qv, kv_, vv, cu, cu, causal=True, compute_dtype=torch.bfloat16)
    assert_error_within(out, pt, ref, slack=_slack(ref, torch.bfloat16), name="varlen")


def test_packed_forms_are_views_and_match():
    qkv = _rand((2, 17, 3, 2, 32), seed=1).requires_grad_()
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.detach().unbind(2)
    _check_out(out, q, k, v, causal=True)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and torch.isfinite(qkv.grad).all()
    qq = _rand((2, 17, 4, 32), seed=2)
    kv = _rand((2, 17, 2, 2, 32), seed=3)
    _check_out(flash_attn_kvpacked_func(qq, kv), qq, kv[:, :, 0], kv[:, :, 1])
    cu = torch.tensor([0, 7, 17], dtype=torch.int32, device=DEV)
    qkv_v = _rand((17, 3, 2, 32), seed=4)
    o1 = flash_attn_varlen_qkvpacked_func(qkv_v, cu, 10, causal=True)
    o2 = flash_attn_varlen_func(*qkv_v.unbind(1), cu, cu, 10, 10, causal=True)
    torch.testing.assert_close(o1, o2, atol=0, rtol=0)
    kv_v = _rand((17, 2, 2, 32), seed=5)
    o3 = flash_attn_varlen_kvpacked_func(qkv_v[:, 0], kv_v, cu, cu, 10, 10)
    o4 = flash_attn_varlen_func(qkv_v[:, 0], *kv_v.unbind(1), cu, cu, 10, 10)
    torch.testing.assert_close(o3, o4, atol=0, rtol=0)


def test_non_unit_last_stride_is_copied_like_flash_attn():
    q = _rand((1, 9, 2, 32, 2), seed=0)[..., 0]      # last stride 2
    k, v = (_rand((1, 9, 2, 32), seed=s) for s in (1, 2))
    assert q.stride(-1) != 1
    _check_out(flash_attn_func(q, k, v), q, k, v)


def test_deterministic_backward_is_bitwise_repeatable():
    q, k, v = (_rand((1, 40, 4, 32), seed=s).requires_grad_() for s in range(3))
    dout = _rand((1, 40, 4, 32), seed=9)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        flash_attn_func(q, k, v, causal=True, deterministic=True).backward(dout)
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_unimplemented_options_raise():
    q = _rand((1, 8, 2, 32))
    with pytest.raises(NotImplementedError, match="dropout_p"):
        flash_attn_func(q, q, q, 0.1)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        flash_attn_func(q, q, q, dropout_p=0.5, causal=True)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEV)
    with pytest.raises(NotImplementedError, match="block_table"):
        flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 8, 8,
                               block_table=torch.zeros(1, 1, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, q, q, window_size=4)
    with pytest.raises(ValueError, match="alibi_slopes"):
        flash_attn_func(q, q, q, alibi_slopes=torch.ones(3, device=DEV))
    with pytest.raises(TypeError, match="alibi_slopes"):
        flash_attn_func(q, q, q, alibi_slopes=torch.ones(2, device=DEV, dtype=torch.float64))


# --------------------------------------------------------------------------------------
# cu_seqlens: checked on the device, never read past

def _varlen_inputs(total_q=20, total_k=24, pad=16):
    """q, k, v as views into NaN-filled buffers: a read outside them would leak NaN."""
    def view(n, seed):
        buf = torch.full((n + 2 * pad, 2, 32), float("nan"), dtype=torch.bfloat16, device=DEV)
        buf[pad:pad + n] = _rand((n, 2, 32), seed=seed)
        return buf[pad:pad + n]
    return view(total_q, 1), view(total_k, 2), view(total_k, 3)


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
@pytest.mark.parametrize("bad", ["decreasing", "past_end", "negative", "too_long"])
def test_bad_cu_seqlens_raise_naming_the_argument(which, bad):
    q, k, v = _varlen_inputs()
    good = {"cu_seqlens_q": [0, 6, 20], "cu_seqlens_k": [0, 10, 24]}
    total = {"cu_seqlens_q": 20, "cu_seqlens_k": 24}[which]
    vals = {"decreasing": [0, 12, 8], "past_end": [0, 6, total + 1],
            "negative": [-3, 6, total], "too_long": [0, 1, total]}[bad]
    cus = {n: torch.tensor(vals if n == which else good[n], dtype=torch.int32, device=DEV)
           for n in good}
    # max_seqlen: each sequence of the good tensors fits; "too_long" breaks it
    max_q, max_k = 14, 14
    if GPU:  # a device-side assert poisons the CUDA context: see the subprocess test
        pytest.skip("GPU: tested in a subprocess by test_gpu_bad_cu_seqlens_raise_at_sync")
    with pytest.raises(RuntimeError, match=which):
        flash_attn_varlen_func(q, k, v, cus["cu_seqlens_q"], cus["cu_seqlens_k"], max_q, max_k)


def test_valid_cu_seqlens_that_flash_attn_accepts():
    """flash-attn reads rows cu[b]..cu[b+1]-1 and nothing else: cu[0] > 0 and unused tail
    rows are valid, and give the attention of those rows."""
    q, k, v = _varlen_inputs()
    cu_q = torch.tensor([2, 6, 15], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([1, 10, 22], dtype=torch.int32, device=DEV)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 12, causal=True)
    for b in range(2):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        _check_out(out[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                   causal=True)


def test_bad_values_never_read_outside_the_tensors(monkeypatch):
    """With the device assert disarmed, garbage cu_seqlens still read nothing outside q, k,
    v: their NaN-filled surroundings reach no output. (Outputs start as zeros here, not
    NaN: with bad values some rows are not computed, and only reads are under test.)"""
    monkeypatch.setattr(torch, "_assert_async", lambda *a, **k: None)
    monkeypatch.setattr(fa, "_empty", torch.zeros)
    q, k, v = _varlen_inputs()
    for cu_q, cu_k in (([0, 12, 8], [0, 30, 24]), ([-5, 6, 40], [-9, 10, 24]),
                       ([0, 20, 20], [0, 24, 24]), ([25, 30, 40], [0, 3, 50])):
        out, lse, _ = flash_attn_varlen_func(
            q, k, v, torch.tensor(cu_q, dtype=torch.int32, device=DEV),
            torch.tensor(cu_k, dtype=torch.int32, device=DEV), 7, 5, return_attn_probs=True)
        assert out.shape == q.shape
        assert not torch.isnan(out).any() and not torch.isnan(lse).any(), (cu_q, cu_k)


def test_default_path_never_syncs(monkeypatch):
    """No .item(), .tolist() or bool() of a tensor on a default call (fwd and bwd)."""
    def refuse(*a, **k):
        raise AssertionError("a host sync on the default path")
    q, k, v = _varlen_inputs()
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    cu_q = torch.tensor([0, 6, 20], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 10, 24], dtype=torch.int32, device=DEV)
    qb = _rand((2, 17, 2, 32)).requires_grad_()
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    flash_attn_varlen_func(q, k, v, cu_q, cu_k, 14, 14, causal=True).sum().backward()
    flash_attn_func(qb, qb, qb, causal=True, window_size=(4, 0)).sum().backward()


# --------------------------------------------------------------------------------------
# torch.compile traces the custom ops (fullgraph: no graph break)

class _TinyAttention(torch.nn.Module):
    def __init__(self, d=32, h=2):
        super().__init__()
        self.qkv = torch.nn.Linear(d * h, 3 * d * h, dtype=torch.bfloat16)
        self.h, self.d = h, d

    def forward(self, x, cu=None, max_len=None):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, self.d).unbind(2)
        if cu is None:
            out = flash_attn_func(q, k, v, causal=True)
        else:
            out = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, max_len, max_len,
                                         causal=True)[None]
        return out.flatten(2)


@pytest.mark.parametrize("varlen", [False, True])
def test_torch_compile_fullgraph_matches_eager(varlen):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _TinyAttention().to(DEV)
    x = _rand((1, 24, 64), seed=7)
    args = (torch.tensor([0, 9, 24], dtype=torch.int32, device=DEV), 15) if varlen else ()
    backend = "inductor" if GPU else "aot_eager"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = model(xe, *args), compiled(xc, *args)
    torch.testing.assert_close(yc, ye, atol=0, rtol=0)
    ye.float().square().sum().backward()
    yc.float().square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-2, rtol=1e-2)


def test_fake_implementations_agree_with_the_kernels():
    """torch.library's own checker: schema, fake tensors, autograd registration."""
    q, k, v = (_rand((1, 19, 2, 32), seed=s).requires_grad_() for s in range(3))
    torch.library.opcheck(fai._fwd_op, (q, k, v, None, None, 19, 19, 0.2, True, -1, -1, 0.0,
                                        None),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    cu = torch.tensor([0, 7, 19], dtype=torch.int32, device=DEV)
    torch.library.opcheck(fai._fwd_op, (q[0].detach(), k[0].detach(), v[0].detach(), cu, cu,
                                        12, 12, 0.2, False, -1, -1, 0.0, None),
                          test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------------------
# GPU: CUDA graphs, sync-free default calls, device asserts

@gpu
def test_gpu_default_calls_capture_in_a_cuda_graph():
    b, s, h, d = 2, 1000, 4, 128
    q, k, v = (_rand((b, s, h, d), seed=i) for i in range(3))
    lens = [300, 0, 700]
    cu = torch.tensor([0, 300, 300, 1000], dtype=torch.int32, device=DEV)
    qv, kv_, vv = (x[0] for x in (q, k, v))
    flash_attn_func(q, k, v, causal=True)          # compile / tune outside the capture
    flash_attn_varlen_func(qv, kv_, vv, cu, cu, max(lens), max(lens), causal=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_attn_func(q, k, v, causal=True)
        out_v = flash_attn_varlen_func(qv, kv_, vv, cu, cu, max(lens), max(lens), causal=True)
    for seed in (11, 12):                           # new values in the static inputs
        for t in (q, k, v):
            t.copy_(_rand(t.shape, seed=seed + t.shape[-1]))
        graph.replay()
        _check_out(out, q, k, v, causal=True)
        ref, _ = attention_varlen_ref(qv.float(), kv_.float(), vv.float(), cu, cu, causal=True)
        pt, _ = attention_varlen_ref(qv, kv_, vv, cu, cu, causal=True,
                                     compute_dtype=torch.bfloat16)
        assert_error_within(out_v, pt, ref, slack=_slack(ref, torch.bfloat16), name="varlen")


@gpu
def test_gpu_default_calls_do_not_sync():
    """torch's sync debug mode raises on any synchronising call in the default path."""
    q, k, v = (_rand((2, 512, 4, 64), seed=i).requires_grad_() for i in range(3))
    cu = torch.tensor([0, 100, 512], dtype=torch.int32, device=DEV)
    qv, kv_, vv = (x.detach()[0].clone().requires_grad_() for x in (q, k, v))
    flash_attn_func(q, k, v, causal=True).sum().backward()   # tune first (the tuner syncs)
    flash_attn_varlen_func(qv, kv_, vv, cu, cu, 412, 412, causal=True).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flash_attn_func(q, k, v, causal=True).sum().backward()
        flash_attn_varlen_func(qv, kv_, vv, cu, cu, 412, 412, causal=True).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
def test_gpu_bad_cu_seqlens_raise_at_sync(which):
    """A device-side assert poisons the CUDA context, so it runs in a child process."""
    code = textwrap.dedent(f"""
        import sys, pathlib
        sys.path[:0] = [{str(fa.__file__.rsplit('/', 3)[0])!r},
                        {str(fa.__file__.rsplit('/', 1)[0])!r}]
        from common import runtime
        import torch
        from flash_attn_interface import flash_attn_varlen_func
        q = torch.randn(20, 2, 64, device="cuda", dtype=torch.bfloat16)
        good = torch.tensor([0, 6, 20], dtype=torch.int32, device="cuda")
        bad = torch.tensor([0, 12, 8], dtype=torch.int32, device="cuda")
        cu_q, cu_k = (bad, good) if {which!r} == "cu_seqlens_q" else (good, bad)
        out = flash_attn_varlen_func(q, q, q, cu_q, cu_k, 14, 14)
        torch.cuda.synchronize()
        print("NO ERROR")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    said = res.stdout + res.stderr   # the device prints the assert's message
    assert "NO ERROR" not in said and res.returncode != 0
    assert which in said, said[-2000:]
