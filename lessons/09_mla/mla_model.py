"""A small DeepSeek-style decoder served on the lesson's kernel.

    python lessons/09_mla/main.py --model          # tokens/s: our kernel vs the torch path

What a serving engine does around ``flash_mla_with_kvcache``, in plain torch:

- ``MLADecoder``: embedding, ``n_layers`` x (RMSNorm -> MLA attention -> residual,
  RMSNorm -> SwiGLU MLP -> residual), final norm, LM head; random weights. The attention
  is ``mla_layer.MLALayer`` in its absorbed form: each layer caches one 576-value row per
  token ([c_kv, k_pe]) and decodes as multi-query attention over those rows.
- ``PagedLatentCache``: one pool of 64-token pages per layer, one block table for all
  layers (a request's page numbers are the same in every layer's pool), host-side
  lengths, and ``PageAllocator``, a free list of page numbers handed out in shuffled
  order, so a request's pages are scattered as in a real engine.
- ``prefill``: the prompts, one request at a time, with plain torch causal attention
  over the rows just written (the same for both attention paths).
- ``generate``: greedy decoding, one token per request per step. Each step makes one
  sched meta (``get_mla_metadata()``) that every layer's ``flash_mla_with_kvcache`` call
  shares: the first layer plans, the others reuse (FlashMLA's rule: one per set of
  lengths). ``attention="torch"`` runs the same step with ``problems.torch_gather_sdpa``
  (gather each request's pages, SDPA with a length mask) instead of our kernel.
  No host sync in a step: tokens stay on the device, lengths are known on the host,
  a new page is written into the block table by a small host-to-device copy.

Both paths read the same cache (in the kernel's bf16/fp16) and the same rounded
queries, and return attention in that dtype, so they differ only by the order of fp32
sums: the tests check the same tokens and logits (float32 model under the interpreter).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import runtime
from flash_mla import HEAD_DIM_K, HEAD_DIM_V, PAGE_SIZE, flash_mla_with_kvcache, get_mla_metadata
from mla_layer import MLALayer, MLAShapes, rms_norm
from problems import torch_gather_sdpa


@dataclass(frozen=True)
class ModelShapes:
    attn: MLAShapes
    n_layers: int = 2
    d_ff: int = 128
    vocab: int = 97


# Under the interpreter: tiny, but the cache format (512 + 64) the kernel needs.
TINY = ModelShapes(MLAShapes(d_model=64, n_heads=4, q_lora_rank=32, qk_nope_head_dim=32,
                             v_head_dim=32), n_layers=2, d_ff=128, vocab=97)
# On a GPU: DeepSeek-V2-Lite's attention (d_model 2048, 16 heads, 128 + 64 / 128 head
# dims, kv_lora_rank 512; a q_lora_rank like V2's) with 4 layers and a dense MLP.
V2_LITE_LIKE = ModelShapes(MLAShapes(d_model=2048, n_heads=16, q_lora_rank=1536),
                           n_layers=4, d_ff=5632, vocab=32000)


class PageAllocator:
    """A free list of page numbers, handed out in a shuffled order."""

    def __init__(self, num_pages: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_pages, generator=gen).tolist()

    def alloc(self) -> int:
        if not self.free:
            raise RuntimeError("out of cache pages: give PagedLatentCache more num_pages")
        return self.free.pop()

    def release(self, pages):
        self.free.extend(reversed(pages))


class PagedLatentCache:
    """Pages of 64 latent rows (576 values) per layer, a block table per request."""

    def __init__(self, n_layers: int, batch: int, num_pages: int, max_pages_per_seq: int,
                 dtype=torch.bfloat16, device="cpu", seed: int = 0):
        self.k = torch.zeros(n_layers, num_pages, PAGE_SIZE, 1, HEAD_DIM_K, dtype=dtype,
                             device=device)
        self.block_table = torch.zeros(batch, max_pages_per_seq, dtype=torch.int32,
                                       device=device)    # unused slots: page 0 (any page)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.lens = [0] * batch                          # the same, on the host
        self.pages: list[list[int]] = [[] for _ in range(batch)]
        self.allocator = PageAllocator(num_pages, seed)

    def layer(self, i: int) -> torch.Tensor:
        return self.k[i]                                  # (num_pages, 64, 1, 576)

    def grow(self, new_lens: list[int]):
        """Make room for new_lens[b] tokens: allocate pages, update the block table."""
        rows, cols, vals = [], [], []
        for b, n in enumerate(new_lens):
            while len(self.pages[b]) * PAGE_SIZE < n:
                if len(self.pages[b]) >= self.block_table.shape[1]:
                    raise RuntimeError(f"request {b} needs more than "
                                       f"{self.block_table.shape[1]} pages")
                page = self.allocator.alloc()
                rows.append(b)
                cols.append(len(self.pages[b]))
                vals.append(page)
                self.pages[b].append(page)
        if rows:   # one small host-to-device copy (non_blocking: no stream sync)
            idx = torch.tensor([rows, cols, vals], dtype=torch.int64).to(
                self.block_table.device, non_blocking=True)
            self.block_table[idx[0], idx[1]] = idx[2].to(torch.int32)
        self.lens = list(new_lens)

    def write(self, layer: int, batch_idx: torch.Tensor, pos: torch.Tensor,
              rows: torch.Tensor):
        """rows (n, 576) of requests batch_idx (n,) at positions pos (n,): on the device."""
        page = self.block_table[batch_idx, pos // PAGE_SIZE].long()
        self.k[layer, page, pos % PAGE_SIZE, 0] = rows.to(self.k.dtype)

    def release(self, b: int):
        self.allocator.release(self.pages[b])
        self.pages[b] = []
        self.lens[b] = 0

    def state(self):
        """The host-side state (to decode twice from the same prompt)."""
        return (list(self.lens), [list(p) for p in self.pages], list(self.allocator.free),
                self.block_table.clone(), self.seqlens.clone())

    def restore(self, state):
        lens, pages, free, table, seqlens = state
        self.lens, self.pages, self.allocator.free = list(lens), [list(p) for p in pages], \
            list(free)
        self.block_table.copy_(table)
        self.seqlens.copy_(seqlens)


class MLADecoder:
    """Random-weight decoder: MLA attention (absorbed form) + SwiGLU MLP per layer."""

    def __init__(self, shapes: ModelShapes, dtype=torch.float32, device="cpu", seed: int = 0):
        self.shapes = shapes
        s = shapes.attn
        if s.kv_lora_rank != HEAD_DIM_V or s.kv_lora_rank + s.qk_rope_head_dim != HEAD_DIM_K:
            raise ValueError("the kernel serves caches of 512 latent + 64 RoPE values")
        self.layers = [MLALayer(s, dtype=dtype, device=device, seed=seed + 1 + i)
                       for i in range(shapes.n_layers)]
        g = torch.Generator().manual_seed(seed)

        def w(*shape):
            return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(device, dtype)

        d, f = s.d_model, shapes.d_ff
        self.embed = torch.randn(shapes.vocab, d, generator=g).to(device, dtype)
        self.attn_norm = [1 + 0.1 * w(d, 1)[:, 0] for _ in self.layers]
        self.mlp_norm = [1 + 0.1 * w(d, 1)[:, 0] for _ in self.layers]
        self.w_gate = [w(f, d) for _ in self.layers]
        self.w_up = [w(f, d) for _ in self.layers]
        self.w_down = [w(d, f) for _ in self.layers]
        self.final_norm = 1 + 0.1 * w(d, 1)[:, 0]
        self.lm_head = w(shapes.vocab, d)
        self.dtype, self.device = dtype, device

    def mlp(self, i, x):
        return (F.silu(x @ self.w_gate[i].T) * (x @ self.w_up[i].T)) @ self.w_down[i].T

    def logits(self, x):
        return rms_norm(x, self.final_norm) @ self.lm_head.T

    # -- prefill: the prompt of one request, plain torch ---------------------------------
    def prefill(self, cache: PagedLatentCache, prompts: list[torch.Tensor], chunk: int = 512):
        """Run every prompt through the layers (causal attention over its own rows, read
        back from the cache in its dtype), write its rows into the cache. Returns the
        last position's logits (batch, vocab)."""
        cache.grow([max(n, len(p)) for n, p in zip(cache.lens, prompts)])
        out = []
        for b, prompt in enumerate(prompts):
            n = len(prompt)
            pos = torch.arange(n, device=self.device)
            bidx = torch.full((n,), b, device=self.device)
            x = self.embed[prompt.to(self.device)]
            for i, layer in enumerate(self.layers):
                h = rms_norm(x, self.attn_norm[i])
                c_kv, k_pe = layer.latent(h, pos)
                cache.write(i, bidx, pos, torch.cat([c_kv, k_pe], -1))
                pages = cache.block_table[b, :(n + PAGE_SIZE - 1) // PAGE_SIZE].long()
                kv = cache.layer(i)[pages].flatten(0, 1)[:n, 0].to(self.dtype)   # (n, 576)
                q = layer.absorbed_query(h, pos).to(kv.dtype)                   # (n, H, 576)
                o = torch.empty(n, layer.shapes.n_heads, HEAD_DIM_V, dtype=self.dtype,
                                device=self.device)
                for s in range(0, n, chunk):   # a chunk of queries against keys <= them
                    e = min(n, s + chunk)
                    scores = torch.einsum("thc,jc->htj", q[s:e], kv[:e]).float()
                    mask = pos[None, s:e, None] >= pos[None, None, :e]
                    p = scores.mul(layer.softmax_scale).masked_fill(~mask, float("-inf"))
                    p = p.softmax(-1).to(kv.dtype)
                    o[s:e] = torch.einsum("htj,jc->thc", p, kv[:e, :HEAD_DIM_V])
                x = x + layer.output_from_latent(o)
                x = x + self.mlp(i, rms_norm(x, self.mlp_norm[i]))
            out.append(self.logits(x[-1:]))
        cache.seqlens.copy_(torch.tensor(cache.lens, dtype=torch.int32))
        return torch.cat(out)

    # -- one decoding step: one token per request ------------------------------------------
    def decode_step(self, tokens: torch.Tensor, cache: PagedLatentCache, attention="kernel"):
        """tokens (batch,) on the device -> logits (batch, vocab). Appends each token's
        rows to the cache. attention: "kernel" (flash_mla_with_kvcache) or "torch"."""
        self.prepare_step(cache)
        return self.step_on_device(tokens, cache, attention)

    @staticmethod
    def prepare_step(cache: PagedLatentCache):
        """The host's part of a step: pages for one more token per request."""
        cache.grow([n + 1 for n in cache.lens])

    def step_on_device(self, tokens: torch.Tensor, cache: PagedLatentCache,
                       attention="kernel"):
        """The device's part of a step (what a CUDA graph can capture)."""
        batch = tokens.shape[0]
        pos = cache.seqlens.long()                        # where the new token goes
        cache.seqlens += 1                                # on the device, no sync
        bidx = torch.arange(batch, device=self.device)
        sched, _ = get_mla_metadata()                     # one per step, for all layers
        x = self.embed[tokens]
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, self.attn_norm[i])
            c_kv, k_pe = layer.latent(h, pos)
            cache.write(i, bidx, pos, torch.cat([c_kv, k_pe], -1))
            q = layer.absorbed_query(h, pos)[:, None].to(cache.k.dtype)   # (b, 1, H, 576)
            k_cache = cache.layer(i)
            if attention == "kernel":
                o, _ = flash_mla_with_kvcache(q, k_cache, cache.block_table, cache.seqlens,
                                              HEAD_DIM_V, sched,
                                              softmax_scale=layer.softmax_scale)
            elif attention == "torch":
                if self.dtype == torch.float32:  # the same rounded inputs, fp32 math
                    q, k_cache = q.float(), k_cache.float()
                o = torch_gather_sdpa(q, k_cache, cache.block_table, cache.seqlens,
                                      layer.softmax_scale, False).to(cache.k.dtype)
            else:
                raise ValueError(f"attention must be 'kernel' or 'torch', got {attention!r}")
            x = x + layer.output_from_latent(o[:, 0].to(self.dtype))
            x = x + self.mlp(i, rms_norm(x, self.mlp_norm[i]))
        return self.logits(x)


def make_requests(prompt_lens, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in prompt_lens]


def new_cache(model: MLADecoder, prompt_lens, steps, cache_dtype, seed=0):
    max_pages = max(-(-(n + steps) // PAGE_SIZE) for n in prompt_lens)
    num_pages = sum(-(-(n + steps) // PAGE_SIZE) for n in prompt_lens) + 2
    return PagedLatentCache(model.shapes.n_layers, len(prompt_lens), num_pages, max_pages,
                            cache_dtype, model.device, seed)


def generate(model: MLADecoder, cache: PagedLatentCache, first: torch.Tensor, steps: int,
             attention="kernel"):
    """Greedy decoding from tokens `first` (batch,): (tokens (steps, batch), logits
    (steps, batch, vocab))."""
    tok, toks, logits = first, [], []
    for _ in range(steps):
        lg = model.decode_step(tok, cache, attention)
        tok = lg.argmax(-1)
        toks.append(tok)
        logits.append(lg)
    return torch.stack(toks), torch.stack(logits)


class GraphedSteps:
    """The device part of a decoding step captured in a CUDA graph (GPU only), as a
    serving engine runs it: per step the host allocates pages, then replays. The graph
    holds a fresh sched meta per replay (the plan is captured too), the new token's rows,
    the layers, and the greedy choice, written back into its static token buffer."""

    def __init__(self, model: MLADecoder, cache: PagedLatentCache, first: torch.Tensor,
                 attention: str):
        self.model, self.cache, self.attention = model, cache, attention
        self.tokens = first.clone()
        model.prepare_step(cache)                   # the page the warm-up writes into
        saved = cache.seqlens.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model.step_on_device(self.tokens, cache, attention)
                cache.seqlens.copy_(saved)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.step_on_device(self.tokens, cache, attention)
            self.tokens.copy_(self.logits.argmax(-1))
        cache.seqlens.copy_(saved)
        self.first_step_prepared = True

    def step(self):
        if not self.first_step_prepared:
            self.model.prepare_step(self.cache)
        self.first_step_prepared = False
        self.graph.replay()
        return self.tokens


def generate_graphed(runner: GraphedSteps, steps: int):
    return torch.stack([runner.step().clone() for _ in range(steps)])


# ----------------------------------------------------------------------------------------
# main.py --model: tokens/s of the decode loop, our kernel against the torch path.

def serve_benchmark(quick=False):
    import random
    from rich.console import Console
    from common.checks import rel_error
    from common.results import BenchReport
    from common.timing import Timing
    import statistics

    console = Console()
    gpu = not runtime.is_emulated()
    dev = runtime.torch_device()
    if gpu:
        shapes = V2_LITE_LIKE if not quick else ModelShapes(V2_LITE_LIKE.attn, 2, 5632, 32000)
        dtype, batches = torch.bfloat16, ((64,) if quick else (64, 128))
        ctx, steps, repeats = ((1024, 4096) if quick else (1024, 8192)), 16 if quick else 32, 3
    else:
        shapes, dtype, batches, ctx, steps, repeats = TINY, torch.float32, (3,), (5, 130), 4, 1
    cache_dtype = torch.bfloat16
    rep = BenchReport("09_mla", "mla_model_decode" + ("_quick" if quick else ""), "tokens/s",
                      f"A DeepSeek-style decoder ({shapes.n_layers} MLA layers, d_model "
                      f"{shapes.attn.d_model}, {shapes.attn.n_heads} heads, {dtype} weights, "
                      "bf16 paged latent cache): greedy decoding, tokens/s of the decode "
                      "loop (prefill excluded)")
    model = MLADecoder(shapes, dtype, dev, seed=0)
    for batch in batches:
        rnd = random.Random(batch)
        prompt_lens = [rnd.randint(*ctx) for _ in range(batch)]
        prompts = make_requests(prompt_lens, shapes.vocab, seed=batch)
        cache = new_cache(model, prompt_lens, steps * (repeats + 1), cache_dtype)
        t0 = time.perf_counter()
        first = model.prefill(cache, prompts).argmax(-1)
        if gpu:
            torch.cuda.synchronize()
        console.print(f"batch {batch}: prefill of {sum(prompt_lens):,} tokens "
                      f"({min(prompt_lens)}-{max(prompt_lens)} per request) took "
                      f"{time.perf_counter() - t0:.1f} s (torch)")
        start = cache.state()
        results = {}
        for attention in ("kernel", "torch"):
            cache.restore(start)
            toks, logits = generate(model, cache, first, steps, attention)   # warm-up + check
            results[attention] = (toks, logits)
            per_step = []
            for _ in range(repeats if gpu else 0):
                cache.restore(start)
                torch.cuda.synchronize()
                t = time.perf_counter()
                generate(model, cache, first, steps, attention)
                torch.cuda.synchronize()
                per_step.append((time.perf_counter() - t) * 1e3 / steps)
            timing = None
            if per_step:
                per_step.sort()
                timing = Timing(statistics.median(per_step), per_step[0], per_step[-1],
                                per_step[0], len(per_step))
            tps = None if timing is None else batch / (timing.median_ms / 1e3)
            case = {"batch": batch, "prompt lens": f"{ctx[0]}-{ctx[1]} uniform",
                    "layers": shapes.n_layers, "steps": steps}
            name = ("MLA decoder, our kernel" if attention == "kernel"
                    else "MLA decoder, torch gather+SDPA")
            rep.add(case, name, timing, tps, peer=attention == "torch",
                    mean_prompt=sum(prompt_lens) / batch)
            console.print(f"batch {batch} {name}: " + ("n/a (emulation)" if tps is None else
                          f"{timing.median_ms:.2f} ms per step, {tps:,.0f} tokens/s"))
            if gpu:   # the same loop with each step replayed from a CUDA graph
                try:
                    per_step = []
                    for r in range(repeats + 1):
                        cache.restore(start)
                        runner = GraphedSteps(model, cache, first, attention)
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        toks_g = generate_graphed(runner, steps)
                        torch.cuda.synchronize()
                        if r:                               # the first one: a warm-up
                            per_step.append((time.perf_counter() - t) * 1e3 / steps)
                        del runner
                    per_step.sort()
                    timing = Timing(statistics.median(per_step), per_step[0], per_step[-1],
                                    per_step[0], len(per_step))
                    tps = batch / (timing.median_ms / 1e3)
                    same_g = (toks_g == toks).float().mean().item()
                    rep.add(case, name + ", CUDA graph", timing, tps,
                            peer=attention == "torch", same_tokens_as_eager=same_g)
                    console.print(f"batch {batch} {name}, CUDA graph: {timing.median_ms:.2f} "
                                  f"ms per step, {tps:,.0f} tokens/s (tokens as eager: "
                                  f"{same_g:.1%})")
                except Exception as e:   # report it and go on: the eager rows stand
                    console.print(f"[red]batch {batch} {name}, CUDA graph failed: "
                                  f"{type(e).__name__}: {str(e)[:300]}[/red]")
        (tk, lk), (tt, lt) = results["kernel"], results["torch"]
        same = (tk == tt).float().mean().item()
        console.print(f"batch {batch}: the two paths agree on {same:.1%} of the tokens; "
                      f"first step's logits differ by {rel_error(lk[0], lt[0]):.1e} (rel)")
        for r in rep.rows:
            if r.case["batch"] == batch:
                r.extra.update(same_tokens_kernel_vs_torch=same,
                               first_logits_rel_err=rel_error(lk[0], lt[0]))
        del cache
        if gpu:
            torch.cuda.empty_cache()
    rep.print()
    if gpu:
        console.print(f"saved {rep.save()}")
    return rep
