"""The DeepSeek-style decoder: our kernel and the torch path serve the same tokens."""

import pytest
import torch

from common import runtime
from common.checks import rel_error

import flash_mla
from mla_model import (TINY, MLADecoder, PageAllocator, PagedLatentCache, generate,
                       make_requests, new_cache)

DEV = runtime.torch_device()


def _served(prompt_lens, steps, attention, seed=0):
    model = MLADecoder(TINY, torch.float32, DEV, seed=seed)
    cache = new_cache(model, prompt_lens, steps, torch.float16, seed=seed)
    first = model.prefill(cache, make_requests(prompt_lens, TINY.vocab, seed)).argmax(-1)
    toks, logits = generate(model, cache, first, steps, attention)
    return toks, logits, cache


def test_kernel_and_torch_paths_serve_the_same_tokens(monkeypatch):
    """Requests of different prompt lengths (one crosses a page boundary while decoding,
    one starts a page): the same greedy tokens, and logits equal up to the last-bit
    rounding of the fp16 attention output. The kernel plans once per step and every
    layer reuses that plan."""
    plans = []
    real = flash_mla.plan_mla_splits
    monkeypatch.setattr(flash_mla, "plan_mla_splits",
                        lambda *a, **k: plans.append(1) or real(*a, **k))
    lens, steps = [5, 62, 128], 3
    tk, lk, cache = _served(lens, steps, "kernel")
    assert len(plans) == steps                        # one plan per step, for both layers
    tt, lt, _ = _served(lens, steps, "torch")
    assert torch.equal(tk, tt), (tk, tt)
    # fp16 cache (10 mantissa bits): the paths differ by ~2e-5; a 1% error in the
    # kernel's softmax scale alone gives 3e-3
    assert rel_error(lk, lt) < 5e-4
    assert cache.lens == [n + steps for n in lens]
    assert cache.seqlens.tolist() == cache.lens


def test_prefill_equals_decoding_the_prompt_token_by_token():
    """The prompt through prefill (chunked causal attention, plain torch) and the same
    prompt fed one token per step through decode_step: the same next-token logits, and
    the same rows in the cache (a page boundary inside the prompt)."""
    model = MLADecoder(TINY, torch.float32, DEV, seed=1)
    prompt = make_requests([70], TINY.vocab, seed=1)
    a = new_cache(model, [70], 0, torch.bfloat16, seed=1)
    la = model.prefill(a, prompt, chunk=32)
    b = new_cache(model, [70], 0, torch.bfloat16, seed=2)     # other page order
    for t in range(70):
        lb = model.decode_step(prompt[0][t:t + 1].to(DEV), b, attention="torch")
    assert rel_error(lb, la) < 2e-2
    for layer in range(TINY.n_layers):
        rows_a = a.layer(layer)[a.block_table[0].long()].flatten(0, 1)[:70]
        rows_b = b.layer(layer)[b.block_table[0].long()].flatten(0, 1)[:70]
        assert rel_error(rows_a.float(), rows_b.float()) < 1e-2


def test_page_allocator_and_block_table():
    cache = PagedLatentCache(n_layers=1, batch=2, num_pages=5, max_pages_per_seq=3)
    cache.grow([65, 10])
    assert [len(p) for p in cache.pages] == [2, 1]
    table = cache.block_table.tolist()
    assert table[0][:2] == cache.pages[0] and table[1][0] == cache.pages[1][0]
    assert len(set(cache.pages[0] + cache.pages[1])) == 3          # no page twice
    cache.grow([129, 10])
    with pytest.raises(RuntimeError, match="more than 3 pages"):
        cache.grow([193, 10])
    cache.release(0)
    cache.grow([0, 64 * 3])
    assert len(cache.pages[1]) == 3
    alloc = PageAllocator(1)
    alloc.alloc()
    with pytest.raises(RuntimeError, match="out of cache pages"):
        alloc.alloc()
