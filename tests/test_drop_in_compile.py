"""Both drop-ins in one compiled model: lesson 08's flash_attn_func (a prefill) and lesson
09's flash_mla_with_kvcache (a decode step over a paged cache) traced by
torch.compile(fullgraph=True) with no graph break, equal to eager. On the GPU the
default backend (inductor) and a CUDA graph of the compiled step; on the CPU the
aot_eager backend (the custom ops run the Triton interpreter)."""

import pytest
import torch

from common import runtime

DEV = runtime.torch_device()
GPU = runtime.is_gpu()


class _PrefillThenDecode(torch.nn.Module):
    """A toy layer: causal attention over a prompt, then one MLA decode step whose query
    is a projection of the prompt's last output."""

    def __init__(self, heads=4, d=32, heads_mla=16):
        super().__init__()
        self.heads, self.d, self.heads_mla = heads, d, heads_mla
        self.to_q = torch.nn.Linear(heads * d, heads_mla * 576, dtype=torch.bfloat16)

    def forward(self, q, k, v, k_cache, block_table, cache_seqlens):
        from flash_attn_interface import flash_attn_func
        from flash_mla import flash_mla_with_kvcache, get_mla_metadata
        x = flash_attn_func(q, k, v, 0.0, None, True)                  # (b, s, h, d)
        q_mla = self.to_q(x[:, -1:].flatten(2)).view(x.shape[0], 1, self.heads_mla, 576)
        meta, num_splits = get_mla_metadata()
        out, lse = flash_mla_with_kvcache(q_mla, k_cache, block_table, cache_seqlens, 512,
                                          meta, num_splits, causal=True)
        return x, out, lse


def test_one_model_with_both_ops_compiles_fullgraph():
    import flash_mla  # noqa: F401  (lesson 09 on sys.path: the root conftest puts it there)
    from problems import paged_cache

    torch.manual_seed(0)
    torch._dynamo.reset()
    b, s, h, d = 2, 40, 4, 32
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, s, h, d, generator=gen).to(DEV, torch.bfloat16) for _ in range(3))
    k_cache, block_table, lens = paged_cache([70, 131], 1, torch.bfloat16, seed=2)
    model = _PrefillThenDecode().to(DEV)
    args = (q, k, v, k_cache, block_table, lens)
    compiled = torch.compile(model, fullgraph=True,
                             backend="inductor" if GPU else "aot_eager")
    with torch.no_grad():  # decoding is inference: the MLA op has no backward (FlashMLA's)
        eager = model(*args)
        got = compiled(*args)
    for e, c in zip(eager, got):
        torch.testing.assert_close(c, e, atol=0, rtol=0)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_compiled_model_with_both_ops_replays_in_a_cuda_graph():
    from problems import paged_cache

    torch._dynamo.reset()
    b, s, h, d = 4, 256, 4, 32
    q, k, v = (torch.randn(b, s, h, d, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    k_cache, block_table, lens = paged_cache([700, 1310, 64, 4000], 1, torch.bfloat16, seed=3)
    model = _PrefillThenDecode().to(DEV)
    compiled = torch.compile(model, fullgraph=True)
    args = (q, k, v, k_cache, block_table, lens)
    compiled(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = compiled(*args)
    for seed in (5, 6):   # new values in the static inputs, new lengths: the plan is in the graph
        gen = torch.Generator(DEV).manual_seed(seed)
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device=DEV, generator=gen).to(t.dtype))
        lens.copy_(torch.tensor([5, 1300, 64, 3999], dtype=torch.int32, device=DEV) - seed)
        graph.replay()
        want = model(*args)
        for e, c in zip(want, outs):
            torch.testing.assert_close(c, e, atol=2e-2, rtol=2e-2)
