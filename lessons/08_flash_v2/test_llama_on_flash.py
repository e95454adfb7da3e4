"""A transformers model on our FlashAttention (llama_on_flash.py), against SDPA and eager.

The rule is flash-attn's, applied to a whole model: in bf16, our model's error against a
float32 reference (the same bf16 weights, cast to float32, on SDPA) may be at most twice
the error of the same model on PyTorch's SDPA (or eager) in bf16, plus the rounding step
of bf16 at the reference's scale. The weights are drawn with initializer_range 0.1 so that
the attention scores are far from uniform (with the default 0.02 a wrong scale or a wrong
window barely changes the softmax). Under the interpreter (CPU) the model is tiny: 2
layers, hidden 64, 4 query heads over 2 key/value heads, head dim 16.
"""

import pytest
import torch

from common import runtime
from common.checks import assert_error_within

import transformers.modeling_flash_attention_utils as fa_utils
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import llama_on_flash as lf
from flash_attn_interface import flash_attn_func, flash_attn_varlen_func

DEV = runtime.torch_device()
INIT = 0.1
B, S = 2, 24


def _ids(b=B, s=S, seed=0, vocab=256):
    return torch.randint(3, vocab, (b, s), generator=torch.Generator().manual_seed(seed)).to(DEV)


def _model(impl, family="llama", **kw):
    kw.setdefault("initializer_range", INIT)
    return lf.make_llama("tiny", impl, family=family, **kw)


def _reference(model, family="llama", impl="sdpa", **kw):
    """The same (bf16-rounded) weights in float32: the ground truth for the bf16 runs."""
    ref = _model(impl, family, dtype=torch.float32, **kw)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return ref


def _slack(ref):
    """flash-attn's atol: twice the rounding step of bf16 at the reference's scale."""
    ref = ref.float()
    return 2 * ((ref.to(torch.bfloat16) + 0.3 - 0.3).float() - ref).abs().max().item() + 1e-6


def _check(ours, peer, ref, name):
    assert_error_within(ours.float(), peer.float(), ref.float(), slack=_slack(ref), name=name)


def _run(model, ids, mask=None, labels=True, params_of=None):
    out = model(input_ids=ids, attention_mask=mask, labels=ids if labels else None)
    if labels:
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in (params_of or model).named_parameters()
             if p.grad is not None}
    return out, grads


# --------------------------------------------------------------------------------------
# the attention function itself: the contract transformers relies on
# --------------------------------------------------------------------------------------

def test_registered_and_validated_by_transformers():
    lf.register()
    assert AttentionInterface._global_mapping[lf.ATTN_NAME] is lf.course_flash_attention
    assert lf.ATTN_NAME in AttentionMaskInterface._global_mapping
    model = _model(lf.ATTN_NAME)
    assert model.config._attn_implementation == lf.ATTN_NAME
    with pytest.raises(ValueError, match="not supported"):
        model.set_attn_implementation("no_such_attention")
    with pytest.raises(ValueError, match="flash"):
        lf.register("course_kernels")


@pytest.mark.parametrize("scaling", [None, 0.7])
def test_attention_function_contract(scaling):
    """(b, h, s, d) in, (b, s, h, d) out, `scaling` honoured, GQA, against SDPA in fp32."""
    lf.register()
    module = _model(lf.ATTN_NAME).model.layers[0].self_attn
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 19, 16, generator=gen).to(DEV, torch.bfloat16)
    k, v = (torch.randn(2, 2, 19, 16, generator=gen).to(DEV, torch.bfloat16) for _ in range(2))
    out, weights = lf.course_flash_attention(module, q, k, v, None, scaling=scaling)
    assert weights is None and out.shape == (2, 19, 4, 16)

    def sdpa(dtype):
        return torch.nn.functional.scaled_dot_product_attention(
            q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True, scale=scaling,
            enable_gqa=True).transpose(1, 2)
    _check(out, sdpa(torch.bfloat16), sdpa(torch.float32), "attention out")


def test_unsupported_features_raise():
    lf.register()
    module = _model(lf.ATTN_NAME).model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 16).to(DEV, torch.bfloat16)
    k = v = torch.randn(1, 2, 8, 16).to(DEV, torch.bfloat16)
    with pytest.raises(NotImplementedError, match="dropout"):
        lf.course_flash_attention(module, q, k, v, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="sinks"):
        lf.course_flash_attention(module, q, k, v, None, s_aux=torch.zeros(4))
    model = _model(lf.ATTN_NAME, attention_dropout=0.1).train()   # dropout only in train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(input_ids=_ids(1, 8))


def test_which_kernel_runs(monkeypatch):
    """Unpadded batches go to flash_attn_func, padded ones to flash_attn_varlen_func."""
    calls = {"dense": 0, "varlen": 0}

    def counted(fn, key):
        def wrapper(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapper

    model = _model(lf.ATTN_NAME)
    monkeypatch.setattr(fa_utils, "_flash_fn", counted(flash_attn_func, "dense"))
    monkeypatch.setattr(fa_utils, "_flash_varlen_fn", counted(flash_attn_varlen_func, "varlen"))
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        model(input_ids=_ids(), attention_mask=torch.ones(B, S, dtype=torch.long, device=DEV))
        assert calls == {"dense": layers, "varlen": 0}
        mask = torch.ones(B, S, dtype=torch.long, device=DEV)
        mask[1, :5] = 0
        model(input_ids=_ids(), attention_mask=mask)
        assert calls == {"dense": layers, "varlen": layers}


# --------------------------------------------------------------------------------------
# training: losses and gradients over AdamW steps
# --------------------------------------------------------------------------------------

def test_training_steps_match_sdpa():
    """3 AdamW steps from one init: every step's loss, and every parameter's gradient at
    the first and last step, within the error rule (ours vs SDPA-bf16, against fp32)."""
    ids = _ids()
    models = {"ours": _model(lf.ATTN_NAME), "sdpa": _model("sdpa")}
    models["ref"] = _reference(models["ours"])
    opts = {n: torch.optim.AdamW(m.parameters(), lr=3e-3) for n, m in models.items()}
    steps = 3
    for step in range(steps):
        res = {}
        for n, m in models.items():
            out, grads = _run(m, ids)
            res[n] = (out.loss.detach(), out.logits.detach(), grads)
            opts[n].step()
            opts[n].zero_grad(set_to_none=True)
        _check(res["ours"][0], res["sdpa"][0], res["ref"][0], f"loss step {step}")
        if step in (0, steps - 1):
            _check(res["ours"][1], res["sdpa"][1], res["ref"][1], f"logits step {step}")
            assert res["ours"][2].keys() == res["ref"][2].keys()
            for name in res["ref"][2]:
                _check(res["ours"][2][name], res["sdpa"][2][name], res["ref"][2][name],
                       f"grad {name} step {step}")
    assert res["ours"][0] < 0.99 * _first_loss(ids), "the loss should go down"


def _first_loss(ids):
    with torch.no_grad():
        return _model("sdpa")(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_sdpa(side):
    """A padded batch (unpadded to varlen inside transformers): logits at real tokens and
    gradients within the rule."""
    ids = _ids()
    mask = torch.ones(B, S, dtype=torch.long, device=DEV)
    if side == "left":
        mask[1, :7] = 0
    else:
        mask[1, -7:] = 0
    models = {"ours": _model(lf.ATTN_NAME), "sdpa": _model("sdpa")}
    models["ref"] = _reference(models["ours"])
    res = {}
    for n, m in models.items():
        out = m(input_ids=ids, attention_mask=mask)
        real = out.logits[mask.bool()]
        real.float().square().mean().backward()
        res[n] = (real.detach(), {k: p.grad for k, p in m.named_parameters()})
    _check(res["ours"][0], res["sdpa"][0], res["ref"][0], f"{side}-padded logits")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                 "model.embed_tokens.weight"):
        _check(res["ours"][1][name], res["sdpa"][1][name], res["ref"][1][name], f"grad {name}")


# --------------------------------------------------------------------------------------
# generation with a KV cache
# --------------------------------------------------------------------------------------

def _generate(model, ids, mask=None, n=6):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False)


def _assert_same_tokens_up_to_ties(ours, peer, peer_model, ref_model, mask, prompt_len):
    """Greedy decoding in bf16 is exact only while the best token wins by more than the
    rounding noise. Every row must match the peer's tokens until, at most, a step where
    the token we chose is a near-tie under the float32 reference (teacher-forced on the
    peer's sequence): its logit within 2x the peer's own bf16 logit error of the best.
    After such a step the two continuations are different sequences; nothing to compare."""
    full = None if mask is None else torch.cat(
        [mask, torch.ones(mask.shape[0], peer.shape[1] - prompt_len, dtype=mask.dtype,
                          device=mask.device)], 1)
    with torch.no_grad():
        ref = ref_model(input_ids=peer, attention_mask=full).logits.float()
        bf16 = peer_model(input_ids=peer, attention_mask=full).logits.float()
    real = slice(None) if full is None else full.bool()
    tol = 2 * (bf16 - ref)[real].abs().max().item()
    matched = 0
    print(f"near-tie tolerance {tol:.4f}")
    for row in range(peer.shape[0]):
        differ = (ours[row, prompt_len:] != peer[row, prompt_len:]).nonzero()
        if len(differ) == 0:
            matched += peer.shape[1] - prompt_len
            continue
        t = prompt_len + differ[0].item()
        matched += t - prompt_len
        print(f"row {row} diverges at new token {t - prompt_len}")
        logits = ref[row, t - 1]                       # the logits that chose token t
        gap = (logits.max() - logits[ours[row, t]]).item()
        assert gap <= tol, (f"row {row}: token {t - prompt_len} differs ({ours[row, t].item()} "
                            f"vs {peer[row, t].item()}) and is no near-tie: the reference "
                            f"prefers the peer's by {gap:.4f} > {tol:.4f}\n{ours}\n{peer}")
    assert matched >= (peer.shape[1] - prompt_len) * peer.shape[0] // 2, (ours, peer)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generate_matches_sdpa(family):
    """Greedy generate (DynamicCache, decode steps of one query against the cache) gives
    sdpa's tokens (up to bf16 near-ties), for equal prompts and for a left-padded batch
    with an attention mask. Mistral: sliding window 8 and a 12-token prompt, so the prefill
    runs with window_size=(7, 7) (transformers' sliding cache then keeps 7 keys per layer)."""
    half = dict(dtype=torch.float16)   # 3 more mantissa bits than bf16: fewer near-ties
    ours = _model(lf.ATTN_NAME, family, **half).eval()
    sdpa = _model("sdpa", family, **half).eval()
    ref = _reference(ours, family).eval()
    p = 12 if family == "mistral" else 8     # mistral: the prefill itself needs the window
    ids = _ids(B, p, seed=5)
    n = 8
    _assert_same_tokens_up_to_ties(_generate(ours, ids, n=n), _generate(sdpa, ids, n=n),
                                   sdpa, ref, None, p)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    _assert_same_tokens_up_to_ties(_generate(ours, ids, mask, n), _generate(sdpa, ids, mask, n),
                                   sdpa, ref, mask, p)


# --------------------------------------------------------------------------------------
# sliding window (Mistral) and softcap (Gemma2)
# --------------------------------------------------------------------------------------

def test_sliding_window_mistral_matches_sdpa():
    """sliding_window=8 over 24 tokens: transformers passes window_size=(7, 7) with
    causal=True; SDPA gets the banded mask. Logits and gradients within the rule."""
    ids = _ids()
    models = {"ours": _model(lf.ATTN_NAME, "mistral"), "sdpa": _model("sdpa", "mistral")}
    models["ref"] = _reference(models["ours"], "mistral")
    res = {n: _run(m, ids) for n, m in models.items()}
    _check(res["ours"][0].logits, res["sdpa"][0].logits, res["ref"][0].logits, "logits")
    for name in res["ref"][1]:
        _check(res["ours"][1][name], res["sdpa"][1][name], res["ref"][1][name], f"grad {name}")
    # and the window matters: without it the logits move by far more than the tolerance
    full = _model("sdpa", "mistral", dtype=torch.float32, sliding_window=None)
    full.load_state_dict(models["ref"].state_dict())
    with torch.no_grad():
        moved = (full(input_ids=ids).logits - res["ref"][0].logits).abs().max().item()
    assert moved > 20 * _slack(res["ref"][0].logits)


def test_softcap_gemma2_matches_eager():
    """Gemma2: attention softcap (tanh), scaling from query_pre_attn_scalar (not
    head_dim**-0.5), alternating sliding/full layers. SDPA cannot softcap, so the peer is
    transformers' eager attention."""
    kw = dict(attn_logit_softcapping=1.5, query_pre_attn_scalar=9, sliding_window=8)
    ids = _ids()
    models = {"ours": _model(lf.ATTN_NAME, "gemma2", **kw),
              "eager": _model("eager", "gemma2", **kw)}
    models["ref"] = _reference(models["ours"], "gemma2", impl="eager", **kw)
    res = {n: _run(m, ids) for n, m in models.items()}
    _check(res["ours"][0].logits, res["eager"][0].logits, res["ref"][0].logits, "logits")
    for name in res["ref"][1]:
        _check(res["ours"][1][name], res["eager"][1][name], res["ref"][1][name], f"grad {name}")


# --------------------------------------------------------------------------------------
# torch.compile: the whole model in one graph, through our custom ops
# --------------------------------------------------------------------------------------

def test_compile_fullgraph_through_custom_op():
    """torch.compile(fullgraph=True) of the full Llama forward and backward: no graph
    break (fullgraph raises on one), our course::flash_attn_fwd/bwd ops in the graphs,
    and the same logits and gradients as eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    torch._dynamo.reset()
    ops = {"fw": [], "bw": []}

    def recorder(kind):   # backend="aot_eager" is exactly this, minus the recording
        def compiler(gm, example_inputs):
            ops[kind].extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=recorder("fw"), bw_compiler=recorder("bw"))
    model = _model(lf.ATTN_NAME)
    ids = _ids()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out_c, grads_c = _run(compiled, ids, params_of=model)
    layers = model.config.num_hidden_layers
    assert sum("course.flash_attn_fwd" in o for o in ops["fw"]) == layers, ops["fw"]
    assert sum("course.flash_attn_bwd" in o for o in ops["bw"]) == layers, ops["bw"]
    model.zero_grad(set_to_none=True)
    out_e, grads_e = _run(model, ids)
    torch.testing.assert_close(out_c.logits, out_e.logits, atol=0, rtol=0)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-2, rtol=1e-2)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# the benchmark's code path (emulation: tiny model, once, no timing)
# --------------------------------------------------------------------------------------

@pytest.mark.skipif(runtime.is_gpu(), reason="on a GPU this is the 2-3 minute benchmark")
def test_run_model_mode_under_emulation():
    from rich.console import Console
    report = lf.run_model_mode(Console(quiet=True))
    impls = {r.impl for r in report.rows}
    assert impls == {"course_flash (ours)", "sdpa"}
    assert {r.case["mode"] for r in report.rows} == {"train step", "generate"}
    assert all(r.timing is None and r.value is None for r in report.rows)
    same = [r.extra["same_tokens_as_ours"] for r in report.rows
            if r.peer and r.case["mode"] == "generate"]
    assert same == [1.0, 1.0]
