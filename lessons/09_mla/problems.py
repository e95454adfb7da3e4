"""FlashMLA's benchmark problems: lengths, a paged cache, the byte and FLOP formulas, and
the torch peer. Shared by main.py (--bench, --sweep) and timeline.py."""

import random

import torch
import torch.nn.functional as F

from common import runtime
from flash_mla import HEAD_DIM_K, HEAD_DIM_V, PAGE_SIZE

DEV = runtime.torch_device()


def flashmla_lens(batch, mean, varlen, seqlen_q, seed=0):
    """FlashMLA's lengths: all equal to the mean, or ~ N(mean, mean / 2), at least seqlen_q."""
    if not varlen:
        return [mean] * batch
    rnd = random.Random(seed)
    return [max(int(rnd.gauss(mean, mean / 2)), seqlen_q) for _ in range(batch)]


def paged_cache(lens, heads_k, dtype, seed=0):
    """Random cache pages in random order; unused table slots point at page 0 (the torch
    peer gathers whole rows of the table; our kernel never reads those slots)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    pages = [triton_cdiv(n, PAGE_SIZE) for n in lens]
    num_pages = sum(pages)
    k_cache = torch.randn(num_pages, PAGE_SIZE, heads_k, HEAD_DIM_K, generator=gen,
                          device=DEV, dtype=dtype)
    perm = torch.randperm(num_pages, generator=gen, device=DEV).to(torch.int32)
    block_table = torch.zeros(len(lens), max(pages), dtype=torch.int32, device=DEV)
    start = 0
    for b, p in enumerate(pages):
        block_table[b, :p] = perm[start:start + p]
        start += p
    return k_cache, block_table, torch.tensor(lens, dtype=torch.int32, device=DEV)


def triton_cdiv(a, b):
    return -(-a // b)


def torch_gather_sdpa(q, k_cache, block_table, cache_seqlens, scale, causal):
    """The torch peer: gather each sequence's pages into a padded (b, L, 576) tensor, then
    one SDPA per sequence with the heads folded into query rows (it is MQA) and a mask for
    lengths (and causality)."""
    batch, sq, hq, d = q.shape
    hk = k_cache.shape[2]
    g = hq // hk
    seq_len = block_table.shape[1] * PAGE_SIZE
    k = k_cache[block_table.long()].view(batch, seq_len, hk, d).transpose(1, 2)   # gather
    qf = q.view(batch, sq, hk, g, d).permute(0, 2, 1, 3, 4).reshape(batch, hk, sq * g, d)
    pos = torch.arange(sq, device=q.device).repeat_interleave(g)
    limit = cache_seqlens[:, None] - (sq - 1 - pos[None, :] if causal else 0)
    mask = torch.arange(seq_len, device=q.device)[None, None, :] < limit[:, :, None]
    o = F.scaled_dot_product_attention(qf, k, k[..., :HEAD_DIM_V], attn_mask=mask[:, None],
                                       scale=scale)
    return o.view(batch, hk, sq, g, HEAD_DIM_V).permute(0, 2, 1, 3, 4).reshape(
        batch, sq, hq, HEAD_DIM_V)


def flashmla_flops_bytes(lens, seqlen_q, heads_q, heads_k, elem_size=2):
    """FlashMLA's own formulas (its tests/test_flash_mla.py): every key is read once per
    kv head, the queries read and the outputs written once; FLOPs of both matmuls."""
    total = sum(lens)
    batch = len(lens)
    flops = 2 * seqlen_q * total * heads_q * (HEAD_DIM_K + HEAD_DIM_V)
    nbytes = (total * heads_k * HEAD_DIM_K
              + batch * seqlen_q * heads_q * (HEAD_DIM_K + HEAD_DIM_V)) * elem_size
    return flops, nbytes
