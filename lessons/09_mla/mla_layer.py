"""Multi-head Latent Attention (DeepSeek-V2/V3), small, in plain torch: two ways to decode.

MLA compresses what a token leaves in the KV cache. Instead of keys and values per head,
the token is projected down to one latent vector c_kv (kv_lora_rank = 512 values) plus one
RoPE key k_pe (64 values) shared by all heads. The per-head keys and values are linear in
the latent:

    k_h = [W_UK_h c_kv, k_pe]        (qk_nope_head_dim + qk_rope_head_dim)
    v_h = W_UV_h c_kv                (v_head_dim)

``decode_naive`` caches k_h and v_h for every head, as a plain multi-head layer would:
heads x (192 + 128) values per token in DeepSeek-V2's shapes. ``decode_absorbed``
caches only [c_kv, k_pe] (576 values) and moves the up-projections to the other side of
the dot products ("weight absorption"):

    q_h . k_h = (W_UK_h^T q_nope_h) . c_kv + q_pe_h . k_pe = [W_UK_h^T q_nope_h, q_pe_h] . [c_kv, k_pe]
    sum_j p_j v_h,j = W_UV_h (sum_j p_j c_kv,j)

so every head attends to the *same* 576-wide cache rows with a 576-wide query, and takes
the first 512 channels of those rows as its values: multi-query attention with
d_qk = 576, d_v = 512. That is the computation ``flash_mla.py`` runs. Only RoPE stops
W_UK from being absorbed into the 64 rotary channels, which is why they are decoupled.

Shapes follow DeepSeek-V2 (d_model 5120, 128 heads, q_lora_rank 1536, kv_lora_rank 512,
qk_nope 128, qk_rope 64, v 128), scaled down in d_model, heads and q_lora_rank; the
cache format (512 + 64) is kept, since that is what the kernel serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MLAShapes:
    d_model: int = 1024
    n_heads: int = 16
    q_lora_rank: int = 384
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


DEEPSEEK_V2 = MLAShapes(d_model=5120, n_heads=128, q_lora_rank=1536)


def cache_bytes_per_token(shapes: MLAShapes, elem_size: int = 2) -> dict:
    """Bytes one token leaves in the cache of one layer, in each form."""
    naive = shapes.n_heads * (shapes.qk_head_dim + shapes.v_head_dim) * elem_size
    latent = (shapes.kv_lora_rank + shapes.qk_rope_head_dim) * elem_size
    return {"naive (per-head K and V)": naive, "MLA latent (c_kv + k_pe)": latent,
            "ratio": naive / latent}


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x, pos, base=10000.0):
    """Rotary embedding (rotate-half form) of x (..., d) at integer positions pos (...)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d)
    ang = pos.to(x.dtype)[..., None] * inv                       # (..., d/2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class MLALayer:
    """The weights of one MLA attention layer and its two decoding forms."""

    def __init__(self, shapes: MLAShapes = MLAShapes(), dtype=torch.float64, device="cpu",
                 seed: int = 0):
        s = self.shapes = shapes
        g = torch.Generator().manual_seed(seed)

        def w(*shape):  # scaled so activations stay O(1)
            return (torch.randn(*shape, generator=g, dtype=torch.float64)
                    / shape[-1] ** 0.5).to(device, dtype)

        self.w_dq = w(s.q_lora_rank, s.d_model)                       # x -> c_q
        self.q_norm = 1 + 0.1 * w(s.q_lora_rank, 1)[:, 0]
        self.w_uq = w(s.n_heads * s.qk_head_dim, s.q_lora_rank)       # c_q -> q (all heads)
        self.w_dkv = w(s.kv_lora_rank + s.qk_rope_head_dim, s.d_model)  # x -> [c_kv, k_pe]
        self.kv_norm = 1 + 0.1 * w(s.kv_lora_rank, 1)[:, 0]
        self.w_uk = w(s.n_heads, s.qk_nope_head_dim, s.kv_lora_rank)  # c_kv -> k_nope, per head
        self.w_uv = w(s.n_heads, s.v_head_dim, s.kv_lora_rank)        # c_kv -> v, per head
        self.w_o = w(s.d_model, s.n_heads * s.v_head_dim)
        self.softmax_scale = s.qk_head_dim ** -0.5  # of the *unabsorbed* head dim (192)

    # -- the pieces both forms share ------------------------------------------------------
    def queries(self, x, pos):
        """x (batch, d_model), pos (batch,) -> q_nope (b, H, 128), q_pe (b, H, 64)."""
        s = self.shapes
        c_q = rms_norm(x @ self.w_dq.T, self.q_norm)
        q = (c_q @ self.w_uq.T).view(x.shape[0], s.n_heads, s.qk_head_dim)
        q_nope, q_pe = q.split([s.qk_nope_head_dim, s.qk_rope_head_dim], -1)
        return q_nope, rope(q_pe, pos[:, None].expand(-1, s.n_heads))

    def latent(self, x, pos):
        """x (batch, d_model) -> c_kv (b, 512), k_pe (b, 64): all the cache needs."""
        s = self.shapes
        c_kv, k_pe = (x @ self.w_dkv.T).split([s.kv_lora_rank, s.qk_rope_head_dim], -1)
        return rms_norm(c_kv, self.kv_norm), rope(k_pe, pos)

    # -- form 1: per-head keys and values in the cache ------------------------------------
    def decode_naive(self, x, pos, cache: dict):
        """One token per sequence. cache['k']: (b, t, H, 192), cache['v']: (b, t, H, 128)."""
        s = self.shapes
        q_nope, q_pe = self.queries(x, pos)
        c_kv, k_pe = self.latent(x, pos)
        k_nope = torch.einsum("hdc,bc->bhd", self.w_uk, c_kv)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, s.n_heads, -1)], -1)
        v = torch.einsum("hdc,bc->bhd", self.w_uv, c_kv)
        cache["k"] = torch.cat([cache["k"], k[:, None]], 1) if "k" in cache else k[:, None]
        cache["v"] = torch.cat([cache["v"], v[:, None]], 1) if "v" in cache else v[:, None]
        q = torch.cat([q_nope, q_pe], -1)                                  # (b, H, 192)
        scores = torch.einsum("bhd,bthd->bht", q, cache["k"]) * self.softmax_scale
        o = torch.einsum("bht,bthd->bhd", scores.softmax(-1), cache["v"])  # (b, H, 128)
        return o.reshape(x.shape[0], -1) @ self.w_o.T

    # -- form 2: the latent in the cache, up-projections absorbed ------------------------
    def absorbed_query(self, x, pos):
        """(b, H, 576): [W_UK_h^T q_nope_h, q_pe_h], the query MQA over the latent needs."""
        q_nope, q_pe = self.queries(x, pos)
        return torch.cat([torch.einsum("bhd,hdc->bhc", q_nope, self.w_uk), q_pe], -1)

    def output_from_latent(self, o_latent):
        """(b, H, 512) attention output in latent space -> (b, d_model): W_UV, then W_O."""
        o = torch.einsum("bhc,hvc->bhv", o_latent, self.w_uv)
        return o.reshape(o.shape[0], -1) @ self.w_o.T

    def decode_absorbed(self, x, pos, cache: dict, attend=None):
        """One token per sequence. cache['kv']: (b, t, 576) = [c_kv, k_pe] per token.

        ``attend(q (b, H, 576), kv (b, t, 576), scale) -> (b, H, 512)`` is the MQA step;
        the default is plain torch, main.py passes the Triton kernel.
        """
        c_kv, k_pe = self.latent(x, pos)
        row = torch.cat([c_kv, k_pe], -1)
        cache["kv"] = torch.cat([cache["kv"], row[:, None]], 1) if "kv" in cache else row[:, None]
        q = self.absorbed_query(x, pos)
        attend = attend or mqa_latent_attention
        return self.output_from_latent(attend(q, cache["kv"], self.softmax_scale))


def mqa_latent_attention(q, kv, scale, d_v: int = 512):
    """Every head attends to the same rows; V = the first d_v channels of K."""
    scores = torch.einsum("bhc,btc->bht", q, kv) * scale
    return torch.einsum("bht,btc->bhc", scores.softmax(-1), kv[..., :d_v])
