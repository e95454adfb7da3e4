"""Lesson 08, applied: a Hugging Face transformers Llama that trains and generates on our
FlashAttention-2 kernels.

    from llama_on_flash import register, make_llama
    register()                                    # adds attn_implementation="course_flash"
    model = make_llama("tiny", "course_flash")    # random init from a config, no download

How transformers reaches our kernels (transformers 5.x, read from its source):

1. ``AttentionInterface.register(name, fn)`` makes ``name`` a valid
   ``attn_implementation``. Every attention layer of a modern model (Llama, Mistral,
   Qwen2, Gemma2...) calls ``fn(module, query, key, value, attention_mask, dropout=,
   scaling=, sliding_window=, softcap=, ...)`` with query/key/value laid out (batch, heads,
   seq, head_dim) and expects ``(out (batch, seq, heads, head_dim), weights or None)``.
2. ``AttentionMaskInterface.register(name, mask_fn)`` decides which mask ``fn`` receives.
   A name without a mask function gets ``attention_mask=None`` *always*: padding would be
   silently ignored. We register transformers' ``flash_attention_mask``: ``None`` when
   nothing is padded, else the 2-D (batch, kv_len) boolean padding mask.
3. A name containing "flash" is treated as a FlashAttention flavour. At
   ``set_attn_implementation`` and in every call of transformers' own FA2 glue
   (``integrations.flash_attention.flash_attention_forward`` ->
   ``modeling_flash_attention_utils._flash_attention_forward``) it asks
   ``lazy_import_flash_attention(name)`` for (flash_attn_func, flash_attn_varlen_func, ...).
   That loader knows only the flash-attn packages and Hub kernels; it caches the last
   answer in module globals. We put our two functions there, so transformers' tested glue
   does the rest exactly as it does for flash-attn 2: transposing to (batch, seq, heads,
   dim), ``causal`` (bottom-right, as flash-attn >= 2.1), ``softmax_scale`` from the
   model's ``scaling``, ``window_size=(w-1, w-1)`` for ``sliding_window=w``, ``softcap``,
   GQA (fewer key/value heads, no repeat), and for a padded batch: unpad to packed
   tokens, ``cu_seqlens`` by a cumsum on the device, ``flash_attn_varlen_func``, re-pad.
   Which keyword arguments it passes is decided by inspecting our varlen function's
   signature, which is flash-attn 2.8.3's (``flash_attn_interface.py``).

What our kernels do not do, and say so instead of computing something else:
``dropout > 0`` (a model in ``train()`` with ``attention_dropout > 0``) raises
NotImplementedError from flash_attn_func; attention sinks (``s_aux``, gpt-oss), which
transformers would silently drop for a kernel that lacks them, raise here; fp32
query/key/value are cast to the dtype of the model's Linear layers (transformers' rule), so
an fp32 model needs autocast (bf16/fp16) to use this implementation.

Host synchronisation: the unpadded path (no attention_mask, or one without padding) has
none. A padded batch costs what it costs with flash-attn 2 in transformers: per layer a
``nonzero`` and ``max().item()`` to unpad (dynamic shapes need the host to know sizes).

The benchmark half (``run_model_mode``) times training (forward + backward + AdamW) and
``generate`` of a Llama-style model with ``course_flash`` against ``sdpa`` in the same run.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # run as a script: make the repository's `common` importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from common import runtime  # selects GPU or interpreter before triton is imported

import torch

import transformers
import transformers.modeling_flash_attention_utils as _fa_utils
from transformers import AttentionInterface
from transformers.integrations import flash_attention as _hf_flash
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from flash_attn_interface import flash_attn_func, flash_attn_varlen_func

LESSON = "08_flash_v2"
ATTN_NAME = "course_flash"   # contains "flash": transformers treats it as an FA flavour


# ======================================================================================
# 1. Registration: our functions become transformers' flash-attn for the name
# ======================================================================================

def _install_functions(name: str) -> None:
    """Put our functions where transformers' FA glue looks them up (its lazy-import cache).

    ``lazy_import_flash_attention(name)`` returns the cached functions when
    ``_loaded_implementation == name``; otherwise it would try to import flash-attn or
    download a Hub kernel named ``name`` and fail.
    """
    _fa_utils._loaded_implementation = name
    _fa_utils._flash_fn = flash_attn_func
    _fa_utils._flash_varlen_fn = flash_attn_varlen_func
    _fa_utils._flash_with_kvcache_fn = None      # only continuous batching (paged) uses it
    _fa_utils._pad_fn = _fa_utils._pad_input
    _fa_utils._unpad_fn = _fa_utils._unpad_input
    # which HF kwargs our signature supports (dropout_p, window_size, softcap, ...)
    _fa_utils._process_flash_kwargs_fn = _fa_utils._lazy_define_process_function(
        flash_attn_varlen_func)


def course_flash_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: torch.Tensor | None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract, on our kernels.

    query (batch, heads, seq_q, dim), key/value (batch, kv_heads, seq_k, dim),
    attention_mask None or (batch, seq_k) bool (1 = real token); kwargs from the layer:
    dropout, scaling, sliding_window, softcap, is_causal, position_ids...
    Returns (out (batch, seq_q, heads, dim), None).
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not implemented in these "
                                  "kernels; transformers would silently drop them")
    name = module.config._attn_implementation
    if _fa_utils._loaded_implementation != name:
        # another FA flavour was loaded since (e.g. a second model): point the cache back
        _install_functions(name)
    return _hf_flash.flash_attention_forward(module, query, key, value, attention_mask,
                                             **kwargs)


def register(name: str = ATTN_NAME) -> str:
    """Make ``attn_implementation=name`` run on our kernels (idempotent). Returns name."""
    if "flash" not in name:
        raise ValueError(f"{name!r}: the name must contain 'flash' so that transformers "
                         "routes it through its FlashAttention glue (padding via varlen)")
    if _hf_flash._use_top_left_mask:
        raise RuntimeError("transformers expects a top-left aligned causal mask here (an "
                           "NPU build?); our kernels align causal bottom-right like flash-attn")
    _install_functions(name)
    AttentionInterface.register(name, course_flash_attention)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


# ======================================================================================
# 2. Models from a config only (random init, no hub access)
# ======================================================================================

SIZES = {
    # CPU tests under the interpreter: GQA 4:2, head dim 16
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=256),
    # GPU benchmark: a ~0.5B Llama (8 layers of Llama-3-1B-like width, head dim 128, GQA 2:1)
    "bench": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, max_position_embeddings=8192),
}

FAMILIES = ("llama", "mistral", "gemma2")


def _config(family: str, size: str, **overrides):
    base = dict(SIZES[size])
    base.update(overrides)
    if family == "llama":
        return transformers.LlamaConfig(**base)
    if family == "mistral":       # every layer sliding-window
        base.setdefault("sliding_window", 8 if size == "tiny" else 1024)
        return transformers.MistralConfig(**base)
    if family == "gemma2":        # softcap, query_pre_attn_scalar, sliding/full layers
        base.setdefault("sliding_window", 8 if size == "tiny" else 1024)
        base.setdefault("query_pre_attn_scalar", base["head_dim"])
        return transformers.Gemma2Config(**base)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def make_llama(size: str = "tiny", attn_implementation: str = ATTN_NAME, *,
               dtype: torch.dtype = torch.bfloat16, device: str | None = None,
               seed: int = 0, family: str = "llama", **overrides):
    """A randomly initialised causal LM from a config (LlamaConfig by default).

    The same ``seed`` gives the same weights whatever ``attn_implementation``; they are
    stored in ``dtype`` (bfloat16 by default: our kernels take fp16/bf16 only), the rotary
    frequencies stay float32 as with ``from_pretrained``. ``family="mistral"`` (sliding
    window) and ``"gemma2"`` (softcap, alternating sliding/full layers) build those
    architectures at the same size;
    ``overrides`` go into the config (e.g. ``initializer_range``, ``sliding_window``).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    if attn_implementation.startswith("course"):
        register(attn_implementation)
    device = device or runtime.torch_device()
    cfg = _config(family, size, **overrides)
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "gemma2": transformers.Gemma2ForCausalLM}[family]
    torch.manual_seed(seed)
    with torch.device(device):
        # as from_pretrained(dtype=...) does: weights in dtype, rotary inv_freq in float32
        model = cls._from_config(cfg, dtype=dtype)
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = 0
    return model


# ======================================================================================
# 3. Benchmark: training and generation throughput, ours vs SDPA in the same run
# ======================================================================================

IMPLS = ((ATTN_NAME, "course_flash (ours)", False), ("sdpa", "sdpa", True))

TRAIN = {"bench": dict(batch=4, seqlen=4096), "tiny": dict(batch=2, seqlen=24)}
GENERATE = {"bench": dict(batch=8, prompt=512, new_tokens=128, pad_max=256),
            "tiny": dict(batch=2, prompt=8, new_tokens=3, pad_max=3)}


def _size() -> str:
    return runtime.pick("bench", "tiny")


def _free():
    gc.collect()
    if runtime.is_gpu():
        torch.cuda.empty_cache()


def _sdpa_backend(model, batch, seqlen) -> str | None:
    """Which SDPA kernel torch picks for the model's attention shape (GPU only)."""
    if not runtime.is_gpu():
        return None
    try:
        c = model.config
        q = torch.empty(batch, c.num_attention_heads, seqlen, c.head_dim, device="cuda",
                        dtype=torch.bfloat16)
        k = torch.empty(batch, c.num_key_value_heads, seqlen, c.head_dim, device="cuda",
                        dtype=torch.bfloat16)
        choice = torch._fused_sdp_choice(q, k, k, None, 0.0, True, scale=None,
                                         enable_gqa=True)
        return torch.nn.attention.SDPBackend(choice).name
    except Exception as e:  # a private API: report rather than fail the benchmark
        return f"unknown ({type(e).__name__})"


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if runtime.is_gpu() else None


def _precompile(console=None):
    """Warm Triton's disk cache for head dim 128 causal, one process per tile (GPU)."""
    if not runtime.is_gpu():
        return
    import multiprocessing as mp
    import os
    import time
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.time()
    jobs = []
    try:   # the kernel module's tile tables: if they change shape, the run compiles lazily
        import flash_attn as fa
        import flash_compile_cache

        d = SIZES["bench"]["head_dim"]
        jobs = ([("fwd", d, True, t, {}) for t in fa.TILES["fwd"][d]]
                + [("bwd", d, True, t, {"which": "dkdv"}) for t in fa.TILES["dkdv"][d]]
                + [("bwd", d, True, t, {"which": "dq"}) for t in fa.TILES["dq"][d]])
        workers = min(len(jobs), max(1, (os.cpu_count() or 2) - 1), 15)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            errors = [e for e in pool.map(flash_compile_cache.compile_job, jobs) if e]
    except Exception as e:  # the run compiles at first launch anyway
        errors = [f"{type(e).__name__}: {e}"]
    if console is not None:
        console.print(f"precompiled {len(jobs)} kernel variants in {time.time() - t0:.0f} s"
                      + (f" ({len(errors)} errors, first: {errors[0][:200]})" if errors else ""))


def bench_training(report, *, size: str | None = None, console=None):
    """Training throughput (tokens/s) of one step = forward + loss + backward + AdamW,
    bf16 weights, for each implementation on the same model and batch. GPU: ~0.5B Llama,
    batch 4 x 4096 tokens (~25 GB); emulation: the tiny model once, no timing."""
    from common.timing import bench

    size = size or _size()
    b, s = TRAIN[size]["batch"], TRAIN[size]["seqlen"]
    dev = runtime.torch_device()
    ids = torch.randint(0, SIZES[size]["vocab_size"], (b, s),
                        generator=torch.Generator().manual_seed(1)).to(dev)
    for impl, label, peer in IMPLS:
        model = make_llama(size, impl, device=dev)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=runtime.is_gpu())
        losses = []

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        if runtime.is_gpu():
            torch.cuda.reset_peak_memory_stats()
        t = bench(step, warmup_ms=300, rep_ms=2000, min_reps=5, flush_l2=False)
        toks = b * s / (t.median_ms * 1e-3) if t else None
        case = {"mode": "train step", "batch x tokens": f"{b} x {s}", "prompts": "-"}
        extra = {"peak_gib": _peak_gib(), "first_loss": float(losses[0]),
                 "last_loss": float(losses[-1]), "steps_run": len(losses)}
        if peer:
            extra["sdpa_backend"] = _sdpa_backend(model, b, s)
        report.add(case, label, t, toks, peer=peer, **extra)
        if console is not None:
            console.print(f"train {label}: "
                          + (f"{toks:,.0f} tokens/s, {t.median_ms:.1f} ms/step, peak "
                             f"{extra['peak_gib']:.1f} GiB" if t else "ran once (no timing)")
                          + f", loss {extra['first_loss']:.3f} -> {extra['last_loss']:.3f}")
        del model, opt, step
        _free()
    return report


def bench_generate(report, *, size: str | None = None, console=None):
    """Generation throughput (new tokens/s, prefill included): greedy ``generate`` with a
    DynamicCache, for a batch of equal-length prompts (no mask: flash_attn_func) and a
    left-padded batch (attention_mask: flash_attn_varlen_func + transformers' unpadding)."""
    from common.timing import bench

    size = size or _size()
    g = GENERATE[size]
    b, p, n = g["batch"], g["prompt"], g["new_tokens"]
    dev = runtime.torch_device()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, SIZES[size]["vocab_size"], (b, p), generator=gen).to(dev)
    mask = torch.ones(b, p, dtype=torch.long)
    pads = torch.randint(0, g["pad_max"] + 1, (b,), generator=gen)
    pads[0] = 0
    for i, k in enumerate(pads.tolist()):
        mask[i, :k] = 0                       # left padding, as generate wants
    mask = mask.to(dev)
    padded_ids = ids.masked_fill(mask == 0, 0)
    outputs = {}
    for impl, label, peer in IMPLS:
        model = make_llama(size, impl, device=dev)
        model.eval()
        for prompts, name in (("equal", "equal-length prompts"), ("padded", "left-padded")):
            kw = dict(input_ids=ids) if prompts == "equal" else dict(input_ids=padded_ids,
                                                                    attention_mask=mask)
            res = []

            def call():
                with torch.no_grad():
                    res.append(model.generate(**kw, max_new_tokens=n, min_new_tokens=n,
                                              do_sample=False))

            t = bench(call, warmup_ms=0, rep_ms=0, min_reps=3, flush_l2=False)
            toks = b * n / (t.median_ms * 1e-3) if t else None
            outputs[(impl, prompts)] = res[-1][:, p:].cpu()
            case = {"mode": "generate", "batch x tokens": f"{b} x ({p} + {n} new)",
                    "prompts": name}
            report.add(case, label, t, toks, peer=peer)
            if console is not None:
                console.print(f"generate {name} {label}: "
                              + (f"{toks:,.0f} new tokens/s ({t.median_ms:.0f} ms per call)"
                                 if t else "ran once (no timing)"))
        del model, call
        _free()
    for prompts, name in (("equal", "equal-length prompts"), ("padded", "left-padded")):
        a, s_ = outputs[(ATTN_NAME, prompts)], outputs[("sdpa", prompts)]
        same = (a == s_).float().mean().item()
        for row in report.rows:       # recorded on the peer's row of that case
            if row.peer and row.case["mode"] == "generate" and row.case["prompts"] == name:
                row.extra["same_tokens_as_ours"] = same
        if console is not None:
            console.print(f"generate {name}: {same:.0%} of new tokens equal to sdpa's "
                          "(greedy in bf16: after a near-tie the sequences may part)")
    return report


def run_model_mode(console=None):
    """``main.py --model``: training and generation tokens/s, ours vs SDPA, one report.

    On a GPU: the ~0.5B Llama (about 2-3 minutes with compilation); the report is saved
    as ``results/model-<gpu>.json``. Under emulation: the tiny model runs each path once
    for correctness; nothing can be timed and nothing is saved.
    """
    from common.results import BenchReport

    if console is None:
        from rich.console import Console
        console = Console()
    register()
    size = _size()
    c = SIZES[size]
    report = BenchReport(LESSON, "model", "tokens/s",
                         f"Llama ({c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
                         f"GQA {c['num_attention_heads']}/{c['num_key_value_heads']}, head dim "
                         f"{c['head_dim']}, bf16) on course_flash vs transformers' sdpa: "
                         "tokens/s")
    if runtime.is_emulated():
        console.print("[yellow]Emulation: the tiny model runs training and generate once per "
                      "implementation (correctness only); no timing is possible without a "
                      "GPU.[/yellow]")
    else:
        _precompile(console)
    bench_training(report, size=size, console=console)
    bench_generate(report, size=size, console=console)
    report.print(console)
    if runtime.is_gpu():
        console.print(f"saved {report.save()}")
    return report


if __name__ == "__main__":
    import sys
    run_model_mode()
    sys.exit(0)
